"""Llama's RMSNorm in a form XNNPACK delegates whole: the mean of squares as a 2-D average pool.

transformers' ``LlamaRMSNorm`` takes ``pow(2).mean(-1)`` of a 3-D tensor, and ExecuTorch's XNNPACK
partitioner delegates ``mean.dim`` only over the two inner dimensions of a 4-D tensor (it lowers to
global average pooling). So every norm runs ``mean`` in the portable kernels and splits the layer's
XNNPACK work in two around it: two extra delegate calls per layer and token. Viewing the squares as
``[1, tokens, 1, hidden]`` and averaging dims 2 and 3 is the same mean, and XNNPACK takes it.

With ``as_linear`` (int4, where no quantizer takes the traced graph's linears), the mean of squares
plus epsilon is one fully-connected operator instead: ``linear(x * x, full(1 / hidden), bias=eps)``,
five XNNPACK operators per norm where the pooled form runs eight (two reshapes, the pool, the add).
Each operator costs the delegate a reshape and setup on every call, whatever its size. With
export/et_views.py's ``drop_unit_reshapes``, measured on SmolLM2-135M at 40% + head 128, int4,
rankdown-et-runner, 2 threads: decode 1.028x (12 rounds interleaved; docs/measurements.md, "Run z" under
Beside the peers).

Hooked into the stock modules for the duration of the export (their ``forward`` is replaced on the
instance, so parameter names do not change; the linear's constants are non-persistent buffers of
each norm, removed on exit), not a copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

MEAN_BUFFER = "rankdown_mean_of_squares"  # [1, hidden] of 1 / hidden: the linear's weight
EPSILON_BUFFER = "rankdown_epsilon"  # [1]: its bias


def _pooled_forward(self: LlamaRMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    width = x.shape[-1]
    variance = x.pow(2).reshape(1, -1, 1, width).mean((2, 3), keepdim=True).reshape(*x.shape[:-1], 1)
    x = x * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * x.to(input_dtype)


def _linear_forward(self: LlamaRMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    variance = torch.nn.functional.linear(x * x, getattr(self, MEAN_BUFFER), getattr(self, EPSILON_BUFFER))
    x = x * torch.rsqrt(variance)
    return self.weight * x.to(input_dtype)


@contextmanager
def pooled_norms(model: torch.nn.Module, as_linear: bool = False) -> Iterator[int]:
    """While inside, every ``LlamaRMSNorm`` of ``model`` averages through a 4-D mean, or with
    ``as_linear`` through one linear; yields how many. Restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    try:
        for norm in norms:
            if as_linear:
                width = norm.weight.shape[-1]
                norm.register_buffer(MEAN_BUFFER, torch.full((1, width), 1.0 / width), persistent=False)
                norm.register_buffer(EPSILON_BUFFER, torch.tensor([float(norm.variance_epsilon)]), persistent=False)
            norm.forward = MethodType(_linear_forward if as_linear else _pooled_forward,  # type: ignore[method-assign]
                                      norm)
        yield len(norms)
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)
            for name in (MEAN_BUFFER, EPSILON_BUFFER):
                if name in norm._buffers:
                    delattr(norm, name)
