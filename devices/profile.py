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
from rankdown.schema import build
from rankdown.validate.config import Runtime

PROFILE_DIR = Path(__file__).parent / "profiles"


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
    cpu: str | None = None  # arm64-emu: the CPU emulated (devices/arm64_emu.py CPUS); None: its default


@dataclass(frozen=True)
class DeviceProfile:
    """A profile file's keys (read with rankdown.schema: unknown keys and wrong types are errors)."""

    name: str
    arch: str
    runtimes: tuple[Runtime, ...]
    threads: int
    memory_mb: int
    transport: TransportSpec
    description: str = ""
    executorch_runner: ExecuTorchRunner = ExecuTorchRunner.PYTHON
    exec_wrapper: tuple[str, ...] = ()  # prefixed to the native runner's command, e.g. taskset f0
    source: str = ""  # the file it was read from; not a key of the file


def load_profile(path: Path) -> DeviceProfile:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise RankdownError(f"{path}: cannot read device profile: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RankdownError(f"{path}: not a valid TOML device profile: {e}") from None
    if "source" in raw:
        raise RankdownError(f"{path}: unknown keys ['source']")
    try:
        profile = build(DeviceProfile, dict(raw, source=str(path)), "device_profile")
    except (ValueError, TypeError) as e:
        raise RankdownError(f"{path}: invalid device profile: {e}") from None
    if not profile.runtimes:
        raise RankdownError(f"{path}: runtimes must name at least one of {', '.join(m.value for m in Runtime)}")
    if profile.threads < 1 or profile.memory_mb < 1:
        raise RankdownError(f"{path}: threads and memory_mb must be positive")
    if profile.transport.kind is Transport.SSH and not profile.transport.host:
        raise RankdownError(f"{path}: an ssh transport needs a host")
    if profile.transport.cpu is not None:
        from rankdown.devices.arm64_emu import CPUS

        if profile.transport.kind is not Transport.ARM64_EMU:
            raise RankdownError(f"{path}: transport.cpu applies to an arm64-emu transport only (a real device is its own CPU)")
        if profile.transport.cpu not in CPUS:
            raise RankdownError(f"{path}: transport.cpu {profile.transport.cpu!r} is not one of {', '.join(CPUS)}")
    return profile


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
