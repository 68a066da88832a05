"""Decode speed and time to first token: the shipped model dense vs compressed, both runtimes.

Compresses the shipped model (feature, for math) at each ratio, exports each to both formats,
then times every (model, runtime) pair in rounds, interleaved so machine drift hits all alike.
The ideal decode speed-up is the ratio of bytes read per token (decoder linears + the head,
which is not factorized); decode on a CPU is memory-bound, so that is its ceiling.
Writes bench/results/latency.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rankdown.checkpoint import load_tokenizer
from rankdown.compress.config import CompressConfig, Healing
from rankdown.compress.pipeline import compress
from rankdown.export.config import ExportConfig
from rankdown.export.manifest import Manifest
from rankdown.export.pipeline import export
from rankdown.shipped import SHIPPED_MODEL
from rankdown.validate.config import LatencyPlan, Runtime
from rankdown.validate.harness import latency_job
from rankdown.validate.local_runner import LocalRunner
from rankdown.validate.on_device import JOB_SCHEMA

RESULTS = Path(__file__).parent / "results"


def _linear_bytes(manifest: Manifest, hidden: int) -> int:
    """fp32 bytes a decode step reads from weights: decoder linears plus the output head."""
    return 4 * (manifest.model.decoder_linear_params + manifest.model.vocab_size * hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "latency.md")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    runner = LocalRunner()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundles = {}
        for ratio in [0.0, *ratios]:
            label = "dense" if ratio == 0 else f"feature {ratio}"
            source = SHIPPED_MODEL
            if ratio:
                source = root / f"ckpt-{ratio}"
                compress(SHIPPED_MODEL, source, CompressConfig(method="feature", ratio=ratio, task="math", allocate="uniform",
                                                                      healing=Healing(steps=0)),
                         progress=lambda _m: None)
            bundles[label] = root / f"bundle-{ratio}"
            export(source, bundles[label], ExportConfig(), progress=lambda m, lb=label: print(f"[{lb}] {m}", flush=True))
        tokenizer = load_tokenizer(SHIPPED_MODEL)
        plan = LatencyPlan(prompt_lengths=(32, 128), decode_tokens=128, repeats=3)
        job = {"schema_version": JOB_SCHEMA, "threads": args.threads, "latency": latency_job(tokenizer, plan, 256)}
        samples: dict[tuple[str, str], list[dict]] = {}
        for round_ in range(args.rounds):
            for label, bundle in bundles.items():
                for runtime in Runtime:
                    result, _ = runner.run(dict(job, runtime=runtime.value, artifact=runtime.artifact), bundle)
                    samples.setdefault((label, runtime.value), []).append(result)
                    print(f"round {round_ + 1} {label} {runtime.value}: "
                          f"{result['latency']['decode_tokens_per_s']['median']:.1f} tok/s", flush=True)
        manifests = {label: Manifest.read(b) for label, b in bundles.items()}
    hidden = 256
    dense_bytes = _linear_bytes(manifests["dense"], hidden)
    rows = []
    for (label, runtime), results in samples.items():
        decode = statistics.median(r["latency"]["decode_tokens_per_s"]["median"] for r in results)
        ttft32 = statistics.median(r["latency"]["ttft_ms"]["32"]["median"] for r in results)
        ttft128 = statistics.median(r["latency"]["ttft_ms"]["128"]["median"] for r in results)
        dense_decode = statistics.median(r["latency"]["decode_tokens_per_s"]["median"]
                                         for r in samples[("dense", runtime)])
        ideal = dense_bytes / _linear_bytes(manifests[label], hidden)
        fmt = Runtime(runtime).format
        rows.append({"model": label, "runtime": runtime, "decode_tokens_per_s": decode, "ttft_32_ms": ttft32,
                     "ttft_128_ms": ttft128, "size_mib": sum(f.bytes for f in manifests[label].formats[fmt].files.values()) / 2**20,
                     "speedup": decode / dense_decode, "ideal_speedup": ideal,
                     "of_ideal": (decode / dense_decode) / ideal if label != "dense" else 1.0,
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results)})
    lines = [f"threads {args.threads}, {args.rounds} interleaved rounds x 3 timed runs (median of medians)", "",
             "| model | runtime | decode tok/s | TTFT 32 ms | TTFT 128 ms | size MiB | speed-up | ideal | of ideal | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["runtime"], r["model"])):
        lines.append(f"| {r['model']} | {r['runtime']} | {r['decode_tokens_per_s']:.1f} | {r['ttft_32_ms']:.2f} | "
                     f"{r['ttft_128_ms']:.2f} | {r['size_mib']:.2f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                     f"{r['of_ideal']:.2f} | {r['peak_rss_mb']:.0f} |")
    table = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Decode latency (`make bench-latency`)\n\n" + table)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
