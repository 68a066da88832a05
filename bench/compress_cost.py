"""Compression cost at real Llama shapes (random weights: time and memory, not quality).

``--shape 1b`` (the default) builds a synthetic checkpoint with Llama-3.2-1B's shapes (hidden
2048, MLP 8192, 32/8 heads, vocab 128256, tied embeddings) and ``--layers`` decoder layers,
compresses it layer by layer, and reports seconds per layer and peak RSS against the size on
disk, so that the cost of the full 16 layers (and of larger models) can be read off it.
``--shape 8b`` is Llama-3.1-8B's (hidden 4096, MLP 14336, 32/8 heads, vocab 128256, untied
head), read off for its 32 layers; ``--shape tiny`` is a seconds-long check of the bench itself.

``--workers 1,2`` runs one compression per worker count (``rankdown compress --workers N``,
the same cores shared out among the workers) and reports for each: seconds per layer, peak
RSS per worker (the largest over the workers) and the bytes all-reduced and broadcast per
layer (counted by compress/distributed.py and printed in worker 0's progress lines).

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
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=2048, num_hidden_layers=32)
# The shipped tokenizer's 4,096 ids fit every shape's vocabulary.
TINY = dict(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=4096, tie_word_embeddings=False, max_position_embeddings=2048, num_hidden_layers=6)
SHAPES = {"1b": LLAMA_32_1B, "8b": LLAMA_31_8B, "tiny": TINY}
LAYER_LINE = re.compile(r"layer \d+/\d+ compressed in ([\d.]+) s .*?(?:; ([\d.]+) MiB all-reduced, ([\d.]+) MiB broadcast by worker 0)?\)$")


def svd_work(hidden: int, mlp: int, kv: int) -> float:
    """Sum of m n min(m, n) over a layer's seven matrices: what dense SVD time scales with."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden), (hidden, mlp)]
    return float(sum(m * n * min(m, n) for m, n in shapes))


def _layer_params(config: LlamaConfig) -> int:
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    return 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * mlp + 2 * hidden  # + the two norms


def _run(model: Path, out: Path, method: str, calib_tokens: int, workers: int) -> dict:
    """One ``rankdown compress`` in a fresh process: its per-layer lines and its report."""
    per_layer: list[float] = []
    reduced: list[float] = []
    broadcast: list[float] = []
    start = time.perf_counter()
    command = [sys.executable, "-m", "rankdown.cli", "compress", str(model), "-o", str(out), "--method", method,
               "--ratio", "0.4", "--task", "prose", "--calib-tokens", str(calib_tokens), "--workers", str(workers),
               "--device", "cpu", "--heal-steps", "0", "--allocate", "uniform", "--overwrite"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert proc.stderr is not None  # stderr=PIPE
    for message in proc.stderr:
        match = LAYER_LINE.match(message.rstrip("\n"))
        if match:
            per_layer.append(float(match.group(1)))
            if match.group(2) is not None:
                reduced.append(float(match.group(2)))
                broadcast.append(float(match.group(3)))
        print(message, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"compress --workers {workers} failed with exit status {proc.returncode}")
    report = CompressionReport.read(out)
    return {"workers": workers, "seconds_per_layer": round(sum(per_layer) / len(per_layer), 2),
            "total_seconds": round(time.perf_counter() - start, 1), "peak_rss_mb_per_worker": report.peak_memory_mb,
            "all_reduced_mb_per_layer": round(sum(reduced) / len(reduced), 1) if reduced else 0.0,
            "broadcast_mb_per_layer": round(sum(broadcast) / len(broadcast), 1) if broadcast else 0.0,
            "calibration_loss": report.calibration_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--workers", default="1", help="comma-separated worker counts, one compression each")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    shape = SHAPES[args.shape]
    torch.set_num_threads(os.cpu_count() or 2)
    work = Path(tempfile.mkdtemp(prefix="rankdown-cost-"))
    try:
        config = LlamaConfig(**(shape | {"num_hidden_layers": args.layers}), bos_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        with torch.no_grad():
            # Built in fp16 directly: an fp32 8B-shape embedding and head alone would be 4 GB.
            model = LlamaForCausalLM._from_config(config, torch_dtype=torch.float16)
        model.save_pretrained(work / "model", safe_serialization=True)
        del model
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(SHIPPED_MODEL / name, work / "model" / name)
        size_mb = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors")) / 2**20
        layer_mb = _layer_params(config) * 4 / 2**20
        rows = [_run(work / "model", work / "out", args.method, args.calib_tokens, n) for n in counts]
        full_layers = shape["num_hidden_layers"]
        bound = 2 * size_mb + layer_mb
        # The same bound for the whole model (fp16 on disk), from this run's sizes: streaming holds
        # one layer at a time, so the peak does not grow with the layer count.
        full_disk = size_mb + (full_layers - args.layers) * layer_mb / 2
        for row in rows:
            row |= {"within_bound": row["peak_rss_mb_per_worker"] < bound,
                    f"estimate_full_{full_layers}_layers_s": round(full_layers * row["seconds_per_layer"], 1)}
        result = {
            "shape": args.shape, "method": args.method, "layers": args.layers, "cores": os.cpu_count(),
            "calibration_tokens": args.calib_tokens, "checkpoint_mb": round(size_mb, 1),
            "layer_fp32_mb": round(layer_mb, 1), "bound_mb": round(bound, 1),
            "full_model_disk_mb": round(full_disk, 1), "full_model_bound_mb": round(2 * full_disk + layer_mb, 1),
            "rows": rows,
        }
        if args.shape == "1b":
            mean = rows[0]["seconds_per_layer"]
            result["estimate_7b_layers_s"] = round(32 * mean * svd_work(4096, 11008, 4096) / svd_work(2048, 8192, 512), 1)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
