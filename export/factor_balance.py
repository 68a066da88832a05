"""Balance every factor pair before its weights are quantized.

``up(down(x))`` is unchanged when row j of ``down`` is divided by s_j and column j of ``up`` is
multiplied by it, so the split of each rank direction's scale between the two factors is free in
fp32 and decides the error once both are quantized. ``feature`` and ``basis`` keep ``up``
orthonormal and put the whole singular value in ``down``. Balancing makes ||down_j|| = ||up_j||
for every j (s_j = sqrt(||down_j|| / ||up_j||), the split plain SVD already has). Why it helps is
not settled: per pair, with isotropic random inputs, the 4-bit error barely moves, and with real
activations it falls 2-7% on average (up to 25% for some pairs, 5% worse for others); the
end-to-end gain below is the measurement that decides.

Measured on SmolLM2-135M at 40% removed (``feature``), fused ONNX graph, int4 blocks of 32, head
8-bit: KL to the fp32 graph over 116 positions of 3 prompts 0.52 -> 0.22, top-1 81.9% -> 88.8%,
same file size. Scaling by a power of the norm ratio other than 1/2 (0.3, 0.7, 1.0) and a random
orthogonal mix of the rank axis (the incoherence rotation of QuaRot-style methods) were worse
(KL 0.34-0.64; rotation 0.54); docs/measurements.md has the table. On the 6.6M shipped model the effect is mixed
(max logit difference down, mean KL up), so this default follows the real model. int8 (one scale
per output channel) is not balanced: worse on the shipped model (max |logit diff| 1.8 vs 1.2).
"""

from __future__ import annotations

import torch

from rankdown.factor import FactorizedLinear, SharedDownLinear
from rankdown.factor_record import HEAD, factored_table

_FLOOR = 1e-12  # a rank direction with an all-zero factor row or column is left as it is


def _pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Linear, list[torch.nn.Linear]]]:
    """(down, the ups that read it) once per down: a shared-down group is one entry."""
    groups: dict[int, tuple[torch.nn.Linear, list[torch.nn.Linear]]] = {}
    for module in model.modules():
        if isinstance(module, FactorizedLinear):
            groups.setdefault(id(module.down), (module.down, []))[1].append(module.up)
        elif isinstance(module, SharedDownLinear):
            down = module.shared_down
            groups.setdefault(id(down), (down, []))[1].append(module.up)
    return list(groups.values())


@torch.no_grad()
def balance_factors(model: torch.nn.Module) -> int:
    """Rescale every factor pair of ``model`` in place so that each rank direction's ``down`` row and
    ``up`` column (the column of all the ups of a shared-down group, stacked) have equal norms.
    Returns the number of downs rescaled."""
    count = 0
    for down, ups in _pairs(model):
        d = down.weight.double()
        down_norms = d.norm(dim=1)
        up_norms = torch.cat([u.weight.double() for u in ups], dim=0).norm(dim=0)
        ok = (down_norms > _FLOOR) & (up_norms > _FLOOR)
        scale = torch.where(ok, (down_norms / up_norms.clamp_min(_FLOOR)).sqrt(), torch.ones_like(down_norms))
        down.weight.copy_((d / scale[:, None]).to(down.weight.dtype))
        for up in ups:
            up.weight.copy_((up.weight.double() * scale[None, :]).to(up.weight.dtype))
        count += 1
    table = factored_table(model)
    if table is not None:  # the head's up is the lookup's table, so the lookup's proj follows the head's down
        head = model.get_submodule(HEAD)
        assert isinstance(head, FactorizedLinear), "a factored table's head is a factor pair (apply_record)"
        table.proj.weight.copy_(head.down.weight.T)
    return count


@torch.no_grad()
def equalize_head(model: torch.nn.Module) -> bool:
    """Rescale the rank axis of a factored head in place so that every column of ``head.up`` (for a
    tied head: the V x r token table) has the same largest magnitude; ``down`` (and the lookup's
    ``proj``) take the inverse scale, so the fp32 function of both the head and the lookup is
    unchanged. Returns whether the model has a factored head.

    Why: the table is quantized per row (8 bits, one scale per token), and a few rank columns hold
    values many times larger than the rest, so every row's scale is set by those columns and the
    others keep a handful of levels. Measured on SmolLM2-135M, 30% + head rank 128 healed for 8da4w,
    ExecuTorch's int4 model in PyTorch, `compare` 100 problems: 79% -> 89% exact match (the healing's
    own fake-quantized numerics: 89%, fp32 99%). Balancing norms (``balance_factors``) gave 83%,
    equal column rms 84%. The head's weights are never rounded during healing, so this applies to
    checkpoints healed through int4 as well."""
    try:
        head = model.get_submodule(HEAD)
    except AttributeError:
        return False
    if not isinstance(head, FactorizedLinear):
        return False
    up = head.up.weight
    peak = up.double().abs().amax(dim=0)
    ok = peak > _FLOOR
    if not bool(ok.any()):
        return True
    scale = torch.where(ok, peak / peak[ok].mean(), torch.ones_like(peak))
    up.copy_((up.double() / scale[None, :]).to(up.dtype))  # for a tied head, this is the lookup's table
    head.down.weight.copy_((head.down.weight.double() * scale[:, None]).to(head.down.weight.dtype))
    table = factored_table(model)
    if table is not None:
        assert table.table.weight is up, "a factored table shares its head's up (factored_embedding)"
        proj = table.proj.weight
        proj.copy_((proj.double() * scale[None, :]).to(proj.dtype))
    return True
