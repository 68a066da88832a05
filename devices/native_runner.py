"""Build ``rankdown-et-runner`` (devices/et_runner), ExecuTorch's C++ runtime for devices without PyTorch.

It links the prebuilt runtime that the executorch wheel ships (``executorch/lib``, ``include``):
the host's installed wheel for this machine, and the same version's aarch64 wheel, fetched
with pip, for arm64 with Debian's cross g++. A build is a folder ``bin/rankdown-et-runner`` +
``lib/*.so`` that runs wherever it is copied, cached under ``cache_dir()/et-runner/ARCH``
and rebuilt when the sources change.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from rankdown.errors import RankdownError

SOURCE_DIR = Path(__file__).parent / "et_runner"
BINARY = "rankdown-et-runner"
HOST_ARCH = platform.machine()
_TOOLCHAIN = {"aarch64": SOURCE_DIR / "aarch64-linux-gnu.cmake"}
_COMPILER = {"aarch64": "aarch64-linux-gnu-g++"}
_WHEEL_PLATFORMS = {"aarch64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")}


def cache_dir() -> Path:
    """Where built devices and runners live: outside the repository, shared by checkouts."""
    return Path(os.environ.get("RANKDOWN_CACHE") or Path.home() / ".cache" / "rankdown")


def _sources_digest(arch: str) -> str:
    h = hashlib.sha256(f"{arch} executorch {importlib.metadata.version('executorch')}".encode())
    for path in sorted(SOURCE_DIR.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def run_checked(args: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a build or set-up tool; a failure is one line naming ``what`` and the tool's last words."""
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
        raise RankdownError(f"{what} failed (exit status {proc.returncode}): {tail[0]}")
    return proc


def _host_package() -> Path:
    spec = importlib.util.find_spec("executorch")  # locates the package without importing torch
    if spec is None or not spec.submodule_search_locations:
        raise RankdownError("the executorch package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _wheel_package(arch: str, work: Path, progress: Callable[[str], None]) -> Path:
    """The same executorch version's wheel for ``arch``: its lib/, include/ and cmake files."""
    version = importlib.metadata.version("executorch")
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"executorch-{version}-*{arch}.whl"))
    if not found:
        progress(f"downloading the executorch {version} wheel for {arch}")
        platforms = [a for p in _WHEEL_PLATFORMS[arch] for a in ("--platform", p)]
        py = f"{sys.version_info.major}{sys.version_info.minor}"
        run_checked([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *platforms,
              "--python-version", py, "--implementation", "cp", f"executorch=={version}", "-d", str(wheels)],
             f"pip download of executorch {version} for {arch}")
        found = sorted(wheels.glob(f"executorch-{version}-*{arch}.whl"))
    with zipfile.ZipFile(found[-1]) as wheel:
        members = [n for n in wheel.namelist() if n.startswith(("executorch/lib/", "executorch/include/",
                                                                  "executorch/share/"))]
        wheel.extractall(work, members)
    return work / "executorch"


def build_runner(arch: str = HOST_ARCH, progress: Callable[[str], None] = print) -> Path:
    """The runner folder for ``arch`` (``bin/`` and ``lib/``), built if missing or stale."""
    if arch != HOST_ARCH and arch not in _TOOLCHAIN:
        raise RankdownError(f"no cross build of {BINARY} for {arch} from {HOST_ARCH}")
    compiler = _COMPILER.get(arch, "g++") if arch != HOST_ARCH else "g++"
    missing = [tool for tool in ("cmake", compiler) if shutil.which(tool) is None]
    if missing:
        raise RankdownError(f"building {BINARY} for {arch} needs {' and '.join(missing)} "
                            f"(Debian: apt-get install cmake {'g++' if arch == HOST_ARCH else 'g++-aarch64-linux-gnu'})")
    target = cache_dir() / "et-runner" / arch
    stamp = target / "sources.sha256"
    digest = _sources_digest(arch)
    if stamp.is_file() and stamp.read_text().strip() == digest and (target / "bin" / BINARY).is_file():
        return target
    progress(f"building {BINARY} for {arch}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{arch}-", dir=target.parent) as tmp_name:
        tmp = Path(tmp_name)
        package = _host_package() if arch == HOST_ARCH else _wheel_package(arch, tmp / "wheel", progress)
        configure = ["cmake", "-S", str(SOURCE_DIR), "-B", str(tmp / "build"), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={package}"]
        if arch != HOST_ARCH:
            configure.append(f"-DCMAKE_TOOLCHAIN_FILE={_TOOLCHAIN[arch]}")
        run_checked(configure, f"cmake configure of {BINARY} ({arch})")
        run_checked(["cmake", "--build", str(tmp / "build"), "-j", "2"], f"build of {BINARY} ({arch})")
        out = tmp / "out"
        (out / "bin").mkdir(parents=True)
        shutil.copy2(tmp / "build" / BINARY, out / "bin" / BINARY)
        shutil.copytree(package / "lib", out / "lib", ignore=shutil.ignore_patterns("cmake"))
        (out / "sources.sha256").write_text(digest + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target
