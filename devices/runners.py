"""Transports that run the device half of the harness (rankdown.validate.on_device) on a device.

Each runner has the LocalRunner's ``run(job, bundle) -> (result, arrays)``: it ships the
bundle, the harness's device-side files (numpy + runtime only, no PyTorch model code) and,
where the device runs .pte files natively, ``rankdown-et-runner`` built for its CPU; runs
``python -m rankdown.validate.on_device`` there; and brings ``result.json`` and ``logits.npz``
back. References and comparisons stay on the host. The device-side layout, under one
folder per run: ``bundle/``, ``harness/``, ``runner/{bin,lib}``, ``job.json``, ``out/``.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path
from types import ModuleType

from rankdown.devices.native_runner import BINARY, HOST_ARCH, build_runner
from rankdown.devices.profile import DeviceProfile, ExecuTorchRunner, Transport, TransportSpec
from rankdown.errors import RankdownError
from rankdown.export.formats import decoder_modules
from rankdown.validate.local_runner import LocalRunner, read_outputs


def _device_modules() -> tuple[ModuleType, ...]:
    """Everything the device needs besides python3, numpy and the runtime: the harness's device
    half, the format table, every registered runtime's decoder module and what they import of
    rankdown, and their packages."""
    # library_logs: the decoders keep the runtimes' native log noise off the device's stderr too
    wanted = ["rankdown.validate.on_device", "rankdown.export.formats", "rankdown.library_logs", *decoder_modules()]
    names = dict.fromkeys(".".join(n.split(".")[:i]) for n in wanted for i in range(1, n.count(".") + 2))
    return tuple(importlib.import_module(n) for n in names)


HARNESS_MODULES = _device_modules()


def harness_files() -> dict[str, Path]:
    """Archive name -> file: the device half of the harness, as importable packages."""
    files = {}
    for module in HARNESS_MODULES:
        assert module.__file__ is not None, f"{module.__name__} is a module with a file"
        path = Path(module.__file__)
        # Packages by their import name: the installed names differ from the source folders.
        folder = module.__name__.split(".") if path.name == "__init__.py" else module.__name__.split(".")[:-1]
        files["/".join([*folder, path.name])] = path
    return files


def _staged_files(bundle: Path, runner_dir: Path | None) -> dict[str, Path]:
    """Device-side name -> host file, for everything a run pushes (the job aside)."""
    files = {}
    for path in sorted(Path(bundle).rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[f"bundle/{path.relative_to(bundle).as_posix()}"] = path
    for name, path in harness_files().items():
        files[f"harness/{name}"] = path
    if runner_dir is not None:
        for path in sorted(runner_dir.rglob("*")):
            if path.is_file() and path.name != "sources.sha256":
                files[f"runner/{path.relative_to(runner_dir).as_posix()}"] = path
    return files


def _push_archive(bundle: Path, job: dict, runner_dir: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, path in _staged_files(bundle, runner_dir).items():
            tar.add(path, arcname=name, recursive=False)
        data = json.dumps(job).encode()
        info = tarfile.TarInfo("job.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _stage_dir(folder: Path, bundle: Path, job: dict, runner_dir: Path | None) -> None:
    for name, path in _staged_files(bundle, runner_dir).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, folder / name)
    (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")


class _Device:
    """What every remote runner shares: whether this job needs the native runner, and its argv."""

    name = "device"
    emulated = False

    def __init__(self, profile: DeviceProfile | None):
        self.profile = profile
        self.device = profile.name if profile is not None else self.name  # report.json's environment.device

    def _native(self, job: dict) -> bool:
        return (job["runtime"] == "executorch" and self.profile is not None
                and self.profile.executorch_runner is ExecuTorchRunner.NATIVE)

    def _runner_dir(self, job: dict) -> Path | None:
        if not self._native(job):
            return None
        assert self.profile is not None  # _native needs one
        arch = HOST_ARCH if self.profile.arch in ("host", HOST_ARCH) else self.profile.arch
        return build_runner(arch, progress=lambda _m: None)

    def _with_runner(self, job: dict, remote: str, bundle_at: str | None = None) -> dict:
        job = dict(job, bundle=bundle_at or f"{remote}/bundle")
        if self._native(job):
            assert self.profile is not None  # _native needs one
            job["executorch_runner"] = [*self.profile.exec_wrapper, f"{remote}/runner/bin/{BINARY}"]
        return job


class SshRunner(_Device):
    name = "ssh"

    def __init__(self, spec: TransportSpec, timeout_s: float = 3600, profile: DeviceProfile | None = None):
        super().__init__(profile)
        self.spec = spec
        self.timeout_s = timeout_s

    def _ssh(self, command: str, **kwargs) -> subprocess.CompletedProcess:
        spec = self.spec
        args = ["ssh", "-p", str(spec.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
        if spec.identity:
            args += ["-i", str(Path(spec.identity).expanduser())]
        for key, value in spec.options.items():
            args += ["-o", f"{key}={value}"]
        target = f"{spec.user}@{spec.host}" if spec.user else spec.host
        try:
            return subprocess.run([*args, target, command], timeout=self.timeout_s, **kwargs)
        except subprocess.TimeoutExpired:
            raise RankdownError(f"ssh {target}: no answer within {self.timeout_s:.0f} s") from None

    def _checked(self, command: str, what: str, **kwargs) -> subprocess.CompletedProcess:
        proc = self._ssh(command, capture_output=True, **kwargs)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
            last = (err.strip().splitlines() or [""])[-1]
            raise RankdownError(f"ssh {self.spec.host}: {what} failed (exit status {proc.returncode}): {last}")
        return proc

    def run(self, job: dict, bundle: Path) -> tuple[dict, dict]:
        remote = f"{self.spec.remote_dir.rstrip('/')}/{uuid.uuid4().hex}"
        q = shlex.quote
        job = self._with_runner(job, remote)
        self._checked(f"mkdir -p {q(remote)} && tar -C {q(remote)} -xf -", "pushing the bundle",
                      input=_push_archive(bundle, job, self._runner_dir(job)))
        try:
            proc = self._ssh(f"cd {q(remote)}/harness && PYTHONPATH={_pythonpath(self.spec)} "
                             f"{q(self.spec.python)} -m rankdown.validate.on_device {q(remote)}/job.json {q(remote)}/out",
                             capture_output=True, text=True)
            with tempfile.TemporaryDirectory(prefix="rankdown-pull-") as tmp:
                out = Path(tmp) / "out"
                out.mkdir()
                if proc.returncode == 0:
                    pulled = self._checked(f"tar -C {q(remote)}/out -cf - .", "pulling the result")
                    with tarfile.open(fileobj=io.BytesIO(pulled.stdout)) as tar:
                        tar.extractall(out, filter="data")  # refuses links and paths out of ``out``
                return read_outputs(proc.returncode, proc.stderr, out, job, bundle)
        finally:
            self._ssh(f"rm -rf {q(remote)}", capture_output=True)


def _pythonpath(spec: TransportSpec) -> str:
    return shlex.quote("." + (f":{spec.pythonpath}" if spec.pythonpath else ""))


_EXIT_MARK = "rankdown-exit-status="


class AdbRunner(_Device):
    """Android over adb: push to /data/local/tmp, run with the device's Python, pull. The
    commands are the ones adb documents (push with several sources into a folder, shell,
    pull); the exit status travels as a marker line because old adb servers drop it."""

    name = "adb"

    def __init__(self, spec: TransportSpec, timeout_s: float = 3600, profile: DeviceProfile | None = None):
        super().__init__(profile)
        self.spec = spec
        self.timeout_s = timeout_s

    def _adb(self, *args: str, what: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [self.spec.adb, *(["-s", self.spec.serial] if self.spec.serial else []), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        except FileNotFoundError:
            raise RankdownError(f"adb: {self.spec.adb} not found (install Android platform-tools or set "
                                "transport.adb in the profile)") from None
        except subprocess.TimeoutExpired:
            raise RankdownError(f"adb: {what} did not finish within {self.timeout_s:.0f} s") from None
        if check and proc.returncode != 0:
            last = ((proc.stderr or proc.stdout).strip().splitlines() or [""])[-1]
            raise RankdownError(f"adb {self.spec.serial or ''}: {what} failed (exit status {proc.returncode}): {last}".replace("  ", " "))
        return proc

    def run(self, job: dict, bundle: Path) -> tuple[dict, dict]:
        remote = f"{self.spec.remote_dir.rstrip('/')}/{uuid.uuid4().hex}"
        q = shlex.quote
        job = self._with_runner(job, remote)
        with tempfile.TemporaryDirectory(prefix="rankdown-adb-") as tmp:
            stage = Path(tmp) / "stage"
            _stage_dir(stage, bundle, job, self._runner_dir(job))
            self._adb("shell", f"mkdir -p {q(remote)}", what="creating the run folder")
            try:
                self._adb("push", *(str(p) for p in sorted(stage.iterdir())), remote + "/", what="pushing the bundle")
                if (stage / "runner").is_dir():
                    self._adb("shell", f"chmod 755 {q(remote)}/runner/bin/{BINARY}", what="marking the runner executable")
                proc = self._adb("shell", f"cd {q(remote)}/harness && PYTHONPATH={_pythonpath(self.spec)} "
                                 f"{q(self.spec.python)} -m rankdown.validate.on_device {q(remote)}/job.json "
                                 f"{q(remote)}/out; echo {_EXIT_MARK}$?", what="running the harness", check=False)
                status = _exit_status(proc)
                out = Path(tmp) / "out"
                if status == 0:
                    self._adb("pull", f"{remote}/out", str(out), what="pulling the result")
                else:
                    out.mkdir()
                return read_outputs(status, proc.stderr + proc.stdout, out, job, bundle)
            finally:
                self._adb("shell", f"rm -rf {q(remote)}", what="cleaning up", check=False)


def _exit_status(proc: subprocess.CompletedProcess) -> int:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_EXIT_MARK):
            return int(line[len(_EXIT_MARK):])
    return proc.returncode or 255


class Arm64EmuRunner(_Device):
    """The arm64-emu device (devices/arm64_emu.py): the run folder is pushed into the root's
    /tmp, and the harness runs in the root's arm64 Python under qemu-user."""

    name = "arm64-emu"
    emulated = True

    def __init__(self, profile: DeviceProfile | None = None, timeout_s: float = 3600):
        super().__init__(profile)
        self.timeout_s = timeout_s

    def _native(self, job: dict) -> bool:
        return job["runtime"] == "executorch"  # the root has no PyTorch, so no Python ExecuTorch

    def _runner_dir(self, job: dict) -> Path | None:
        return build_runner("aarch64", progress=lambda _m: None) if self._native(job) else None

    def run(self, job: dict, bundle: Path) -> tuple[dict, dict]:
        from rankdown.devices.arm64_emu import SITE, find_root

        root = find_root(self.profile.transport.cpu if self.profile is not None else None)
        # Host paths throughout: qemu's -L maps a guest path into the root only when it exists
        # there, so a file the harness creates under a guest path would land on the host's /tmp.
        host = root.path / "tmp" / "rankdown" / uuid.uuid4().hex
        job = self._with_runner(job, str(host))
        if "executorch_runner" in job:
            # qemu-user runs one arm64 program; the harness starts the runner through a second one.
            job["executorch_runner"] = [*root.exec_prefix(), *job["executorch_runner"]]
        try:
            _stage_dir(host, bundle, job, self._runner_dir(job))
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                   "PYTHONPATH": f"{host / 'harness'}:{root.path / SITE.lstrip('/')}"} | root.env()
            try:
                proc = subprocess.run(root.python(["-m", "rankdown.validate.on_device", str(host / "job.json"),
                                                   str(host / "out")]),
                                      cwd=host / "harness", env=env, capture_output=True, text=True,
                                      timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise RankdownError(f"arm64-emu: {job['runtime']} did not finish in {self.timeout_s:.0f} s") from None
            with tempfile.TemporaryDirectory(prefix="rankdown-pull-") as tmp:
                out = Path(tmp) / "out"
                if proc.returncode == 0:
                    shutil.copytree(host / "out", out)
                else:
                    out.mkdir()
                return read_outputs(proc.returncode, proc.stderr, out, job, bundle)
        finally:
            shutil.rmtree(host, ignore_errors=True)


def runner_for(profile: DeviceProfile):
    kind = profile.transport.kind
    if kind is Transport.LOCAL:
        if profile.executorch_runner is ExecuTorchRunner.NATIVE and "executorch" in profile.runtimes:
            built = build_runner(HOST_ARCH, progress=lambda _m: None)
            return LocalRunner(executorch_runner=[*profile.exec_wrapper, str(built / "bin" / BINARY)],
                               device=profile.name)
        return LocalRunner(device=profile.name)
    if kind is Transport.SSH:
        return SshRunner(profile.transport, profile=profile)
    if kind is Transport.ADB:
        return AdbRunner(profile.transport, profile=profile)
    if kind is Transport.ARM64_EMU:
        return Arm64EmuRunner(profile)
    raise RankdownError(f"{profile.source}: transport {kind.value} has no runner")
