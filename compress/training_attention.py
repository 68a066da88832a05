"""Attention in float32 while healing runs its passes under bfloat16 autocast on a CPU.

Autocast sends ``scaled_dot_product_attention`` to bfloat16, and PyTorch's CPU flash kernel is
slower there than in float32 at healing's shapes (SmolLM2, 4 windows x 9 heads x 128 tokens x 64:
forward and backward about 3x float32's time alone; in a profiled step 0.44 s of 2.0 s in bfloat16,
0.29 s in float32, though whole steps timed interleaved differ within the machine's noise).
Attention is a small share of the FLOPs, so its float32 products cost little and are the more
exact ones. The function is registered in transformers' ``AttentionInterface`` and set on the
model for the duration only, as the ExecuTorch export's attention is (no copied code).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

NAME = "rankdown_sdpa_fp32"  # the name registered in transformers' AttentionInterface


def _sdpa_float32(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():  # an additive mask, as given
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                 **kwargs)
    return output.to(dtype), weights


@contextmanager
def float32_attention(model, enabled: bool = True) -> Iterator[None]:
    """While inside: ``model`` attends with sdpa in float32 (masks as sdpa's); restored on exit."""
    if not enabled:
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _sdpa_float32)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
