"""GPTQ rounding of the ExecuTorch 4-bit weights (export/int4_gptq.py): the algorithm on small
matrices, and the export path on the shipped model."""

from __future__ import annotations

import pytest
import torch

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.export import executorch as et
from rankdown.export.config import ExportConfig, Int4Rounding
from rankdown.export.et_int4 import DecomposedQuantLinear
from rankdown.export.int4_gptq import GptqStatistics, gptq_codes, gptq_windows, weighted_error
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


def _nearest_asymmetric(weight, step, zero):
    return torch.clamp(torch.round(weight / step) + zero, 0, 15)


def test_asymmetric_blocks_round_around_their_zero_points():
    """onnxruntime's blocks: codes 0..15 dequantized as (code - zero) * step. A diagonal Hessian gives
    nearest rounding's codes; correlated inputs a smaller output error at the same blocks; a block of
    step 0 (all zeros) keeps its zero point and no NaN."""
    from rankdown.export.int4_gptq import gptq_codes_at

    weight, hessian, _ = _case(6)
    blocks = weight.reshape(weight.shape[0], -1, 32)
    low, high = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    scales = (high - low) / 15
    zeros = torch.round(-low / scales)
    step, zero = scales.repeat_interleave(32, 1), zeros.repeat_interleave(32, 1)
    nearest = _nearest_asymmetric(weight, step, zero)
    assert torch.equal(gptq_codes_at(weight, torch.diag(torch.diagonal(hessian)), step, zero, (0, 15)), nearest)
    codes = gptq_codes_at(weight, hessian, step, zero, (0, 15))
    assert codes.min() >= 0 and codes.max() <= 15 and not torch.equal(codes, nearest)
    assert weighted_error(weight, (codes - zero) * step, hessian) < 0.8 * weighted_error(weight, (nearest - zero) * step, hessian)
    step[:, :32] = 0
    dead = gptq_codes_at(weight, hessian, step, zero, (0, 15))
    assert not torch.isnan(dead).any() and torch.equal(dead[:, :32], zero[:, :32])


def test_lazy_block_updates_carry_the_error_across_blocks_exactly():
    """Carrying the error block by block is the same algorithm as column by column: the same codes
    with a block of 1, 7 or 128 columns on a matrix wider than one block."""
    weight, hessian, scales = _case(5, rows=16, columns=320)
    codes = {block: gptq_codes(weight, hessian, scales, block=block) for block in (1, 7, 128)}
    assert torch.equal(codes[1], codes[7]) and torch.equal(codes[1], codes[128])
    assert not torch.equal(codes[128], _nearest(weight, scales))


def test_linears_reading_one_tensor_share_one_input_sum_per_call():
    """Factor pairs read the layer's input in turn with their ``up`` between, and a shared ``down`` is
    called once per member: each distinct input tensor of a call is summed once."""
    from torch import nn

    from rankdown.export.int4_gptq import InputGrams

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Linear(8, 3, bias=False), nn.Linear(3, 8, bias=False)

        def forward(self, x):
            return self.up(self.down(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.shared = Pair(), Pair(), nn.Linear(8, 3, bias=False)

        def forward(self, x):
            return self.q(x) + self.k(x) + sum(self.shared(x).sum() for _ in range(3))

    layer = Layer()
    names = ["q.down", "q.up", "k.down", "k.up", "shared"]
    grams = InputGrams(layer, {n: layer.get_submodule(n) for n in names})
    x = torch.randn(2, 5, 8)
    for _ in range(2):  # two calls (batches): each adds its own inputs
        layer(x)
    grams.close()
    expected = 2 * (x.reshape(-1, 8).T @ x.reshape(-1, 8)).double()
    for name in ("q.down", "k.down", "shared"):
        assert torch.allclose(grams.of(name), expected), name
    assert grams.source["k.down"] == grams.source["shared"] == "q.down" and set(grams.sums) == {"q.down", "q.up", "k.up"}
    layer(x)  # closed: nothing more is summed
    assert torch.allclose(grams.of("q.down"), expected)


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
    assert windows.shape[1] == 256 and 12 <= windows.shape[0] <= 16  # the three tasks in turn, as many each
    stats = GptqStatistics(model, windows)
    built = {}
    for rounding in Int4Rounding:
        # an 8-bit head in both: it stays to nearest, so the 4-bit linears are the decoder's alike
        cfg = ExportConfig(formats="executorch", quantize="int4", int4_rounding=rounding, head_bits=8)
        assert cfg.rounding is rounding
        built[rounding] = et.quantize(model, ckpt.record, cfg, progress=lambda _: None, calibration=stats)
    gptq, nearest = built[Int4Rounding.GPTQ], built[Int4Rounding.NEAREST]
    assert nearest.summary["rounding"] == "nearest" and "gptq" not in nearest.summary
    summary = gptq.summary["gptq"]
    assert gptq.summary["rounding"] == "gptq" and summary["linears"] == 42 and summary["tokens"] == windows.numel()
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
    again = et.quantize(model, ckpt.record, ExportConfig(formats="executorch", quantize="int4", head_bits=8),
                        progress=lambda _: None, calibration=stats)
    rebuilt = dict(again.model.named_modules())
    assert all(torch.equal(rebuilt[n].weight, linears[n].weight) for n in four_bit)


def test_a_4bit_head_is_rounded_by_gptq_on_the_final_hidden_states():
    """--head-bits 4: the head's codes are GPTQ's too, at nearest rounding's scales, with a smaller
    output error on the final hidden states; the 8-bit lookup table is left as it was."""
    from rankdown.export.int4_gptq import HEAD

    folder = SHIPPED_MODEL
    ckpt = open_checkpoint(folder)
    model = load_model(ckpt).eval()
    windows = gptq_windows(load_tokenizer(folder), GENERIC_TASKS, windows=8)
    stats = GptqStatistics(model, windows)
    built = {rounding: et.quantize(model, ckpt.record, ExportConfig(formats="executorch", quantize="int4", head_bits=4,
                                                                    int4_rounding=rounding),
                                   progress=lambda _: None, calibration=stats) for rounding in Int4Rounding}
    gptq, nearest = (built[r].model.get_submodule(HEAD) for r in (Int4Rounding.GPTQ, Int4Rounding.NEAREST))
    assert gptq.quant_range == (QMIN, QMAX) and torch.equal(gptq.scales, nearest.scales)
    assert not torch.equal(gptq.weight, nearest.weight)
    assert built[Int4Rounding.GPTQ].summary["gptq"]["linears"] == 42 + 1  # the shipped model's 42, and the head
    hessian = stats.head().of(HEAD)
    step = gptq.scales.reshape(gptq.weight.shape[0], -1).repeat_interleave(32, 1).double()
    error = {name: weighted_error(model.lm_head.weight.detach(), linear.weight.double() * step, hessian)
             for name, linear in (("gptq", gptq), ("nearest", nearest))}
    assert error["gptq"] < 0.8 * error["nearest"]
    lookups = [built[r].model.get_input_embeddings() for r in Int4Rounding]
    assert torch.equal(lookups[0].weight, lookups[1].weight)
    # the head alone (a checkpoint healed through int4, --head-bits 4): the decoder keeps nearest's codes
    alone = et.quantize(model, ckpt.record, ExportConfig(formats="executorch", quantize="int4", head_bits=4,
                                                         int4_rounding="nearest", head_rounding="gptq"),
                        progress=lambda _: None, calibration=stats)
    assert alone.summary["rounding"] == "nearest" and alone.summary["head_rounding"] == "gptq"
    assert alone.summary["gptq"]["linears"] == 1
    assert torch.equal(alone.model.get_submodule(HEAD).weight, gptq.weight)  # the same float hidden states
    decoder = {n: m for n, m in alone.model.named_modules() if isinstance(m, DecomposedQuantLinear) and n != HEAD}
    others = dict(built[Int4Rounding.NEAREST].model.named_modules())
    assert decoder and all(torch.equal(m.weight, others[n].weight) for n, m in decoder.items())


def test_int4_rounding_is_refused_where_it_does_nothing():
    from rankdown.errors import RankdownError

    for quantize in ("none", "int8"):
        with pytest.raises(RankdownError, match="--int4-rounding applies to --quantize int4"):
            ExportConfig(quantize=quantize, int4_rounding="gptq")


def test_the_head_is_4bit_where_gptq_rounds_it_and_8bit_elsewhere():
    """--head-bits unset: 4 where GPTQ picks the decoder's codes (it rounds the head too), 8 under
    nearest rounding, which a checkpoint healed through the 4-bit weights gets; a given --head-bits
    stands, and a 4-bit head is GPTQ's unless --int4-rounding nearest is given."""
    from rankdown.export.pipeline import _resolve_rounding

    said: list[str] = []
    assert ExportConfig(quantize="int4").head == 4
    assert ExportConfig(quantize="int4", int4_rounding="nearest").head == 8
    assert ExportConfig(quantize="int4", head_bits=8).head == 8
    assert ExportConfig(quantize="int4", int4_rounding="nearest", head_bits=4).head == 4
    def resolved(healed: bool, **given):
        cfg = _resolve_rounding(ExportConfig(quantize="int4", **given), healed, said.append)
        return cfg.int4_rounding, cfg.head_bits, cfg.gptq_parts

    assert resolved(False) == (Int4Rounding.GPTQ, 4, (True, True))
    assert resolved(False, int4_rounding="nearest") == (Int4Rounding.NEAREST, 8, (False, False))
    assert resolved(False, int4_rounding="nearest", head_bits=4) == (Int4Rounding.NEAREST, 4, (False, False))
    # healed through the 4-bit weights: the decoder to nearest, an 8-bit head; a 4-bit head is GPTQ's
    # (healing never rounds the head), unless nearest is asked for
    assert resolved(True) == (Int4Rounding.NEAREST, 8, (False, False))
    assert resolved(True, head_bits=4) == (Int4Rounding.NEAREST, 4, (False, True))
    assert resolved(True, head_bits=4, int4_rounding="nearest") == (Int4Rounding.NEAREST, 4, (False, False))
    assert not said
    assert resolved(True, int4_rounding="gptq") == (Int4Rounding.GPTQ, 4, (True, True))
    assert len(said) == 1 and "healed" in said[0]


def test_validate_judges_the_task_the_bundle_was_exported_for():
    from types import SimpleNamespace

    from rankdown.validate.config import ValidateConfig
    from rankdown.validate.harness import _data

    def manifest(options, compression):
        return SimpleNamespace(options=options, source=SimpleNamespace(compression=compression, path="m"))

    assert _data(manifest({"task": "compare"}, {"task": "math"}), ValidateConfig())[1:] == \
        ("task compare (evaluation split)", "compare")
    assert _data(manifest({"task": "compare"}, None), ValidateConfig(task="code"))[2] == "code"
    assert _data(manifest({"task": None}, {"task": "math+code"}), ValidateConfig())[2] == "math"


def test_validate_knows_which_tasks_text_gptq_chose_the_codes_on():
    """The tasks a bundle's 4-bit codes were calibrated on (as the export chose them), for the report
    and the hint that names ``export --task`` when the task judged is another."""
    import dataclasses
    from types import SimpleNamespace

    from rankdown.validate.harness import _gptq_tasks
    from rankdown.validate.report import ParityReport, QualityReport, RuntimeReport, calibration_note, runtime_notes

    def manifest(compression, **options):
        options = {"quantize": "int4", "group_size": 32, "int4_rounding": "gptq", "head_bits": 4, "task": None} | options
        return SimpleNamespace(options=options, source=SimpleNamespace(compression=compression), formats={"executorch": None})

    assert _gptq_tasks(manifest(None)) == GENERIC_TASKS  # a dense model: math, code and prose
    assert _gptq_tasks(manifest({"task": "math"}, task="compare")) == ("compare",)  # export --task
    assert _gptq_tasks(manifest({"task": "compare+code"})) == ("compare", "code")
    assert _gptq_tasks(manifest(None, int4_rounding="nearest", head_bits=8)) == ()
    assert _gptq_tasks(manifest(None, int4_rounding="nearest", head_rounding="gptq")) == GENERIC_TASKS  # the head's
    assert _gptq_tasks(manifest(None, quantize="int8")) == ()

    quality = QualityReport(exact_match=0.52, examples=100, perplexity=None, tokens=0, reference_exact_match=0.655,
                            reference_perplexity=None, seconds=1.0, task="compare", gptq_tasks=GENERIC_TASKS)
    parity = ParityReport(greedy_match=True, greedy_tokens=8, max_abs_logit_diff=0.1, logit_scale=30.0,
                          top1_agreement=1.0, positions=10)
    failed = RuntimeReport(artifact="executorch/model.pte", parity=parity, quality=quality, latency=None, passed=False,
                           failures=["executorch.quality.exact_match"])
    note = calibration_note("executorch", failed)
    assert note == ("executorch: GPTQ chose the 4-bit codes on math, code, prose text, not compare's: "
                    "export with --task compare to choose them on its text")
    assert runtime_notes("executorch", failed) == [note]  # what the CLI and report.md print under the runtime
    assert calibration_note("executorch", dataclasses.replace(failed, failures=[], passed=True)) is None
    on_it = dataclasses.replace(quality, gptq_tasks=("compare", "code"))
    assert calibration_note("executorch", dataclasses.replace(failed, quality=on_it)) is None
    assert calibration_note("executorch", dataclasses.replace(failed, quality=dataclasses.replace(quality, gptq_tasks=()))) is None


def test_gptq_needs_the_statistics_of_the_model_it_quantizes():
    folder = SHIPPED_MODEL
    ckpt = open_checkpoint(folder)
    model, cfg = load_model(ckpt), ExportConfig(formats="executorch", quantize="int4")
    with pytest.raises(ValueError, match="statistics of the model it quantizes"):
        et.quantize(model, ckpt.record, cfg, progress=lambda _: None)
    other = GptqStatistics(load_model(ckpt), torch.zeros(1, 8, dtype=torch.long))  # an equal model, not this one
    with pytest.raises(ValueError, match="statistics of the model it quantizes"):
        et.quantize(model, ckpt.record, cfg, progress=lambda _: None, calibration=other)


def test_the_export_budgets_gptq_rounding_s_buffers():
    """The export's memory check counts GPTQ's calibration stream and solves where int4 rounds with it,
    and only there; for an 8B Llama they are gigabytes, not a rounding error."""
    from transformers import LlamaConfig

    from rankdown.compress.calibration import layer_inputs
    from rankdown.export.int4_gptq import gptq_memory
    from rankdown.export.pipeline import memory_estimate

    ckpt = open_checkpoint(SHIPPED_MODEL)
    gptq = memory_estimate(ckpt, ExportConfig(quantize="int4"))
    nearest = memory_estimate(ckpt, ExportConfig(quantize="int4", int4_rounding="nearest"))
    assert gptq - nearest == gptq_memory(ckpt.config) > 0
    onnx = {r: memory_estimate(ckpt, ExportConfig(formats="onnx", quantize="int4", int4_rounding=r)) for r in ("gptq", "nearest")}
    assert onnx["gptq"] - onnx["nearest"] == gptq_memory(ckpt.config)  # ONNX rounds on its graph, the same buffers
    # the stream it holds: every calibration token's hidden state entering and leaving a layer
    windows = gptq_windows(load_tokenizer(SHIPPED_MODEL), GENERIC_TASKS)
    stream = layer_inputs(load_model(ckpt).eval(), windows).float()
    assert 2 * stream.nbytes < gptq_memory(ckpt.config)
    llama8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    assert gptq_memory(llama8b) > 4 * 2**30


def test_one_walk_gives_every_layers_statistics_and_the_heads_and_a_kept_walk_is_read_back(tmp_path, monkeypatch):
    """GPTQ's statistics come from one pass over the calibration windows: each decoder linear's
    input sums, and the head's on the final hidden states (what the whole model's forward gives it).
    Kept on disk, a second reader (an export's other format) gets the same numbers without a pass."""
    from rankdown.export import int4_gptq
    from rankdown.export.int4_gptq import HEAD, KEPT_FOLDER, kept_bytes

    model = load_model(open_checkpoint(SHIPPED_MODEL)).eval()
    windows = gptq_windows(load_tokenizer(SHIPPED_MODEL), GENERIC_TASKS, windows=8)
    kept = tmp_path / KEPT_FOLDER
    stats = GptqStatistics(model, windows, keep=kept)
    names = [n for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) == 7  # q, k, v, o, gate, up, down
    walked = {index: {name: grams.of(name) for name in names} for index, grams in stats.layers()}
    assert len(walked) == len(model.model.layers) and stats.walks == 1
    on_disk = sum(f.stat().st_size for f in kept.iterdir())
    assert 0 < on_disk <= kept_bytes(model)

    def no_pass(*_args, **_kwargs):
        raise AssertionError("walked again")

    monkeypatch.setattr(int4_gptq, "run_layer", no_pass)
    read = {index: {name: grams.of(name) for name in names} for index, grams in stats.layers()}
    assert all(torch.equal(read[i][n], walked[i][n]) for i in walked for n in names)
    # q, k and v read one input: one sum, not three
    assert read[0]["self_attn.q_proj"].data_ptr() == read[0]["self_attn.v_proj"].data_ptr()
    head = stats.head().of(HEAD)
    assert stats.walks == 1
    with torch.no_grad():
        final = model.model(windows).last_hidden_state.reshape(-1, model.config.hidden_size).double()
    expected = final.T @ final
    assert head.dtype == torch.float64
    assert torch.allclose(head, expected, rtol=1e-4, atol=1e-4 * float(expected.diagonal().mean()))
    stats.discard()
    assert not kept.exists()
    # the head alone (a checkpoint healed through int4 with a 4-bit head: no layer's statistics asked
    # for): one pass to the final hidden states, nothing kept on disk, and nothing to discard
    monkeypatch.undo()
    alone = GptqStatistics(model, windows, keep=tmp_path / "alone")
    assert torch.allclose(alone.head().of(HEAD), head, rtol=1e-6, atol=1e-8) and alone.walks == 1
    alone.discard()
    assert not (tmp_path / "alone").exists()


def test_the_statistics_are_kept_for_a_second_format_only_where_the_disk_holds_them(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from rankdown.export import pipeline
    from rankdown.export.int4_gptq import KEPT_FOLDER, kept_bytes

    model = load_model(open_checkpoint(SHIPPED_MODEL)).eval()
    windows = torch.zeros(1, 8, dtype=torch.long)
    said: list[str] = []
    assert pipeline._gptq_statistics(model, windows, tmp_path, 1, 0, said.append).kept is None  # one format: nothing to share
    assert pipeline._gptq_statistics(model, windows, tmp_path, 2, 0, said.append).kept == tmp_path / KEPT_FOLDER
    assert not said
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(1 << 40, 1 << 40, kept_bytes(model) + (10 << 20)))
    assert pipeline._gptq_statistics(model, windows, tmp_path, 2, 1 << 30, said.append).kept is None
    assert len(said) == 1 and "each format walks the calibration text itself" in said[0] and "MiB free" in said[0]
