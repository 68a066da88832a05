"""A checkpoint's compression.json in one line, for `rankdown info`."""

from __future__ import annotations

from pathlib import Path

from rankdown.compress.config import REPORT_FILE, CompressionReport


def made_by(folder: Path) -> str | None:
    """compress's recipe for the checkpoint in ``folder``: method, ranks, data, healing, the weights
    it was made for; None for a folder compress did not write."""
    if not (Path(folder) / REPORT_FILE).is_file():
        return None
    report = CompressionReport.read(Path(folder))
    calib = report.config.get("calib_tokens")
    data = f"task {report.task}" if "/" not in report.task else report.task  # a --calib file: its path
    parts = [f"{report.method}{'' if report.basis_mode in (None, 'closed-form') else ' ' + report.basis_mode}",
             f"{report.allocate} ranks", data + ("" if calib is None else f", up to {calib:,} calibration tokens")]
    if report.healing is not None:
        h = report.healing
        parts.append(f"healed {h.steps} steps{'' if h.quantize == 'none' else ' through ' + h.quantize} "
                     f"(held-back loss {h.loss_before:.4f} -> {h.loss_after:.4f})")
    else:
        parts.append("not healed")
    if report.head is not None:
        parts.append(f"head at rank {report.head.rank}")
    parts.append(f"for {report.weights} weights")
    return "compress " + ", ".join(parts)
