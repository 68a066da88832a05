"""Linears that read one input, run as one matmul over their first halves.

In a Llama layer Q, K and V read the same normed hidden state, and so do the MLP's gate and up.
When one of them is a factor pair, the builder's own QKV packing (dense weights concatenated) does
not apply, and each ``down`` runs as its own small matmul. Packing concatenates the first halves
instead: each pair's ``down`` and each dense member's whole weight, one matmul, then a slice per
member, each pair's ``up`` reading its slice. Nothing is multiplied into a dense weight: every pair
is still two matmuls, and export/factor_nodes.py counts each ``down`` in its slice.

Measured on SmolLM2 at 40% removed (``feature``; onnxruntime, 2 threads, `bench.peers` protocol):
150 decoder MatMuls become 60 packed ones, fp32 decode 58.0 -> 66.8 tok/s, time to first token 48
-> 40 ms; int4 (MatMulNBits) unchanged (119.9 vs 117.7), so a 4-bit ExecuTorch export is not packed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rankdown.factor import FactorizedLinear

PACKED_CHILD = "packed_down"  # the packed linear's name under the module that holds the members


def packable_groups(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """(the module holding them, member names) for each set of linears of a decoder layer that read
    one input (Q/K/V; gate/up), holds a factor pair, and has nothing but pairs and dense linears
    (``joint``'s shared ``down`` already runs once per input)."""
    groups = []
    for layer in getattr(getattr(model, "model", model), "layers", []):
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            kinds = [type(getattr(parent, n)) for n in names]
            if FactorizedLinear in kinds and all(k in (FactorizedLinear, nn.Linear) for k in kinds):
                groups.append((parent, names))
    return groups


def first_half(member: nn.Module) -> torch.Tensor:
    """What a member contributes to the packed weight (out x in): a pair's ``down``, a dense weight."""
    return (member.down if isinstance(member, FactorizedLinear) else member).weight.detach()


class PackedMember(nn.Module):
    """A member whose first half is a slice of its group's packed linear (held by the parent, not
    registered here, so the weight is stored once); a pair keeps its ``up`` under its own name."""

    def __init__(self, packed: nn.Linear, start: int, end: int, member: nn.Module):
        super().__init__()
        object.__setattr__(self, "_packed", packed)
        self.start, self.end = start, end
        if isinstance(member, FactorizedLinear):
            self.up = member.up
        else:
            self.up = None
            self.bias = member.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._packed(x)[..., self.start:self.end]
        if self.up is not None:
            return self.up(h)
        return h if self.bias is None else h + self.bias


@contextlib.contextmanager
def packed_first_halves(model: nn.Module) -> Iterator[int]:
    """Swap every packable group's members for slices of one packed linear while the block runs (a
    trace), and put the model back after. Each member calls the packed linear on the same input; the
    ExecuTorch export merges those calls into one (export/executorch.py). Yields the groups packed."""
    groups = packable_groups(model)
    saved = []
    try:
        for parent, names in groups:
            members = [getattr(parent, n) for n in names]
            halves = [first_half(m) for m in members]
            weight = torch.cat(halves, dim=0)
            packed = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                packed.weight.copy_(weight)
            setattr(parent, PACKED_CHILD, packed)
            start = 0
            for name, member, half in zip(names, members, halves):
                setattr(parent, name, PackedMember(packed, start, start + half.shape[0], member))
                start += half.shape[0]
            saved.append((parent, names, members))
        yield len(groups)
    finally:
        for parent, names, members in saved:
            for name, member in zip(names, members):
                setattr(parent, name, member)
            delattr(parent, PACKED_CHILD)
