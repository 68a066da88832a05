"""4-bit fake quantization of the decoder linears while healing (``--heal-quantize int4``).

The ExecuTorch int4 export (export/et_int4.py, torchao's 8da4w) stores each linear's weight as
4-bit integers in groups of ``group`` input columns with one symmetric scale each (max |w| / 7.5,
codes round(w * (1 / scale)) clamped to [-8, 7]). Healing with those numerics in the forward
pass (the straight-through estimator: the gradient reaches the float weight as if unrounded)
trains the factors for the weights the phone will run, not for their float values.

A factor pair's ``up`` reads the rank, which the export pads with zero columns to a multiple of
the group; a zero column changes no group's scale, so here the last group of a row is simply
shorter. Each linear takes the group the export gives it (``group_for``: the largest power of two up
to ``group`` that divides its padded width), so ``--heal-group-size 128`` trains a 576-wide input in
the export's groups of 64, not in one group of 128 and one of 64. torchao's own QAT linear
(``FakeQuantizedLinear``) needs the group to divide the width, which ranks do not, hence this small
hand-written quantizer; the test checks it against torchao's quantization.

``8da4w`` also fake-quantizes what every linear the ExecuTorch export quantizes reads (the decoder's
and the head's): XNNPACK's qd8 kernels quantize that input to int8 per token (one asymmetric scale
and zero point per row) at run time. A rank-r bottleneck or a normed hidden state with a few outlier
channels loses most of its other channels' resolution that way, where onnxruntime's MatMulNBits
(accuracy level 4) quantizes per block of 32; healing through it teaches the factors the input the
phone will feed them. torchao's per-token fake quantizer (its 8da4w QAT's) does the rounding and
passes the gradient straight through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from rankdown.factor import SharedDownLinear
from rankdown.int4_numerics import int4_rounding, symmetric_int4


def fake_int4(weight: torch.Tensor, group: int, bf16_scales: bool = False) -> torch.Tensor:
    """``weight`` (out x in) quantized to 4 bits in groups of ``group`` input columns and back,
    exactly as the export's int4 (a last, shorter group where ``group`` does not divide the width).
    ``bf16_scales``: each scale rounded to bfloat16 before the codes are chosen, as the export
    stores the scales of a linear with several groups per row (XNNPACK's qb4w kernels)."""
    rows, columns = weight.shape
    codes, scales = symmetric_int4(weight, group, bf16_scales)
    return (codes * scales).view(rows, -1)[:, :columns]


class FakeInt4(nn.Module):
    """A weight parametrization: the 4-bit weight forward, the identity backward."""

    def __init__(self, group: int, bf16_scales: bool = False):
        super().__init__()
        self.group = group
        self.bf16_scales = bf16_scales

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (fake_int4(weight.detach(), self.group, self.bf16_scales) - weight).detach()


def export_rounding(in_features: int, group: int) -> FakeInt4:
    """The rounding the ExecuTorch int4 export gives a linear ``in_features`` wide at ``--group-size
    group``: its group (``group_for`` of the zero-padded width), and bfloat16 scales unless that group
    is the whole (padded) row, which XNNPACK runs per channel with float32 scales. Measured on SmolLM2
    (30% + head rank 128, healed for 8da4w at float32 scales): the same int4 model in PyTorch keeps
    89% of 100 `compare` problems with float32 scales and 81% with them rounded to bf16, as the
    .pte runs them (85%)."""
    return FakeInt4(*int4_rounding(in_features, group))


def _activation_quantizer() -> nn.Module:
    """torchao's per-token asymmetric int8 fake quantizer: the numerics of XNNPACK's qd8 inputs."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    return IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))


def _head_linears(model: nn.Module) -> list[nn.Linear]:
    """The head's linears, which the int4 export runs on int8 inputs too (8-bit weights)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    down, up = getattr(head, "down", None), getattr(head, "up", None)
    if isinstance(down, nn.Linear) and isinstance(up, nn.Linear):
        return [down, up]
    return [head] if isinstance(head, nn.Linear) else []


def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    """Every linear the int4 export quantizes to 4 bits: the factors (a shared ``down`` once) and
    the linears left dense, in every decoder layer."""
    found: dict[int, nn.Linear] = {}
    for layer in model.model.layers:  # type: ignore[union-attr]
        for module in layer.modules():
            if isinstance(module, SharedDownLinear):
                found.setdefault(id(module.shared_down), module.shared_down)
            elif isinstance(module, nn.Linear):
                found.setdefault(id(module), module)
    return list(found.values())


@contextlib.contextmanager
def fake_quantized(model: nn.Module, group: int, activations: bool = False) -> Iterator[int]:
    """Every decoder linear of ``model`` sees its 4-bit weight while the block runs, and with
    ``activations`` every linear the export quantizes (the head's too) its input rounded to int8 per
    token; after it, the modules hold their (trained) float weights as plain parameters again and
    no hook is left. Yields how many linears have 4-bit weights."""
    linears = _decoder_linears(model)
    hooks = []
    if activations:
        quantizer = _activation_quantizer()  # stateless between calls: scales are chosen per input
        hooks = [linear.register_forward_pre_hook(lambda _m, args: (quantizer(args[0]), *args[1:]))
                 for linear in linears + _head_linears(model)]
    for linear in linears:
        parametrize.register_parametrization(linear, "weight", export_rounding(linear.in_features, group))
    try:
        yield len(linears)
    finally:
        for hook in hooks:
            hook.remove()
        for linear in linears:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
