"""Transports that run the device half of the harness (runtime_tests.on_device) on a device.

Each runner has the LocalRunner's ``run(job, bundle) -> (result, arrays)``: it ships the
bundle and the harness's device-side files (numpy + runtime only, no PyTorch model code),
runs ``python -m runtime_tests.on_device`` there, and brings ``result.json`` and
``logits.npz`` back. References and comparisons stay on the host.
"""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

import export
import export.decoding
import runtime_tests
import runtime_tests.on_device
from rankdown.errors import RankdownError
from runtime_tests.local_runner import LocalRunner, read_outputs

from devices.profile import DeviceProfile, Transport, TransportSpec

# Everything the device needs besides python3, numpy and the runtime.
HARNESS_MODULES = (export, export.decoding, runtime_tests, runtime_tests.on_device)


def harness_files() -> dict[str, Path]:
    """Archive name -> file: the device half of the harness, as importable packages."""
    files = {}
    for module in HARNESS_MODULES:
        path = Path(module.__file__)
        package = module.__name__.split(".")[0]
        files[f"{package}/{path.name}"] = path
    return files


def _push_archive(bundle: Path, job: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(Path(bundle).rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=f"bundle/{path.relative_to(bundle).as_posix()}", recursive=False)
        for name, path in harness_files().items():
            tar.add(path, arcname=f"harness/{name}", recursive=False)
        data = json.dumps(job).encode()
        info = tarfile.TarInfo("job.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class SshRunner:
    name = "ssh"
    emulated = False

    def __init__(self, spec: TransportSpec, timeout_s: float = 3600):
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
        job = dict(job, bundle=f"{remote}/bundle")
        self._checked(f"mkdir -p {q(remote)} && tar -C {q(remote)} -xf -", "pushing the bundle",
                      input=_push_archive(bundle, job))
        try:
            proc = self._ssh(f"cd {q(remote)}/harness && PYTHONPATH=. {q(self.spec.python)} -m runtime_tests.on_device "
                             f"{q(remote)}/job.json {q(remote)}/out", capture_output=True, text=True)
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


def runner_for(profile: DeviceProfile):
    if profile.transport.kind is Transport.LOCAL:
        return LocalRunner()
    if profile.transport.kind is Transport.SSH:
        return SshRunner(profile.transport)
    raise RankdownError(f"{profile.source}: transport {profile.transport.kind.value} has no runner")
