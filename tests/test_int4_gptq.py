"""GPTQ rounding of the ExecuTorch 4-bit weights (export/int4_gptq.py): the algorithm on small
matrices, and the export path on the shipped model."""

from __future__ import annotations

import pytest
import torch

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.export import executorch as et
from rankdown.export.config import ExportConfig, Int4Rounding
from rankdown.export.et_int4 import DecomposedQuantLinear
from rankdown.export.int4_gptq import gptq_codes, gptq_windows, weighted_error
from rankdown.export.parity import GENERIC_TASKS
from rankdown.int4_numerics import QMAX, QMIN
from rankdown.shipped import SHIPPED_MODEL


def _nearest(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    step = scales.repeat_interleave(weight.shape[1] // scales.shape[1], 1)
    return torch.clamp(torch.round(weight.double() / step), QMIN, QMAX)


def _case(seed: int, rows: int = 24, columns: int = 96, group: int = 32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    # correlated inputs, as a layer's are: a few directions carry most of the energy
    mix = torch.randn(columns, columns, generator=generator, dtype=torch.float64) / columns ** 0.5
    inputs = torch.randn(4 * columns, columns, generator=generator, dtype=torch.float64) @ (torch.eye(columns) + 3 * mix)
    scales = weight.abs().reshape(rows, -1, group).amax(-1) / 7.5
    return weight, inputs.T @ inputs, scales


def test_a_diagonal_hessian_carries_nothing_so_gptq_is_nearest_rounding():
    weight, hessian, scales = _case(0)
    diagonal = torch.diag(torch.diagonal(hessian))
    assert torch.equal(gptq_codes(weight, diagonal, scales), _nearest(weight, scales))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gptq_lowers_the_output_error_on_correlated_inputs_at_the_same_scales(seed):
    weight, hessian, scales = _case(seed)
    codes = gptq_codes(weight, hessian, scales)
    assert codes.min() >= QMIN and codes.max() <= QMAX and torch.equal(codes, codes.round())
    step = scales.repeat_interleave(32, 1)
    gptq = weighted_error(weight, codes * step, hessian)
    nearest = weighted_error(weight, _nearest(weight, scales) * step, hessian)
    assert gptq < 0.8 * nearest
    # another row order gives each row the same codes: rows are rounded independently
    flipped = gptq_codes(weight.flip(0), hessian, scales.flip(0))
    assert torch.equal(flipped.flip(0), codes)


def test_an_input_no_text_exercises_gets_code_zero_and_no_nan():
    weight, hessian, scales = _case(4)
    hessian[5, :] = 0
    hessian[:, 5] = 0
    codes = gptq_codes(weight, hessian, scales)
    assert not torch.isnan(codes).any() and (codes[:, 5] == 0).all()


def test_the_executorch_int4_model_gets_gptq_codes_at_the_scales_nearest_rounding_has():
    """Same scales and format as nearest rounding, other codes, a smaller calibration-weighted
    error (recorded for the manifest), and the same codes when rebuilt (validate reruns it)."""
    folder = SHIPPED_MODEL
    ckpt = open_checkpoint(folder)
    model = load_model(ckpt).eval()
    windows = gptq_windows(load_tokenizer(folder), GENERIC_TASKS, windows=16)
    assert windows.shape == (16, 256)
    built = {}
    for rounding in Int4Rounding:
        cfg = ExportConfig(formats="executorch", quantize="int4", int4_rounding=rounding)
        assert cfg.rounding is rounding
        built[rounding] = et.quantize(model, ckpt.record, cfg, progress=lambda _: None, calibration=windows)
    gptq, nearest = built[Int4Rounding.GPTQ], built[Int4Rounding.NEAREST]
    assert nearest.summary["rounding"] == "nearest" and "gptq" not in nearest.summary
    summary = gptq.summary["gptq"]
    assert gptq.summary["rounding"] == "gptq" and summary["linears"] == 42 and summary["tokens"] == 16 * 256
    assert 0 < summary["error_vs_nearest"] < 0.8
    linears = {n: m for n, m in gptq.model.named_modules() if isinstance(m, DecomposedQuantLinear)}
    others = dict(nearest.model.named_modules())
    four_bit = [n for n, m in linears.items() if m.quant_range == (QMIN, QMAX)]
    assert four_bit and all(torch.equal(linears[n].scales, others[n].scales) for n in four_bit)
    assert all(linears[n].weight.min() >= QMIN and linears[n].weight.max() <= QMAX for n in four_bit)
    assert sum(int((linears[n].weight != others[n].weight).sum()) for n in four_bit) > 0
    # the head (8-bit per channel) is left to nearest rounding
    eight_bit = [n for n, m in linears.items() if m.quant_range != (QMIN, QMAX)]
    assert eight_bit and all(torch.equal(linears[n].weight, others[n].weight) for n in eight_bit)
    again = et.quantize(model, ckpt.record, ExportConfig(formats="executorch", quantize="int4"),
                        progress=lambda _: None, calibration=windows)
    rebuilt = dict(again.model.named_modules())
    assert all(torch.equal(rebuilt[n].weight, linears[n].weight) for n in four_bit)


def test_gptq_needs_its_calibration_windows():
    folder = SHIPPED_MODEL
    ckpt = open_checkpoint(folder)
    with pytest.raises(ValueError, match="calibration"):
        et.quantize(load_model(ckpt), ckpt.record, ExportConfig(formats="executorch", quantize="int4"),
                    progress=lambda _: None)
