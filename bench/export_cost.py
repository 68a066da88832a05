"""Export times and bundle sizes: the shipped model dense vs compressed, fp32 vs int8.

Each export runs the full pipeline (both formats, node counts, parity self-check), so the
seconds are what a user waits for. Writes bench/results/export_cost.md.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

from rankdown.compress.config import CompressConfig, Healing
from rankdown.compress.pipeline import compress
from rankdown.export.config import ExportConfig
from rankdown.export.pipeline import export
from rankdown.shipped import SHIPPED_MODEL

RESULTS = Path(__file__).parent / "results"


def _progress(tag: str, message: str) -> None:
    print(f"  [{tag}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--out", type=Path, default=RESULTS / "export_cost.md")
    args = parser.parse_args()
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        compress(SHIPPED_MODEL, root / "feature", CompressConfig(method="feature", ratio=args.ratio, task="math", allocate="uniform",
                                                                  healing=Healing(steps=0)),
                 progress=lambda _m: None)
        for label, source in (("dense", SHIPPED_MODEL), (f"feature {args.ratio}", root / "feature")):
            for quantize in ("none", "int8"):
                start = time.perf_counter()
                manifest = export(source, root / f"b-{len(rows)}", ExportConfig(quantize=quantize),
                                  progress=functools.partial(_progress, f"{label} {quantize}"))
                wall = time.perf_counter() - start
                for name, entry in manifest.formats.items():
                    rows.append((label, quantize, name, sum(f.bytes for f in entry.files.values()) / 2**20,
                                 entry.export_seconds, entry.parity.max_abs_logit_diff, entry.parity.top1_agreement,
                                 entry.parity.greedy_match, wall))
    lines = ["| model | weights | format | size MiB | export s | max abs logit diff | top-1 | greedy 32 | total s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, q, name, mib, secs, diff, top1, greedy_ok, wall in rows:
        lines.append(f"| {label} | {'fp32' if q == 'none' else q} | {name} | {mib:.2f} | {secs:.1f} | {diff:.2e} | "
                     f"{top1:.1%} | {'identical' if greedy_ok else 'differs'} | {wall:.1f} |")
    table = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Export cost (`make bench-export`)\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
