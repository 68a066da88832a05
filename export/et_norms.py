"""Llama's RMSNorm in a form XNNPACK delegates whole: the mean of squares as a 2-D average pool.

transformers' ``LlamaRMSNorm`` takes ``pow(2).mean(-1)`` of a 3-D tensor, and ExecuTorch's XNNPACK
partitioner delegates ``mean.dim`` only over the two inner dimensions of a 4-D tensor (it lowers to
global average pooling). So every norm runs ``mean`` in the portable kernels and splits the layer's
XNNPACK work in two around it: two extra delegate calls per layer and token. Viewing the squares as
``[1, tokens, 1, hidden]`` and averaging dims 2 and 3 is the same mean, and XNNPACK takes it.

Hooked into the stock modules for the duration of the export (their ``forward`` is replaced on the
instance, so parameter names do not change), not a copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm


def _pooled_forward(self: LlamaRMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    width = x.shape[-1]
    variance = x.pow(2).reshape(1, -1, 1, width).mean((2, 3), keepdim=True).reshape(*x.shape[:-1], 1)
    x = x * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * x.to(input_dtype)


@contextmanager
def pooled_norms(model: torch.nn.Module) -> Iterator[int]:
    """While inside, every ``LlamaRMSNorm`` of ``model`` averages through a 4-D mean; yields how
    many. Restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    try:
        for norm in norms:
            norm.forward = MethodType(_pooled_forward, norm)  # type: ignore[method-assign]
        yield len(norms)
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)
