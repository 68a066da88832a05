"""An arm64 Linux device that runs on this machine: a Debian arm64 userland under qemu-user.

    python -m rankdown.devices.arm64_emu build      (what `make arm64-emu` runs; a few minutes, once)

The root is Debian bookworm's arm64 python3 (debootstrap, unpacked with dpkg -x, no chroot or
binfmt needed), with the aarch64 wheels of numpy and onnxruntime (the host's versions) and
``rankdown-et-runner`` cross-built against the aarch64 executorch wheel. Programs run with
``qemu-aarch64-static -L ROOT`` on real ARM kernels (XNNPACK's and MLAS's NEON paths), so
parity there is a real check; latency under emulation is not meaningful.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rankdown.devices.native_runner import build_runner, cache_dir, run_checked
from rankdown.errors import RankdownError

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PYTHON = "/usr/bin/python3.11"
SITE = "/opt/rankdown/site"  # inside the root: where numpy and onnxruntime are unpacked
WHEELS = ("numpy", "onnxruntime")
QEMU = "qemu-aarch64-static"

# onnxruntime's arm64 build crashes under qemu-user 7.2 parsing the x86 host's /proc/cpuinfo;
# every program runs with this one bind-mounted over it (in a private mount namespace).
def _cpuinfo(features: str, variant: str, part: str) -> str:
    return "".join(f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                   f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n"
                   for i in range(2))


CPUINFO = _cpuinfo("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                   "asimddp", "0x3", "0xd0c")  # a Neoverse-N1, on qemu's default CPU
# Other CPUs a profile can name (transport.cpu): qemu's model of it, and a /proc/cpuinfo that says
# the same (onnxruntime and XNNPACK choose kernels from it, so a mismatch runs instructions the
# model lacks). The Cortex-A72 (a Raspberry Pi 4) has no dot product: MLAS runs int4 nodes on
# float inputs there, where a Neoverse-N1 or an x86 host rounds them to int8.
CPUS = {"cortex-a72": _cpuinfo("fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid", "0x0", "0xd08")}


@dataclass(frozen=True)
class Arm64Root:
    path: Path  # the arm64 root file system, as seen from the host
    cpu: str | None = None  # a key of CPUS; None: qemu's default CPU, described as a Neoverse-N1

    @property
    def cpuinfo(self) -> Path:
        return self.path.parent / ("cpuinfo" if self.cpu is None else f"cpuinfo-{self.cpu}")

    def env(self) -> dict[str, str]:
        """What the host adds to a program's environment: qemu-user reads its CPU model from it, and
        every arm64 program started under this one (the native runner) inherits it."""
        return {} if self.cpu is None else {"QEMU_CPU": self.cpu}

    @property
    def runner(self) -> Path:
        """rankdown-et-runner for arm64 (``bin/``, ``lib/``), on the host's file system."""
        return cache_dir() / "et-runner" / "aarch64"

    def command(self, argv: list[str]) -> list[str]:
        """Host argv that runs the arm64 program ``argv`` (a guest path first) in this root."""
        return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /proc/cpuinfo && exec "$@"', str(self.cpuinfo),
                *self.exec_prefix(), *argv]

    def exec_prefix(self) -> list[str]:
        """What runs one more arm64 program (by its host path) from inside the root: qemu-user
        does not follow execve into another arm64 binary without binfmt."""
        return [shutil.which(QEMU) or QEMU, "-L", str(self.path)]

    def python(self, args: list[str]) -> list[str]:
        return self.command([str(self.path) + PYTHON, *args])


def root_dir() -> Path:
    return cache_dir() / "arm64-emu" / "root"


def find_root(cpu: str | None = None) -> Arm64Root:
    if cpu is not None and cpu not in CPUS:
        raise RankdownError(f"arm64-emu has no CPU {cpu!r}: choose one of {', '.join(CPUS)}")
    root = Arm64Root(root_dir(), cpu)
    if not (root.path / ".complete").is_file():
        raise RankdownError(f"the arm64-emu device is not built at {root.path}: run `make arm64-emu` "
                            "(a few minutes, once)")
    for tool in (QEMU, "unshare"):
        if shutil.which(tool) is None:
            raise RankdownError(f"the arm64-emu device needs {tool} (Debian: apt-get install qemu-user-static)")
    if cpu is not None and (not root.cpuinfo.is_file() or root.cpuinfo.read_text() != CPUS[cpu]):
        root.cpuinfo.write_text(CPUS[cpu])  # the default's is written by build
    return root


def _run(args: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    return run_checked(args, f"arm64-emu: {what}", **kwargs)


def _unpack_wheels(site: Path, progress: Callable[[str], None]) -> None:
    wheels = cache_dir() / "wheels"
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]  # the host's versions
    progress(f"downloading arm64 wheels: {', '.join(pins)}")
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    if py != PYTHON.rsplit("python", 1)[1].replace(".", ""):
        raise RankdownError(f"arm64-emu carries Python {PYTHON[-4:]}; wheels for it are fetched with a host Python of "
                            f"the same version (this is {sys.version_info.major}.{sys.version_info.minor})")
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
          "--platform", "manylinux2014_aarch64", "--python-version", py, "--implementation", "cp",
          *pins, "-d", str(wheels)], "pip download of the arm64 wheels")
    for name, pin in zip(WHEELS, pins):
        version = pin.split("==")[1]
        (wheel,) = sorted(wheels.glob(f"{name}-{version}-*aarch64*.whl"))[-1:]
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)


def build(progress: Callable[[str], None] = print) -> Arm64Root:
    """Build the root once (idempotent): debootstrap, unpack, wheels, cpuinfo, the arm64 runner."""
    missing = [t for t in ("debootstrap", "dpkg", QEMU, "unshare") if shutil.which(t) is None]
    if missing:
        raise RankdownError(f"building arm64-emu needs {', '.join(missing)} "
                            "(Debian: apt-get install debootstrap qemu-user-static)")
    final = root_dir()
    if not (final / ".complete").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".root-", dir=final.parent) as tmp:
            work = Path(tmp) / "root"
            progress(f"debootstrap: Debian {SUITE} arm64 with python3 (downloads about 30 MB)")
            _run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3",
                  SUITE, str(work), MIRROR], "debootstrap")
            debs = sorted((work / "var/cache/apt/archives").glob("*.deb"))
            progress(f"unpacking {len(debs)} packages")
            for deb in debs:
                _run(["dpkg", "-x", str(deb), str(work)], f"dpkg -x {deb.name}")
            _unpack_wheels(work / SITE.lstrip("/"), progress)
            (work / "tmp").mkdir(exist_ok=True)
            (work / "data/local/tmp").mkdir(parents=True, exist_ok=True)  # where adb pushes on Android
            (work / ".complete").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
    root = Arm64Root(final)
    root.cpuinfo.write_text(CPUINFO)
    build_runner("aarch64", progress)
    progress("checking: numpy and onnxruntime import under emulation")
    probe = _run(root.python(["-c", "import platform, numpy, onnxruntime; "
                                    "print(platform.machine(), numpy.__version__, onnxruntime.__version__)"]),
                 "the import check", env={"PYTHONPATH": SITE, "PATH": "/usr/bin:/bin"})
    progress(f"arm64-emu ready at {final}: {probe.stdout.strip()}")
    return root


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m rankdown.devices.arm64_emu build", file=sys.stderr)
        return 2
    try:
        build()
    except RankdownError as e:
        print(f"arm64-emu: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
