"""Llama's ``rotate_half`` as one matmul by a constant signed permutation, for the ExecuTorch graph.

transformers' ``rotate_half(x)`` is ``cat(-x[..., h:], x[..., :h])``: two slices, a negation and
a concatenation for the queries and again for the keys, each a separate XNNPACK operator in every
layer, and a slice of a few hundred floats still pays a thread-pool dispatch. ``x @ P``, with
``P`` the [head_dim, head_dim] matrix that moves and negates the halves, is the same numbers
(every output is one input times +1 or -1 plus zeros) in one fully-connected operator. Measured
on SmolLM2-135M at 40% + head 128, int4, rankdown-et-runner, 2 threads: decode 1.034x (8 rounds
interleaved, 1.011-1.074; docs/measurements.md, "Run x" under Beside the peers). Used for int4 only: the 40%
model in fp32 measured 0.965x (6 rounds, 0.924-1.040), and int8 quantizes every traced linear.

Hooked for the duration of the export, not a copy of the model: transformers' module-level
``rotate_half`` (which its ``apply_rotary_pos_emb`` calls) is swapped, and ``P`` is a
non-persistent buffer of the model's rotary-embedding module, so that torch.export sees a buffer
of the traced model rather than a constant it would have to lift.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers.models.llama.modeling_llama as llama

BUFFER = "rankdown_rotate_half"


def rotate_half_matrix(head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W`` with ``F.linear(x, W) == cat(-x[..., h:], x[..., :h])`` for ``h = head_dim // 2``."""
    if head_dim % 2:
        raise ValueError(f"rotary head dim must be even, got {head_dim}")
    half = head_dim // 2
    weight = torch.zeros(head_dim, head_dim, dtype=dtype)  # [out, in], as F.linear takes it
    index = torch.arange(half)
    weight[index, index + half] = -1.0
    weight[index + half, index] = 1.0
    return weight


@contextmanager
def matmul_rotary(model) -> Iterator[None]:
    """While inside: transformers' Llama ``rotate_half`` runs as one matmul by ``model``'s own
    buffer (for any Llama traced meanwhile: use it around one trace at a time). Restored on exit."""
    holder = model.model.rotary_emb
    rotated = 2 * holder.inv_freq.numel()  # the width rotate_half is given: one frequency per pair
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    holder.register_buffer(BUFFER, rotate_half_matrix(rotated, dtype), persistent=False)
    stock = llama.rotate_half

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, getattr(holder, BUFFER))

    llama.rotate_half = rotate_half
    try:
        yield
    finally:
        llama.rotate_half = stock
        delattr(holder, BUFFER)
