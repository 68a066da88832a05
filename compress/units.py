"""Units, the Llama linears they are made of, and how a unit is decomposed and put back.

A unit is one decoder linear, or a group of linears reading one input that share ``down``
(joint rank-k). Every other compress module names the linears and the batch size from here,
so that the pipeline, the rank strategies and the statistics agree on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaForCausalLM

from rankdown.compress.decomposition import Decomposition, Factors, UnitWeights
from rankdown.compress.methods import MethodSpec
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear, SharedDownLinear, shared_down_group

BATCH = 8  # calibration windows per forward pass

# A decoder layer's linears by their layer-relative names (the stock transformers Llama's).
Q_PROJ, K_PROJ, V_PROJ, O_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE_PROJ, UP_PROJ, DOWN_PROJ = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
LINEARS = (Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ)
# q and k share one keep share (seed 002 ties them); the others have one each.
KIND_OF = {Q_PROJ: "qk", K_PROJ: "qk", V_PROJ: "v", O_PROJ: "o", GATE_PROJ: "gate", UP_PROJ: "up", DOWN_PROJ: "down"}
JOINT_GROUPS = ((Q_PROJ, K_PROJ), (GATE_PROJ, UP_PROJ))
# Which input site feeds which linear; members of one site can share a ``down`` (joint rank-k).
SITES = {"attn_in": (Q_PROJ, K_PROJ, V_PROJ), "o_in": (O_PROJ,), "mlp_in": (GATE_PROJ, UP_PROJ), "down_in": (DOWN_PROJ,)}
SITE_OF = {member: site for site, members in SITES.items() for member in members}


@dataclass(frozen=True)
class Unit:
    """One factor pair to be (or a group sharing one ``down``), within one decoder layer."""

    layer: int
    members: tuple[str, ...]  # layer-relative names, e.g. "self_attn.q_proj"
    in_features: int
    out_features: tuple[int, ...]
    biases: int
    kind: str
    compressible: bool
    factor_bias: bool = False
    # The largest share of the dense parameters a factor pair may hold; above it the unit stays dense.
    # 1.0 is break-even by parameters. Below it, a pair near break-even is left dense because it runs
    # slower than the linear it replaces: two GEMMs, each with its own dispatch and int8 input (compress
    # --max-pair-share).
    pair_share: float = 1.0

    @property
    def site(self) -> str:
        return SITE_OF[self.members[0]]

    @property
    def name(self) -> str:
        """The first member's module name, which names the unit in messages."""
        return f"model.layers.{self.layer}.{self.members[0]}"

    @property
    def dense_params(self) -> int:
        return self.in_features * sum(self.out_features) + self.biases

    def params(self, rank: int | None) -> int:
        if rank is None:
            return self.dense_params
        biases = sum(self.out_features) if self.factor_bias else self.biases
        return rank * (self.in_features + sum(self.out_features)) + biases

    @property
    def max_saving_rank(self) -> int:
        """The largest rank whose pair holds less than ``pair_share`` of the dense parameters (0 if
        none does): with the default share, the largest rank that still saves parameters."""
        per_rank = self.in_features + sum(self.out_features)
        saving = self.pair_share * self.dense_params - self.params(0)
        return max(0, min(math.ceil(saving / per_rank) - 1, self.in_features, sum(self.out_features)))

    def names(self) -> list[str]:
        return [f"model.layers.{self.layer}.{m}" for m in self.members]


def layer_shapes(model: LlamaForCausalLM) -> list[dict[str, tuple[int, int, bool]]]:
    """``[layer][member] = (out, in, has_bias)`` for every decoder linear; refuses factor pairs."""
    shapes = []
    for layer in model.model.layers:
        entry = {}
        for name in LINEARS:
            module = layer.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise RankdownError(f"model.layers: {name} is already factorized; compress a dense checkpoint")
            entry[name] = (module.out_features, module.in_features, module.bias is not None)
        shapes.append(entry)
    return shapes


def plan_units(layer_shapes: list[dict[str, tuple[int, int, bool]]], joint: bool, dense_kinds: frozenset[str],
               factor_bias: bool = False, pair_share: float = 1.0) -> list[Unit]:
    """Units for every layer: ``layer_shapes[l][member] = (out, in, has_bias)``."""
    units = []
    for index, shapes in enumerate(layer_shapes):
        grouped = [g for g in JOINT_GROUPS if joint]
        taken = {m for g in grouped for m in g}
        members_list = list(grouped) + [(m,) for m in LINEARS if m not in taken]
        for members in members_list:
            outs = tuple(shapes[m][0] for m in members)
            kind = KIND_OF[members[0]]
            units.append(Unit(index, members, shapes[members[0]][1], outs,
                              sum(shapes[m][0] for m in members if shapes[m][2]), kind,
                              compressible=kind not in dense_kinds, factor_bias=factor_bias,
                              pair_share=pair_share))
    return units


def unit_weights(layer: nn.Module, unit: Unit, site_stats, stored: dict[str, torch.Tensor] | None = None,
                 device: torch.device | None = None, output_weights: torch.Tensor | None = None) -> UnitWeights:
    """The unit's dense weights in float64 on ``device`` (None: where they are): from the layer's
    modules, or from ``stored`` tensors (layer-relative names, e.g. "mlp.down_proj.weight") when
    the modules were already freed. With paired statistics (the carried-error correction), the
    weights that map the compressed model's inputs to the dense outputs best."""
    def tensor(member: str, kind: str) -> torch.Tensor | None:
        if stored is not None:
            found = stored.get(f"{member}.{kind}")
        else:
            found = getattr(layer.get_submodule(member), kind)
        return None if found is None else found.detach().to(device=device, dtype=torch.float64)

    weights = [tensor(m, "weight") for m in unit.members]
    if site_stats is not None and site_stats.paired:
        # Fit the dense model's outputs from the compressed model's inputs: factor W M, not W
        # (InputStats.carried_correction).
        correction = site_stats.carried_correction.to(device=device)
        weights = [None if w is None else w @ correction for w in weights]
    return UnitWeights(
        names=list(unit.members),
        weights=weights,
        biases=[tensor(m, "bias") for m in unit.members],
        stats=site_stats,
        output_weights=None if output_weights is None else output_weights.to(device=device, dtype=torch.float64),
    )


def decompose_unit(spec: MethodSpec, layer: nn.Module, unit: Unit, site_stats,
                   stored: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
                   output_weights: torch.Tensor | None = None) -> Decomposition:
    """One unit's decomposition; ``site_stats`` is the InputStats of the unit's input site (None if
    data-free); ``stored`` and ``device`` as for ``unit_weights``; ``output_weights`` (per output
    channel, stacked over members) for the methods that weigh their output error."""
    if output_weights is not None and not spec.output_weighted:
        raise ValueError("this method does not weigh its output error")
    weights = unit_weights(layer, unit, site_stats, stored, device, output_weights)
    del site_stats, stored  # only ``weights`` holds them now, so the method may release them
    try:
        return spec.decompose(weights)
    except ValueError as e:
        raise RankdownError(f"{unit.name}: decomposition failed: {e}") from None


def unit_factors(decomposition: Decomposition, unit: Unit, rank: int, dtype: torch.dtype) -> Factors:
    """A, one B per member and one bias per member of ``unit`` at ``rank``, in ``dtype``. A method's
    re-shaping of the truncated factors runs an SVD, whose failure names the unit."""
    try:
        a, bs, biases = decomposition.factors(rank)
    except ValueError as e:
        raise RankdownError(f"{unit.name}: factors at rank {rank} failed: {e}") from None
    return a.to(dtype), [b.to(dtype) for b in bs], [None if b is None else b.to(dtype) for b in biases]


def modules_from_factors(unit: Unit, factors: Factors) -> list[FactorizedLinear] | list[SharedDownLinear]:
    """Factor pairs for one unit (a shared-``down`` group for joint units), on the factors' device."""
    a, bs, biases = factors
    if len(unit.members) == 1:
        return [FactorizedLinear.from_factors(a, bs[0], biases[0])]
    return shared_down_group(a, bs, biases)


def factor_modules(decomposition: Decomposition, unit: Unit, rank: int,
                   dtype: torch.dtype) -> list[FactorizedLinear] | list[SharedDownLinear]:
    """Factor pairs for one unit at ``rank`` (a shared-``down`` group for joint units)."""
    return modules_from_factors(unit, unit_factors(decomposition, unit, rank, dtype))


def set_unit(layer: nn.Module, unit: Unit, modules: list[nn.Module]) -> None:
    """Put ``modules`` (one per member) in place of the unit's linears in its decoder ``layer``."""
    for member, module in zip(unit.members, modules):
        parent, _, child = member.rpartition(".")
        setattr(layer.get_submodule(parent), child, module)
