"""4-bit group numerics that healing (compress/fake_quant.py) and the ExecuTorch int4 export
(export/et_int4.py) must share to the bit: which group a linear of a given width gets, how a rank
is padded, how codes are rounded, and the precision XNNPACK stores a group's scale in."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_GROUP = 32  # the smallest group a rank is padded to (XNNPACK's blockwise kernels' usual block)
QMIN, QMAX = -8, 7  # symmetric int4 codes
# The group size meaning one scale per output channel (the whole input row; `channel` on the command
# line): XNNPACK runs such a linear with its qc4w kernels, which on SmolLM2's shapes at one token
# ran 1.77x the speed of the blockwise qb4w ones (AVX2, no VNNI: bench/int4_kernels.py).
PER_CHANNEL = 0
# The input width a per-channel 4-bit linear is padded to a multiple of. ExecuTorch 1.5.1's XNNPACK
# lowering packs two codes a byte and pads an odd row with one zero code, but the qc4w kernels then
# read that linear wrongly on several tokens (a prompt) with two threads: a factor's ``up`` of rank
# 109 off by 1.1x its output's scale, every odd rank 13-177 alike, even ranks to 1e-6; one token, or
# one thread, reads it right (google/XNNPACK#5935 reports odd widths failing in the same kernels). A
# zero column more is the same product and the same codes and scale.
QC4W_STEP = 2
SCALE_FLOOR = 1e-12  # the scale of an all-zero group


def group_for(width: int, group_size: int) -> int | None:
    """The largest power-of-two group <= ``group_size`` dividing ``width`` and >= the smallest
    allowed group; None if there is none. ``PER_CHANNEL``: the whole row, if its width is even
    (``QC4W_STEP``)."""
    if group_size == PER_CHANNEL:
        return width if width % QC4W_STEP == 0 else None
    group = group_size
    while group >= min(MIN_GROUP, group_size):
        if width % group == 0:
            return group
        group //= 2
    return None


def stored_scales(scales: torch.Tensor) -> torch.Tensor:
    """Group-wise 4-bit scales as XNNPACK runs them: rounded to bfloat16 (ExecuTorch's XNNPACK
    lowering casts a per-group scale to bf16 for the qb4w kernels; a per-channel one stays float32),
    back in float32."""
    return scales.to(torch.bfloat16).float()


def int4_codes(grouped: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of ``grouped`` (rows x groups x group) at ``scales`` (rows x groups x 1):
    torchao's symmetric rounding, ``w * (1 / scale)`` to nearest, clamped to [-8, 7]."""
    return torch.clamp(torch.round(grouped * (1.0 / scales)), QMIN, QMAX)


def symmetric_int4(weight: torch.Tensor, group: int, bf16_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out x in) as 4-bit codes in groups of ``group`` input columns, (rows x groups x
    group, a last group zero-padded where ``group`` does not divide the width), and one symmetric
    scale per group (rows x groups x 1): max |w| / 7.5, rounded to bfloat16 first with
    ``bf16_scales``. What healing trains through and the ExecuTorch int4 export stores."""
    rows, columns = weight.shape
    grouped = F.pad(weight, (0, -columns % group)).view(rows, -1, group)
    scales = (grouped.abs().amax(-1, keepdim=True) / ((QMAX - QMIN) / 2)).clamp_min(SCALE_FLOOR)
    if bf16_scales:
        scales = stored_scales(scales)
    return int4_codes(grouped, scales), scales


def int4_rounding(in_features: int, group: int) -> tuple[int, bool]:
    """How the int4 export rounds a linear ``in_features`` wide at ``--group-size group``: its group
    (``group_for`` of the zero-padded width) and whether its scales are bfloat16 (several groups per
    row: XNNPACK's qb4w kernels; one group per row runs per channel with float32 scales)."""
    width = padded_rank(in_features, group)
    rounded = group_for(width, group) or group
    return rounded, has_bf16_scales(width, rounded)


def has_bf16_scales(width: int, group: int) -> bool:
    """Whether a 4-bit linear ``width`` wide (padded) in groups of ``group`` has several groups per
    row, so XNNPACK runs it blockwise (qb4w) with bf16 scales; one group per row runs per channel
    (qc4w) with float32 scales."""
    return group < width


def padded_rank(rank: int, group_size: int) -> int:
    if group_size == PER_CHANNEL:
        return -(-rank // QC4W_STEP) * QC4W_STEP  # a scale per row reads any even width
    step = min(MIN_GROUP, group_size)
    return -(-rank // step) * step


def parse_group(text: str) -> int:
    """A group size as written on the command line: a number, or ``channel`` for ``PER_CHANNEL``."""
    if text.strip().lower() == "channel":
        return PER_CHANNEL
    return int(text)


def group_option(group: int) -> str:
    """``group`` as the command line spells it (the inverse of ``parse_group``)."""
    return "channel" if group == PER_CHANNEL else str(group)


def group_label(group: int) -> str:
    return "per output channel" if group == PER_CHANNEL else f"in groups of {group}"
