"""Compression cost at real Llama-3.2-1B shape (random weights: time and memory, not quality).

Builds a synthetic checkpoint with the 1B model's shapes (hidden 2048, MLP 8192, 32/8
heads, vocab 128256, tied embeddings) and ``--layers`` decoder layers, compresses it
layer by layer, and reports seconds per layer and peak RSS against the size on disk, so
that the cost of the full 16 layers (and of larger models) can be read off it.

The compression runs in a fresh process (``rankdown compress``), so its peak RSS is the
compressor's own, not the benchmark's (building the synthetic model costs more than that).
The memory target: peak RSS < 2 x the checkpoint's size on disk + one decoder layer's
weights in float32 (the working precision).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rankdown.compress.config import CompressionReport
from rankdown.shipped import SHIPPED_MODEL

LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=2048, num_hidden_layers=16)


def svd_work(hidden: int, mlp: int, kv: int) -> float:
    """Sum of m n min(m, n) over a layer's seven matrices: what dense SVD time scales with."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden), (hidden, mlp)]
    return float(sum(m * n * min(m, n) for m, n in shapes))


def _layer_params(config: LlamaConfig) -> int:
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    return 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * mlp + 2 * hidden  # + the two norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    work = Path(tempfile.mkdtemp(prefix="rankdown-cost-"))
    try:
        config = LlamaConfig(**(LLAMA_32_1B | {"num_hidden_layers": args.layers}), bos_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        with torch.no_grad():
            model = LlamaForCausalLM(config).half()
        model.save_pretrained(work / "model", safe_serialization=True)
        del model
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(SHIPPED_MODEL / name, work / "model" / name)
        size_mb = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors")) / 2**20
        layer_mb = _layer_params(config) * 4 / 2**20
        per_layer: list[float] = []
        start = time.perf_counter()
        command = [sys.executable, "-m", "rankdown.cli", "compress", str(work / "model"), "-o", str(work / "out"),
                   "--method", args.method, "--ratio", "0.4", "--task", "prose", "--calib-tokens", str(args.calib_tokens)]
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
        assert proc.stderr is not None  # stderr=PIPE
        for message in proc.stderr:
            match = re.match(r"layer \d+/\d+ compressed in ([\d.]+) s", message)
            if match:
                per_layer.append(float(match.group(1)))
            print(message, end="", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"compress failed with exit status {proc.returncode}")
        total = time.perf_counter() - start
        report = CompressionReport.read(work / "out")
        mean = sum(per_layer) / len(per_layer)
        w7b = svd_work(4096, 11008, 4096)
        w1b = svd_work(2048, 8192, 512)
        bound = 2 * size_mb + layer_mb
        # The same bound for the whole 16-layer model (fp16 on disk), from this run's sizes: streaming
        # holds one layer at a time, so the peak does not grow with the layer count and this is the
        # bound that a full Llama-3.2-1B is held to.
        full_disk = size_mb + (LLAMA_32_1B["num_hidden_layers"] - args.layers) * layer_mb / 2
        full_bound = 2 * full_disk + layer_mb
        result = {
            "method": args.method, "layers": args.layers, "threads": torch.get_num_threads(),
            "calibration_tokens": args.calib_tokens, "checkpoint_mb": round(size_mb, 1),
            "seconds_per_layer": round(mean, 2), "total_seconds": round(total, 1),
            "peak_rss_mb": report.peak_memory_mb, "layer_fp32_mb": round(layer_mb, 1),
            "bound_mb": round(bound, 1), "within_bound": report.peak_memory_mb < bound,
            "full_16_layer_disk_mb": round(full_disk, 1), "full_16_layer_bound_mb": round(full_bound, 1),
            "estimate_full_1b_layers_s": round(16 * mean, 1),
            "estimate_7b_layers_s": round(32 * mean * w7b / w1b, 1),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
