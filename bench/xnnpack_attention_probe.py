"""An experiment, not a product path: export a checkpoint's ExecuTorch bundle with the attention as
ops XNNPACK takes instead of ExecuTorch's ``llama::custom_sdpa``, to time the two side by side.

The keys and values stay in static caches that ``llama::update_cache`` writes in place, laid out
[kv head, position, 1, head dim], so that each kv head's cache is a [position, head dim] matrix
for a batched matmul: scores as K @ Q^T over the whole cache (nothing the size of the cache is
transposed), a causal mask from the positions, softmax, then P @ V. The export's own attention
hooks (export/et_attention.py) are swapped for this one for the run; everything else (int4,
self-check, manifest) is the normal export.

    python -m bench.xnnpack_attention_probe CHECKPOINT OUT [--quantize int4]

Measured (docs/measurements.md, "Where the attention's time goes"): prefill faster, decode slower at a cache
of 256, since every token reads the whole cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import rankdown.export.et_attention as ea
from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.pipeline import export


class Cache(torch.nn.Module):
    def __init__(self, max_len, kv_heads, head_dim, dtype):
        super().__init__()
        shape = (kv_heads, max_len, 1, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)


def xnnpack_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    start_pos, mask = kwargs[ea.START_POS], kwargs["et_mask"]
    cache = getattr(module, ea.CACHE_CHILD)
    kvh, length, _, d = cache.k_cache.shape
    _, hq, n, _ = query.shape
    g = hq // kvh
    torch.ops.llama.update_cache(key[0].unsqueeze(2).contiguous(), cache.k_cache, start_pos)
    torch.ops.llama.update_cache(value[0].unsqueeze(2).contiguous(), cache.v_cache, start_pos)
    keys, values = cache.k_cache.view(kvh, length, d), cache.v_cache.view(kvh, length, d)
    grouped = query.reshape(kvh, g * n, d)
    scores = torch.bmm(keys, grouped.transpose(1, 2)).transpose(1, 2)
    scores = scores.reshape(kvh, g, n, length) * scaling + mask
    out = torch.bmm(torch.softmax(scores.reshape(kvh, g * n, length), dim=-1), values)
    return out.view(1, hq, n, d).transpose(1, 2), None


def attention_kwargs(self, start_pos, positions) -> dict:
    """The start position, and the causal mask over the whole cache for these positions."""
    columns = torch.arange(self.max_len, dtype=torch.long)
    mask = torch.where(columns.unsqueeze(0) <= positions.unsqueeze(1), 0.0, float("-inf"))
    return {ea.START_POS: start_pos, "et_mask": mask}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--quantize", default="int4", choices=("none", "int4"))
    args = parser.parse_args(argv)
    # Swapped for this process only: the export reads these module attributes when it traces.
    ea.KVCache = Cache
    ea.custom_sdpa_attention = xnnpack_attention
    ea.CustomOpsSignature.attention_kwargs = attention_kwargs
    try:
        export(args.checkpoint, args.out, ExportConfig(formats="executorch", quantize=args.quantize))
    except RankdownError as error:  # a user's mistake: one line, as the CLI says it
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
