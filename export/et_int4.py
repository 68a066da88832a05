"""4-bit ExecuTorch weights (8da4w): every decoder linear, factor pairs included, as 4-bit weights in
groups of ``group_size`` input columns with one scale each (chosen by torchao's HQQ scale search
by default: ``Int4Scales`` in export/config.py), activations quantized to int8 per token
at run time (XNNPACK's qd8-f32-qb4w kernels); the head 8-bit per output channel (8da8w; 4-bit groups
with ``head_bits=4``) and the token embedding 8-bit per row (weight-only). A factored head
(``compress --head-rank``) is two such head linears; its tied V x r table is the 8-bit ``up``,
which the lookup reads as its rows, stored once, and the lookup's small r -> H ``proj`` stays
float. Through torchao's
``quantize_``, as ExecuTorch's Llama export and optimum-executorch (``--qlinear 8da4w --qembedding 8w``) do.

A group must divide the linear's input width. A factor pair's ``up`` reads the rank, which need not
be a multiple of the group: such a pair's rank is padded with zeros (zero rows in ``down``, zero
columns in ``up``: the same product) up to the next multiple of the smallest group (32, or
``group_size`` if smaller), and the group used for ``up`` is the largest power of two that divides
the padded rank, at most ``group_size``; per output channel, an odd rank is padded to an even one
(XNNPACK's qc4w kernels misread an odd width: ``QC4W_STEP``). A dense linear whose input width no
group divides falls back to 8-bit per channel.

torchao's quantized linears are then rewritten as the ``quantized_decomposed`` ops XNNPACK lowers
to the same kernels (``DecomposedQuantLinear``: same integers, same scales): lowering them is
faster, because torchao's ops re-run their Python bodies at every retrace of the lowering.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankdown.factor import FactoredEmbedding, FactorizedLinear, SharedDownLinear
from rankdown.factor_record import FactorRecord, factored_table
from rankdown.int4_numerics import group_for, has_bf16_scales, int4_codes, padded_rank, stored_scales


@dataclass(frozen=True)
class Int4Plan:
    """What the quantization did: the record with padded ranks (for counting factor nodes), the
    padded pairs (name -> (rank, padded rank)) and the linears kept at 8 bits per channel."""

    record: FactorRecord
    padded: dict[str, tuple[int, int]]
    int8_linears: tuple[str, ...]


def _pad_rows(linear: nn.Linear, rows: int) -> None:
    extra = rows - linear.out_features
    if extra > 0:
        weight = linear.weight.detach()
        linear.weight = nn.Parameter(torch.cat([weight, weight.new_zeros(extra, weight.shape[1])]), requires_grad=False)
        linear.out_features = rows


def _pad_columns(linear: nn.Linear, columns: int) -> None:
    extra = columns - linear.in_features
    if extra > 0:
        weight = linear.weight.detach()
        linear.weight = nn.Parameter(torch.cat([weight, weight.new_zeros(weight.shape[0], extra)], dim=1),
                                     requires_grad=False)
        linear.in_features = columns


def pad_ranks(model: nn.Module, record: FactorRecord, group_size: int) -> tuple[FactorRecord, dict[str, tuple[int, int]]]:
    """Pad, in place, every factor pair whose rank no group divides (a shared ``down`` once, and
    each member's ``up`` to match); the record with the padded ranks, and what was padded."""
    padded: dict[str, tuple[int, int]] = {}
    modules = dict(record.modules)
    for name, module in model.named_modules():
        if not isinstance(module, (FactorizedLinear, SharedDownLinear)):
            continue
        down = module.down if isinstance(module, FactorizedLinear) else module.shared_down
        _pad_rows(down, padded_rank(down.out_features, group_size))
        if module.up.in_features != down.out_features:
            padded[name] = (module.up.in_features, down.out_features)
            _pad_columns(module.up, down.out_features)
            if name in modules:
                modules[name] = dataclasses.replace(modules[name], rank=down.out_features)
    return dataclasses.replace(record, modules=modules), padded


class DecomposedQuantLinear(nn.Module):
    """A torchao-quantized linear (int8 dynamic per-token activations, intx weights) rewritten as the
    ``quantized_decomposed`` ops XNNPACK also lowers to its qd8-f32-qb4w / qd8-f32-qc8w kernels: the
    same integer weights and scales. Those ops have Meta kernels, where torchao's ``*_affine`` ops
    are CompositeImplicitAutograd and re-run their Python body under symbolic shapes at every retrace
    in ``to_edge_transform_and_lower`` (about half of its time). The weight stays a parameter named
    ``weight`` so the exported graph's linears still resolve to the module's parameter."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, group: int, quant_range: tuple[int, int],
                 bias: nn.Parameter | None = None):
        """``weight``: the integer codes, rows x columns (int8 storage); ``scales``: rows x groups, one
        column for a per-channel weight (``group`` == columns)."""
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

        rows, columns = weight.shape
        self.group = group
        self.per_channel = group == columns
        self.quant_range = quant_range
        self.weight = nn.Parameter(weight, requires_grad=False)
        scales = scales.reshape(rows, -1)
        self.register_buffer("scales", scales.reshape(-1) if self.per_channel else scales.clone())
        self.register_buffer("zeros", torch.zeros(rows, dtype=torch.int64) if self.per_channel
                             else torch.zeros_like(scales))
        self.bias = bias

    scales: torch.Tensor
    zeros: torch.Tensor

    @classmethod
    def from_torchao(cls, linear: nn.Linear) -> DecomposedQuantLinear:
        weight: Any = linear.weight  # torchao's IntxUnpackedToInt8Tensor
        if weight.zero_point.any():
            raise ValueError("XNNPACK's dynamically quantized linears need symmetric weights")
        quant_range = {torch.int4: (-8, 7), torch.int8: (-128, 127)}[weight.target_dtype]  # type: ignore[attr-defined]
        return cls(weight.qdata.detach().clone(), weight.scale.detach().to(torch.float32),
                   int(weight.block_size[-1]), quant_range, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        scale, zero = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
        x = ops.dequantize_per_token(ops.quantize_per_token(x, scale, zero, -128, 127, torch.int8),
                                     scale, zero, -128, 127, torch.int8, torch.float32)
        # Eager (the export's and validate's PyTorch reference): the same products in one pass. The
        # decomposed ops are what the trace must hold (XNNPACK's partitioner matches them), and eagerly
        # they cost 9x the float model's decode (SmolLM2: 50 s against 5.6 s for the self-check's prompts).
        weight = self.decomposed_weight() if torch.compiler.is_compiling() else self.dequantized()
        return torch.nn.functional.linear(x, weight, self.bias)

    def decomposed_weight(self) -> torch.Tensor:
        """The fp32 weight through the ``quantized_decomposed`` ops, as the trace must emit it."""
        ops = torch.ops.quantized_decomposed
        if self.per_channel:
            return ops.dequantize_per_channel(self.weight, self.scales, self.zeros, 0, *self.quant_range, torch.int8)
        return ops.dequantize_per_channel_group(self.weight, self.scales, self.zeros, *self.quant_range,
                                                torch.int8, self.group, torch.float32)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight, (code - zero) x scale, bit for bit what ``dequantize_per_channel(_group)``
        gives: the codes and zeros are small integers, exact in fp32, so only the one product rounds."""
        rows, columns = self.weight.shape
        weight = self.weight.to(torch.float32)
        if self.per_channel:
            return weight.sub_(self.zeros[:, None]).mul_(self.scales[:, None])
        grouped = weight.view(rows, -1, self.group)
        return grouped.sub_(self.zeros[..., None]).mul_(self.scales[..., None]).view(rows, columns)


def stackable(parts: list[DecomposedQuantLinear]) -> bool:
    """Whether ``stack_rows`` takes ``parts``: one input width, grouping and range, no bias."""
    return (all(p.bias is None for p in parts)
            and len({(p.group, p.quant_range, p.weight.shape[1]) for p in parts}) == 1)


def stack_rows(parts: list[DecomposedQuantLinear]) -> DecomposedQuantLinear:
    """One linear whose output rows are ``parts``' in order: the same integer weights and scales
    (each row keeps its own), so ``stacked(x)[..., a:b]`` is ``part(x)`` for the rows a:b of one
    part. The parts must share the input width, the grouping and the range, and have no bias."""
    first = parts[0]
    if not stackable(parts):
        raise ValueError("stack_rows: the parts differ in input width, grouping or range, or have a bias")
    rows = [p.weight.shape[0] for p in parts]
    scales = torch.cat([p.scales.reshape(n, -1) for p, n in zip(parts, rows)])
    return DecomposedQuantLinear(torch.cat([p.weight for p in parts]), scales, first.group, first.quant_range)


def decompose_quantized_linears(model: nn.Module) -> int:
    """Replace, in place, every torchao-quantized nn.Linear by a DecomposedQuantLinear; how many."""
    from torchao.quantization.quantize_.workflows import IntxUnpackedToInt8Tensor

    swapped: dict[int, DecomposedQuantLinear] = {}
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and isinstance(child.weight, IntxUnpackedToInt8Tensor):
                swapped[id(child)] = DecomposedQuantLinear.from_torchao(child)
                setattr(module, child_name, swapped[id(child)])
    # A shared ``down`` is registered on its owner only; the other members' references follow it.
    for module in model.modules():
        if isinstance(module, SharedDownLinear) and not module.owns_down and id(module.shared_down) in swapped:
            object.__setattr__(module, "_shared_down", swapped[id(module.shared_down)])
    return len(swapped)


class ByteEmbedding(nn.Module):
    """The token lookup with int8 rows and one scale per row, as ExecuTorch's quantized
    ``embedding_byte`` kernel takes them (ExecuTorch's Llama export does the same).

    ``from_head``: a tied table whose head is 8-bit per output channel already holds exactly that
    (one int8 row and one scale per token), so the lookup reads the head's own tensors: one
    parameter for both, which the export then stores once (export/tied_embeddings.py)."""

    def __init__(self, embedding: nn.Embedding | None = None, from_head: DecomposedQuantLinear | None = None):
        super().__init__()
        from executorch.exir.passes import _quant_patterns_and_replacements  # noqa: F401  (registers the op)

        self.weight: torch.Tensor
        self.scales: torch.Tensor

        if from_head is not None:
            self.weight = from_head.weight  # the same Parameter: torch.export sees one tied tensor
            scales = from_head.scales
            assert isinstance(scales, torch.Tensor)
            self.register_buffer("scales", scales)
            return
        assert embedding is not None
        weight = embedding.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            # Eager: the looked-up rows only, code x scale as the kernel's reference computes it for
            # every row of the table on every call (a vocabulary of rows for a few tokens).
            return self.weight[ids].to(torch.float32) * self.scales[ids][..., None]
        return torch.ops.quantized_decomposed.embedding_byte.default(self.weight, self.scales, None, -128, 127, ids)


class ByteFactoredLookup(nn.Module):
    """A factored tied table's lookup (rankdown/factor.py ``FactoredEmbedding``) with 8-bit rows:
    ``proj(table(ids))``. ``proj`` (H x r, a few hundred KB) stays float, so the lookup adds no
    activation quantization of its own. The child names match ``FactoredEmbedding``'s, so the
    exported table is named as the fp32 export's."""

    def __init__(self, table: ByteEmbedding, proj: nn.Linear):
        super().__init__()
        self.table = table
        self.proj = proj

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(ids))


def _retie_padded_table(lookup: FactoredEmbedding, head: FactorizedLinear) -> None:
    """After ``pad_ranks`` padded a factored tied head's rank (new ``up`` Parameter), the lookup
    reads the padded table again, and its ``proj`` reads the padded columns as zeros."""
    if lookup.table.weight is head.up.weight:
        return
    _pad_columns(lookup.proj, head.up.in_features)
    lookup.table = nn.Embedding(head.up.out_features, head.up.in_features, device="meta")
    lookup.table.weight = head.up.weight  # the same Parameter, not a copy


def _quantize_linear(model: nn.Module, linear: nn.Linear, config: Any, group: int | None) -> None:
    """Quantize ``linear`` (in ``model``) with torchao's ``config``; with several groups per row, its
    scales are then rounded to bfloat16, as XNNPACK will store them, and its codes chosen again from
    the float weight at those scales (what ``--heal-quantize`` trained through), so the .pte runs
    the integers and scales the PyTorch reference runs. One linear at a time: only its float weight
    is held beside the quantized model."""
    from torchao.quantization import quantize_

    float_weight = linear.weight.detach()
    quantize_(model, config, filter_fn=lambda m, fqn: m is linear)
    if group is None or not has_bf16_scales(linear.in_features, group):
        return
    weight: Any = linear.weight  # torchao's IntxUnpackedToInt8Tensor
    rows, columns = float_weight.shape
    scales = stored_scales(weight.scale.detach().float().reshape(rows, -1, 1))
    codes = int4_codes(float_weight.float().reshape(rows, -1, group), scales)
    weight.qdata.copy_(codes.reshape(rows, columns).to(weight.qdata.dtype))
    weight.scale.copy_(scales.reshape(weight.scale.shape).to(weight.scale.dtype))


def quantize_int4(model: Any, record: FactorRecord, group_size: int, head_bits: int = 8,
                  hqq: bool = True) -> tuple[nn.Module, Int4Plan]:
    """A quantized copy of ``model`` (the caller's model is left as it is) and what was done.
    ``hqq``: the 4-bit groups' scales by torchao's half-quadratic search (HQQ, scale only), else
    max |w| / 7.5; symmetric either way, as XNNPACK's kernels take them."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    algorithm = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if hqq else IntxChooseQParamsAlgorithm.AFFINE

    def weight_config(group: int | None):
        """8-bit per output channel without a group, else 4-bit groups of ``group``."""
        if group is None:
            return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,  # type: ignore[attr-defined]
                                                     weight_granularity=PerGroup(group),
                                                     intx_choose_qparams_algorithm=algorithm)

    model = copy.deepcopy(model)
    record, padded = pad_ranks(model, record, group_size)
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    lookup = factored_table(model)
    if lookup is not None:
        assert isinstance(head, FactorizedLinear), "a factored table's head is a factor pair (apply_record)"
        _retie_padded_table(lookup, head)
    # The head's linears: the dense head, or both halves of a factored one.
    head_linears = [head.down, head.up] if isinstance(head, FactorizedLinear) else [head]
    keep_float = [lookup.proj] if lookup is not None else []
    groups: dict[int | None, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(module is m for m in head_linears + keep_float):
            groups.setdefault(group_for(module.in_features, group_size), []).append(name)
    for group, names in groups.items():
        for name in names:
            _quantize_linear(model, model.get_submodule(name), weight_config(group), group)
    # Before the head is quantized (which gives it a new weight): whether it reads the lookup's table,
    # and that table's float rows.
    float_rows = lookup.table if lookup is not None else embedding
    tied = lookup is not None or (isinstance(head, nn.Linear) and head.weight is embedding.weight)
    # The head is as wide as the vocabulary and decides the token: 8 bits per output channel by
    # default; 4-bit groups (as the decoder) with head_bits=4.
    for linear in head_linears:
        head_group = group_for(linear.in_features, group_size) if head_bits == 4 else None
        _quantize_linear(model, linear, weight_config(head_group), head_group)
    decompose_quantized_linears(model)
    head = model.get_output_embeddings()
    vocab_linear = head.up if isinstance(head, FactorizedLinear) else head  # the linear whose rows are the table
    if (tied and isinstance(vocab_linear, DecomposedQuantLinear) and vocab_linear.per_channel
            and vocab_linear.quant_range == (-128, 127)):
        rows = ByteEmbedding(from_head=vocab_linear)
    else:
        rows = ByteEmbedding(float_rows)
    model.set_input_embeddings(rows if lookup is None else ByteFactoredLookup(rows, lookup.proj))
    return model, Int4Plan(record, padded, tuple(groups.get(None, ())))
