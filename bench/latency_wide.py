"""Decode speed-up where weights dominate: Llama-3.2-1B-wide layers, random weights, ONNX.

The shipped model is too small for decode to be bound by weight bytes (see latency.md).
This builds a 2-layer model with the 1B model's layer shapes (hidden 2048, MLP 8192, 32/8
heads; a small vocabulary so the head does not dominate), compresses it with plain SVD
(speed does not depend on which factors are kept), exports ONNX and times decoding.
Writes bench/results/latency_wide.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                             num_hidden_layers=args.layers, vocab_size=len(tokenizer), max_position_embeddings=512,
                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        LlamaForCausalLM(config).save_pretrained(root / "dense", safe_serialization=True)
        tokenizer.save_pretrained(root / "dense")
        compress(root / "dense", root / "svd", CompressConfig(method="svd", ratio=args.ratio, allocate="uniform", healing=Healing(steps=0)),
                 progress=print)
        bundles = {}
        for label in ("dense", "svd"):
            bundles[label] = root / f"bundle-{label}"
            export(root / label, bundles[label], ExportConfig(formats="onnx"), progress=print)
        plan = LatencyPlan(prompt_lengths=(32, 128), decode_tokens=64, repeats=3)
        job = {"schema_version": JOB_SCHEMA, "threads": args.threads, "latency": latency_job(tokenizer, plan, 512),
               "runtime": Runtime.ONNXRUNTIME.value, "artifact": Runtime.ONNXRUNTIME.artifact}
        rates: dict[str, list[float]] = {label: [] for label in bundles}
        ttft: dict[str, list[float]] = {label: [] for label in bundles}
        for _ in range(args.rounds):
            for label, bundle in bundles.items():
                result, _ = LocalRunner().run(job, bundle)
                rates[label].append(result["latency"]["decode_tokens_per_s"]["median"])
                ttft[label].append(result["latency"]["ttft_ms"]["128"]["median"])
                print(label, rates[label][-1], flush=True)
        manifests = {label: Manifest.read(b) for label, b in bundles.items()}
    head = 4 * config.vocab_size * config.hidden_size
    weight_bytes = {k: 4 * m.model.decoder_linear_params + head for k, m in manifests.items()}
    ideal = weight_bytes["dense"] / weight_bytes["svd"]
    dense, svd = statistics.median(rates["dense"]), statistics.median(rates["svd"])
    lines = [f"{args.layers} layers of Llama-3.2-1B width, vocab {config.vocab_size}, onnxruntime fp32, "
             f"threads {args.threads}, {args.rounds} interleaved rounds", "",
             "| model | weight MiB read per token | decode tok/s | TTFT 128 ms | speed-up | ideal | of ideal |",
             "|---|---|---|---|---|---|---|",
             f"| dense | {weight_bytes['dense'] / 2**20:.0f} | {dense:.2f} | {statistics.median(ttft['dense']):.0f} | "
             f"1.00x | 1.00x | 1.00 |",
             f"| svd {args.ratio} | {weight_bytes['svd'] / 2**20:.0f} | {svd:.2f} | {statistics.median(ttft['svd']):.0f} | "
             f"{svd / dense:.2f}x | {ideal:.2f}x | {svd / dense / ideal:.2f} |"]
    table = "\n".join(lines) + "\n"
    (RESULTS / "latency_wide.md").write_text("# Decode speed-up at 1B layer width (`python -m bench.latency_wide`)\n\n"
                                             + table)
    print(table)


if __name__ == "__main__":
    main()
