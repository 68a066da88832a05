"""One GEMM per input for ExecuTorch int4: the linears that read the same activation (a Llama
layer's q/k/v projections, its gate/up projections) run as one 4-bit linear over their stacked first
stages (a factor pair's ``down``, a dense linear's weight), and each member reads its rows of the
result (then its ``up``, for a pair). Every factor pair is still two matmuls: its ``down`` rows
are a slice of one GEMM, its ``up`` runs alone.

Why: under 8da4w each linear quantizes its input to int8 per token and is its own XNNPACK call, so
a 40% model with five factor pairs per layer runs up to 14 of each per layer where the dense model
runs 7. Stacking the rows leaves every row's 4-bit codes and scales, and the int8 input, as they
were, so the results are the same numbers. Measured on SmolLM2-135M (30% + head rank 128, the
default healed for 8da4w), 2 threads, `rankdown validate FUSED --compare UNFUSED --runtime
executorch`: 90 GEMMs fewer per token, decode 1.07x, the same exact match and perplexity.

In the eager model each member calls the fused linear (the results are identical); the exported
graph keeps one call (export/executorch.py merges them, and only them). XNNPACK does not delegate a slice of a dynamically
shaped tensor, so each member's slice runs in the portable kernels between two delegate calls.
"""

from __future__ import annotations

from torch import nn

from rankdown.export.et_int4 import DecomposedQuantLinear, stack_rows, stackable
from rankdown.factor import FactorizedLinear

# Children of one module that read one input, in a transformers Llama layer.
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FUSED_CHILD = "fused"  # the stacked linear's name, under the group's first member


class InputSlice(nn.Module):
    """One member of a fused group: rows ``start:stop`` of the fused linear's output, then its
    ``up`` for a factor pair. The first member registers the fused linear (its parameters are
    named once, under that member); the others hold an unregistered reference."""

    up: nn.Module | None
    fused: nn.Module
    _fused: nn.Module

    def __init__(self, fused: nn.Module, start: int, stop: int, up: nn.Module | None, owner: bool):
        super().__init__()
        self.start, self.stop, self.owns_fused = start, stop, owner
        self.up = up
        if owner:
            self.fused = fused
        else:
            object.__setattr__(self, "_fused", fused)

    @property
    def fused_linear(self) -> nn.Module:
        return self.fused if self.owns_fused else self._fused

    def forward(self, x):
        rows = self.fused_linear(x)[..., self.start:self.stop]
        return rows if self.up is None else self.up(rows)


def _first_stage(module: nn.Module) -> DecomposedQuantLinear | None:
    if isinstance(module, FactorizedLinear):
        module = module.down
    return module if isinstance(module, DecomposedQuantLinear) else None


def fuse_inputs(model: nn.Module) -> int:
    """Fuse, in place, every group of ``INPUT_GROUPS`` whose first stages are all
    ``DecomposedQuantLinear`` that ``stack_rows`` takes (a shared-``down`` group already runs its
    ``down`` once, and is left as it is). Returns how many linear calls per token it saves."""
    saved = 0
    for parent in list(model.modules()):
        for names in INPUT_GROUPS:
            if not all(isinstance(getattr(parent, n, None), nn.Module) for n in names):
                continue
            members = [getattr(parent, n) for n in names]
            firsts = [_first_stage(m) for m in members]
            stages = [f for f in firsts if f is not None]
            if len(stages) < len(firsts) or not stackable(stages):
                continue
            fused = stack_rows(stages)
            start = 0
            for i, (name, member, stage) in enumerate(zip(names, members, stages)):
                stop = start + stage.weight.shape[0]
                up = member.up if isinstance(member, FactorizedLinear) else None
                setattr(parent, name, InputSlice(fused, start, stop, up, owner=i == 0))
                start = stop
            saved += len(names) - 1
    return saved


def fused_members(model: nn.Module) -> dict[str, list[tuple[str, bool, int]]]:
    """The fused linears by their parameter path (``...q_proj.fused``): each member's module name,
    whether it is a factor pair's ``down`` (else a dense linear) and its rows, in order."""
    paths: dict[int, str] = {}
    members: dict[int, list[tuple[str, bool, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, InputSlice):
            key = id(module.fused_linear)
            if module.owns_fused:
                paths[key] = f"{name}.{FUSED_CHILD}"
            members.setdefault(key, []).append((name, module.up is not None, module.stop - module.start))
    return {paths[key]: group for key, group in members.items()}
