"""Device profiles: what a device runs, how much memory the model may use, how to reach it.

Shipped profiles live in ``devices/profiles/*.toml``; ``--device`` also takes a path to a
user's own file. Unknown keys and wrong types are errors, named with the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rankdown.errors import RankdownError

PROFILE_DIR = Path(__file__).parent / "profiles"
_RUNTIMES = ("onnxruntime", "executorch")


class Transport(str, Enum):
    LOCAL = "local"
    SSH = "ssh"
    ADB = "adb"
    ARM64_EMU = "arm64-emu"


class ExecuTorchRunner(str, Enum):
    """How the device runs a .pte: ExecuTorch's Python runtime (needs PyTorch there), or
    ``rankdown-et-runner``, the C++ runtime a phone app links (built by the host, pushed)."""

    PYTHON = "python"
    NATIVE = "native"


@dataclass(frozen=True)
class TransportSpec:
    kind: Transport
    host: str | None = None
    user: str | None = None
    port: int = 22
    identity: str | None = None
    python: str = "python3"
    remote_dir: str = "/tmp/rankdown"
    options: dict[str, str] = field(default_factory=dict)  # extra ssh -o settings
    serial: str | None = None  # adb -s
    adb: str = "adb"  # the adb executable
    pythonpath: str | None = None  # prepended to the device's PYTHONPATH (where numpy, onnxruntime are)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    arch: str
    runtimes: tuple[str, ...]
    threads: int
    memory_mb: int
    transport: TransportSpec
    source: str
    executorch_runner: ExecuTorchRunner = ExecuTorchRunner.PYTHON
    exec_wrapper: tuple[str, ...] = ()  # prefixed to the native runner's command, e.g. taskset f0


_TOP = {"name": str, "description": str, "arch": str, "runtimes": list, "threads": int, "memory_mb": int,
        "transport": dict, "executorch_runner": str, "exec_wrapper": list}
_TRANSPORT = {"kind": str, "host": str, "user": str, "port": int, "identity": str, "python": str,
              "remote_dir": str, "options": dict, "serial": str, "adb": str, "pythonpath": str}


def _typed(raw: dict, spec: dict, where: str, required: set[str]) -> None:
    unknown = set(raw) - set(spec)
    if unknown:
        raise RankdownError(f"{where}: unknown keys {sorted(unknown)}")
    missing = required - set(raw)
    if missing:
        raise RankdownError(f"{where}: missing keys {sorted(missing)}")
    for key, kind in spec.items():
        if key in raw and (not isinstance(raw[key], kind) or isinstance(raw[key], bool) and kind is int):
            raise RankdownError(f"{where}: {key} must be a {kind.__name__}, got {raw[key]!r}")


def load_profile(path: Path) -> DeviceProfile:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise RankdownError(f"{path}: cannot read device profile: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RankdownError(f"{path}: not a valid TOML device profile: {e}") from None
    _typed(raw, _TOP, str(path), set(_TOP) - {"description", "executorch_runner", "exec_wrapper"})
    _typed(raw["transport"], _TRANSPORT, f"{path} [transport]", {"kind"})
    runtimes = tuple(raw["runtimes"])
    bad = [r for r in runtimes if r not in _RUNTIMES]
    if bad or not runtimes:
        raise RankdownError(f"{path}: runtimes must be some of {', '.join(_RUNTIMES)}, got {raw['runtimes']!r}")
    if raw["threads"] < 1 or raw["memory_mb"] < 1:
        raise RankdownError(f"{path}: threads and memory_mb must be positive")
    t = dict(raw["transport"])
    try:
        t["kind"] = Transport(t["kind"])
    except ValueError:
        known = ", ".join(k.value for k in Transport)
        raise RankdownError(f"{path}: transport kind {t['kind']!r} is not one of {known}") from None
    if t["kind"] is Transport.SSH and not t.get("host"):
        raise RankdownError(f"{path}: an ssh transport needs a host")
    try:
        runner = ExecuTorchRunner(raw.get("executorch_runner", ExecuTorchRunner.PYTHON.value))
    except ValueError:
        raise RankdownError(f"{path}: executorch_runner must be python or native, got {raw['executorch_runner']!r}") from None
    wrapper = raw.get("exec_wrapper", [])
    if not all(isinstance(w, str) for w in wrapper):
        raise RankdownError(f"{path}: exec_wrapper must be a list of strings")
    return DeviceProfile(name=raw["name"], description=raw.get("description", ""), arch=raw["arch"],
                         runtimes=runtimes, threads=raw["threads"], memory_mb=raw["memory_mb"],
                         transport=TransportSpec(**t), source=str(path), executorch_runner=runner,
                         exec_wrapper=tuple(wrapper))


def shipped_profiles() -> dict[str, DeviceProfile]:
    profiles = {}
    for path in sorted(PROFILE_DIR.glob("*.toml")):
        profile = load_profile(path)
        profiles[profile.name] = profile
    return profiles


def find_profile(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name, or a user's profile file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RankdownError(f"{path}: no such device profile file")
        return load_profile(path)
    profiles = shipped_profiles()
    if name_or_path not in profiles:
        raise RankdownError(f"unknown device {name_or_path!r}: choose one of {', '.join(profiles)} or give a .toml file")
    return profiles[name_or_path]
