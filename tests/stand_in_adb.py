"""A stand-in ``adb`` that maps the commands AdbRunner sends onto the arm64-emu root.

No phone can be attached here, so this plays the device: ``push`` copies into ROOT, ``pull``
copies out of it, and ``shell`` runs the command with the device folder
(``/data/local/tmp``) mapped into ROOT and ``python3`` being the root's arm64 Python under
qemu-user. Every call is appended to ``$STAND_IN_ADB_LOG`` so a test can check what the
runner really sent. Environment: STAND_IN_ADB_ROOT (the arm64 root), STAND_IN_ADB_SERIAL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEVICE_DIR = "/data/local/tmp"


def _on_root(root: Path, device_path: str) -> Path:
    if not device_path.startswith(DEVICE_DIR):
        raise SystemExit(f"adb: error: {device_path}: only {DEVICE_DIR} is writable on this stand-in")
    return root / device_path.lstrip("/")


def main(argv: list[str]) -> int:
    root = Path(os.environ["STAND_IN_ADB_ROOT"])
    with open(os.environ["STAND_IN_ADB_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(argv) + "\n")
    if argv[:1] == ["-s"]:
        if argv[1] != os.environ.get("STAND_IN_ADB_SERIAL"):
            print(f"adb: device '{argv[1]}' not found", file=sys.stderr)
            return 1
        argv = argv[2:]
    command, args = argv[0], argv[1:]
    if command == "push":
        *sources, target = args
        dest = _on_root(root, target.rstrip("/"))
        for source in map(Path, sources):
            into = dest / source.name if dest.is_dir() else dest
            if source.is_dir():
                shutil.copytree(source, into, dirs_exist_ok=True)
            else:
                shutil.copy2(source, into)
        print(f"{len(sources)} files pushed.")
        return 0
    if command == "pull":
        source, target = _on_root(root, args[0]), Path(args[1])
        if not source.exists():
            print(f"adb: error: remote object '{args[0]}' does not exist", file=sys.stderr)
            return 1
        into = target / source.name if target.is_dir() else target
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, into)
        return 0
    if command == "shell":
        script = " ".join(args).replace(DEVICE_DIR, str(root / DEVICE_DIR.lstrip("/")))
        shim = Path(os.environ["STAND_IN_ADB_SHIMS"])
        env = dict(os.environ, PATH=f"{shim}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        return subprocess.run(["sh", "-c", script], env=env).returncode
    print(f"adb: unknown command {command}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
