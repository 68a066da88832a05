"""Run the device half of the harness on this machine, in a child process.

A child process keeps each runtime's peak memory its own, and a runtime that crashes on a
bad artifact takes down the child, not the harness. Remote runners (devices/) implement the
same ``run(job, bundle)``: push, run ``python -m rankdown.validate.on_device``, pull.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from rankdown.errors import RankdownError


class LocalRunner:
    name = "local"
    emulated = False

    def __init__(self, timeout_s: float = 3600, executorch_runner: list[str] | None = None, device: str = "local"):
        self.timeout_s = timeout_s
        self.device = device  # the device profile's name in report.json; "local" without one
        self.executorch_runner = executorch_runner  # argv of rankdown-et-runner; None: ExecuTorch's Python runtime

    def run(self, job: dict, bundle: Path) -> tuple[dict, dict[str, np.ndarray]]:
        with tempfile.TemporaryDirectory(prefix="rankdown-job-") as tmp:
            job_path = Path(tmp) / "job.json"
            job = dict(job, bundle=str(Path(bundle).resolve()))
            if self.executorch_runner and job["runtime"] == "executorch":
                job["executorch_runner"] = list(self.executorch_runner)
            job_path.write_text(json.dumps(job), encoding="utf-8")
            out = Path(tmp) / "out"
            try:
                proc = subprocess.run([sys.executable, "-m", "rankdown.validate.on_device", str(job_path), str(out)],
                                      capture_output=True, text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise RankdownError(f"{bundle / job['artifact']}: {job['runtime']} did not finish in "
                                    f"{self.timeout_s:.0f} s") from None
            return read_outputs(proc.returncode, proc.stderr, out, job, bundle)


def read_outputs(returncode: int, stderr: str, out: Path, job: dict, bundle: Path) -> tuple[dict, dict]:
    """The device half's result, or a one-line error naming the artifact and what went wrong."""
    if returncode != 0 or not (out / "result.json").is_file():
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        how = f"exit status {returncode}" if returncode >= 0 else f"killed by signal {-returncode}"
        raise RankdownError(f"{bundle / job['artifact']}: {job['runtime']} failed ({how}): {reason.strip()}")
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    with np.load(out / "logits.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return result, arrays
