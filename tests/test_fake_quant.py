"""Healing for int4 (--heal-quantize int4, 8da4w): the 4-bit weights of the ExecuTorch export (and
its int8 per-token inputs) in the forward pass, the float weights trained and saved."""

import pytest
import torch
from helpers import quiet
from torch import nn

from rankdown.checkpoint import load_model, open_checkpoint
from rankdown.compress.config import CompressConfig, CompressionReport, Healing
from rankdown.compress.fake_quant import fake_int4, fake_quantized
from rankdown.compress.pipeline import compress
from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.onnx_int4 import QUANTIZER
from rankdown.export.onnx_int4_reference import weight_overrides
from rankdown.export.pipeline import export, healed_for_int4
from rankdown.factor import FactorizedLinear
from rankdown.int4_numerics import PER_CHANNEL, int4_rounding

SMALL = dict(calib_tokens=2048, seq_len=64, allocate="uniform")  # every linear a factor pair
HEAL = dict(steps=4, batch=2, seq_len=32, held_back=2, lr=1e-3)


class _Stop(Exception):
    pass


def test_fake_int4_is_torchaos_int4_quantization():
    # The export's quantization (export/et_int4.py: torchao's 8da4w weights), integers and scales.
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    linear = nn.Linear(96, 8, bias=False)
    weight = linear.weight.detach().clone()
    quantize_(linear, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    q = linear.weight
    exported = q.qdata.float().view(8, 3, 32) * q.scale.float().view(8, 3, 1)
    torch.testing.assert_close(fake_int4(weight, 32), exported.view(8, 96), rtol=0, atol=0)


def test_a_width_no_group_divides_quantizes_as_the_zero_padded_rank_the_export_writes():
    torch.manual_seed(1)
    weight = torch.randn(6, 40)
    padded = torch.cat([weight, torch.zeros(6, 24)], dim=1)  # export/et_int4.py pads a rank of 40 to 64
    torch.testing.assert_close(fake_int4(weight, 32), fake_int4(padded, 32)[:, :40], rtol=0, atol=0)
    assert fake_int4(weight, 32)[:, 32:].unique().numel() <= 6 * 16  # 4-bit codes per row and group


def test_fake_quantized_linears_run_4_bit_pass_gradients_and_come_back_plain(tiny_model_dir):
    model = load_model(open_checkpoint(tiny_model_dir))
    model.model.layers[0].mlp.up_proj = FactorizedLinear.from_factors(torch.randn(24, 64), torch.randn(128, 24))
    pair = model.model.layers[0].mlp.up_proj
    down = pair.down.weight
    ids = torch.tensor([[1, 5, 9, 17, 3]])
    before = model(ids).logits.detach()
    with fake_quantized(model, 32) as count:
        assert count == 7 * len(model.model.layers) + 1  # the pair's two factors instead of one linear
        # two groups per row: the scales rounded to bf16, as XNNPACK stores them
        torch.testing.assert_close(pair.down.weight, fake_int4(down.detach(), 32, bf16_scales=True))
        quantized = model(ids).logits
        quantized.sum().backward()
    assert not torch.allclose(quantized.detach(), before)
    assert pair.down.weight is down and down.grad is not None and down.grad.abs().sum() > 0
    assert type(pair.down) is nn.Linear and not hasattr(pair.down, "parametrizations")
    assert set(model.state_dict()) == set(load_model(open_checkpoint(tiny_model_dir)).state_dict()) - {
        "model.layers.0.mlp.up_proj.weight"} | {"model.layers.0.mlp.up_proj.down.weight", "model.layers.0.mlp.up_proj.up.weight"}
    torch.testing.assert_close(model(ids).logits, before)


def test_each_linear_is_rounded_in_the_group_the_export_gives_its_width(tiny_model_dir):
    """With a group of 128, a rank of 96 is three groups of 32 in the export (et_int4.group_for: the
    largest power of two up to the group dividing the width), not one short group of 96; a 64-wide
    input one group of 64, a 128-wide one a group of 128."""
    model = load_model(open_checkpoint(tiny_model_dir))
    layer = model.model.layers[0]
    torch.manual_seed(2)
    layer.mlp.up_proj = FactorizedLinear.from_factors(torch.randn(96, 64), torch.randn(128, 96))
    # (group, bf16 scales): one group per row runs per channel, float32 scales; several, bf16 scales
    groups = {"self_attn.q_proj": (64, False), "mlp.down_proj": (128, False), "mlp.up_proj.down": (64, False),
              "mlp.up_proj.up": (32, True)}
    weights = {name: layer.get_submodule(name).weight.detach().clone() for name in groups}
    with fake_quantized(model, 128):
        for name, (group, bf16) in groups.items():
            torch.testing.assert_close(layer.get_submodule(name).weight, fake_int4(weights[name], group, bf16),
                                       rtol=0, atol=0)
    up = weights["mlp.up_proj.up"]
    assert not torch.equal(fake_int4(up, 32, True), fake_int4(up, 128, True))
    assert not torch.equal(fake_int4(up, 32, True), fake_int4(up, 32))


def _said_until_quantized(checkpoint, bundle, cfg: ExportConfig) -> list[str]:
    """What the export says up to the int4 quantization (stopped there: the lowering is the int4
    export tests' business)."""
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        if "executorch: int4 scales " in message:
            raise _Stop

    with pytest.raises(_Stop):
        export(checkpoint, bundle, cfg, progress=progress)
    assert not bundle.exists()
    return said


def test_export_takes_the_group_the_checkpoint_was_healed_in(tiny_model_dir, tmp_path):
    report = compress(tiny_model_dir, tmp_path / "c", CompressConfig(
        ratio=0.4, healing=Healing(quantize="int4", group_size=64, **HEAL), **SMALL), progress=quiet)
    assert report.healing.group_size == 64

    def said(**options) -> list[str]:
        return _said_until_quantized(tmp_path / "c", tmp_path / "b", ExportConfig(
            formats="executorch", quantize="int4", max_seq_len=64, check=False, **options))

    told = said()
    assert "int4 scales in groups of 64: as the checkpoint was healed" in told
    assert told[-1].startswith("  executorch: int4 scales in groups of 64,")
    # Asked for another group: exported as asked, with a note naming the group it was healed in.
    told = said(group_size=32)
    assert any(m.startswith("note: this checkpoint was healed through 4-bit scales in groups of 64; --group-size 32")
               for m in told)
    assert told[-1].startswith("  executorch: int4 scales in groups of 32,")
    told = said(group_size=PER_CHANNEL)
    assert any("--group-size channel rounds its weights differently" in m for m in told)
    assert told[-1].startswith("  executorch: int4 scales per output channel,")


def test_a_checkpoint_healed_per_channel_exports_per_channel(tiny_model_dir, tmp_path):
    """``--heal-group-size channel`` trains every linear through one float32 scale per output row
    (the whole input row, any width, no rank padding), and its export keeps that: ``channel`` is
    the group 0, which no ``or DEFAULT_GROUP`` may turn back into 32."""
    said: list[str] = []
    report = compress(tiny_model_dir, tmp_path / "c", CompressConfig(
        ratio=0.4, healing=Healing(quantize="8da4w", group_size=PER_CHANNEL, **HEAL), **SMALL), progress=said.append)
    assert report.healing.group_size == PER_CHANNEL
    assert any("4-bit weights, scales per output channel" in m for m in said)
    told = _said_until_quantized(tmp_path / "c", tmp_path / "b", ExportConfig(
        formats="executorch", quantize="int4", max_seq_len=64, check=False))
    assert "int4 scales per output channel: as the checkpoint was healed" in told
    assert told[-1].startswith("  executorch: int4 scales per output channel,")
    assert "0 factor rank(s) padded" in told[-1]
    # --quantize auto (the default): a checkpoint healed through the 4-bit weights exports in int4
    told = _said_until_quantized(tmp_path / "c", tmp_path / "b", ExportConfig(
        formats="executorch", max_seq_len=64, check=False))
    assert told[0] == "int4: the checkpoint was healed through the 4-bit weights (--quantize none exports it in float)"
    assert told[-1].startswith("  executorch: int4 scales per output channel,")


def test_auto_quantize_is_the_checkpoints_own():
    from rankdown.export.config import Quantize
    from rankdown.export.pipeline import resolve_quantize

    healed = {"healing": {"quantize": "8da4w", "group_size": PER_CHANNEL}}
    said: list[str] = []
    assert resolve_quantize(ExportConfig(), healed, said.append).quantize is Quantize.INT4 and said
    for report in (None, {"healing": {"quantize": "none"}}, {"healing": None}, {}):
        assert resolve_quantize(ExportConfig(), report, said.append).quantize is Quantize.NONE
    for asked in ("none", "int8"):  # what the user asks for wins, healed or not
        assert resolve_quantize(ExportConfig(quantize=asked), healed, said.append).quantize is Quantize(asked)
    assert resolve_quantize(ExportConfig(head_bits=4), healed, said.append).quantize is Quantize.INT4
    with pytest.raises(RankdownError, match="--head-bits applies to --quantize int4 only"):
        resolve_quantize(ExportConfig(head_bits=4), None, said.append)
    # int4-only options on a checkpoint that auto exports in float are refused, not silently dropped
    with pytest.raises(RankdownError, match="--group-size and --no-balance apply to --quantize int4 only"):
        resolve_quantize(ExportConfig(group_size=64, balance=False), {}, said.append)
    with pytest.raises(RankdownError, match="--int4-rounding applies to --quantize int4 only"):
        resolve_quantize(ExportConfig(int4_rounding="nearest"), {}, said.append)
    # compressed for a 4-bit bundle (compress --weights int4) but not healed through it: int4 still
    said.clear()
    unhealed = {"weights": "int4", "healing": None}
    assert resolve_quantize(ExportConfig(), unhealed, said.append).quantize is Quantize.INT4
    assert said == ["int4: the checkpoint was compressed with --weights int4 (--quantize none exports it in float)"]
    assert resolve_quantize(ExportConfig(), {"weights": "float"}, said.append).quantize is Quantize.NONE


def test_per_channel_rounding_is_one_float32_scale_per_row_at_any_width(tiny_model_dir):
    model = load_model(open_checkpoint(tiny_model_dir))
    layer = model.model.layers[0]
    torch.manual_seed(3)
    layer.mlp.up_proj = FactorizedLinear.from_factors(torch.randn(37, 64), torch.randn(128, 37))  # a rank of 37
    names = ("self_attn.q_proj", "mlp.up_proj.down", "mlp.up_proj.up")
    weights = {name: layer.get_submodule(name).weight.detach().clone() for name in names}
    with fake_quantized(model, PER_CHANNEL):
        for name in names:
            w = weights[name]
            rounded = layer.get_submodule(name).weight
            torch.testing.assert_close(rounded, fake_int4(w, w.shape[1]), rtol=0, atol=0)
            scale = w.abs().amax(1, keepdim=True) / 7.5  # float32, not rounded to bf16
            torch.testing.assert_close(rounded, torch.clamp(torch.round(w * (1.0 / scale)), -8, 7) * scale, rtol=0, atol=0)
    assert not torch.equal(fake_int4(weights["self_attn.q_proj"], 64), fake_int4(weights["self_attn.q_proj"], 32))


def test_the_int4_export_stores_the_weights_healing_trained_through(compressed_tiny):
    """Every group-wise 4-bit linear of the ExecuTorch int4 model holds exactly ``fake_int4(w, group,
    bf16_scales=True)`` of its float weight, with scales bfloat16 can hold (XNNPACK's lowering
    casts them to bf16, so nothing is rounded after this); a linear with one group per row keeps
    float32 scales, as the kernel it runs on does."""
    from rankdown.export.et_int4 import DecomposedQuantLinear, quantize_int4
    from rankdown.factor_record import FactorRecord

    folder, _ = compressed_tiny["svd"]
    model = load_model(open_checkpoint(folder)).eval()
    floats = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantized, _ = quantize_int4(model, FactorRecord.read(folder), 32, hqq=False)
    kinds = {"blockwise": 0, "per channel": 0}
    for name, module in quantized.named_modules():
        if not isinstance(module, DecomposedQuantLinear) or module.quant_range != (-8, 7):
            continue
        rows, columns = module.weight.shape
        weight = floats[name]  # a rank the group does not divide is padded with zeros (same product)
        weight = torch.nn.functional.pad(weight, (0, columns - weight.shape[1], 0, rows - weight.shape[0]))
        stored = (module.weight.float().view(rows, -1, module.group) * module.scales.view(rows, -1, 1)).view_as(weight)
        if module.per_channel:
            kinds["per channel"] += 1
            torch.testing.assert_close(stored, fake_int4(weight, module.group), rtol=0, atol=0)
        else:
            kinds["blockwise"] += 1
            torch.testing.assert_close(stored, fake_int4(weight, module.group, bf16_scales=True), rtol=0, atol=0)
            assert torch.equal(module.scales, module.scales.to(torch.bfloat16).float())
    assert kinds["blockwise"] > 0 and kinds["per channel"] > 0


def test_8da4w_rounds_every_quantized_linears_input_to_int8_per_token(tiny_model_dir):
    """With ``activations`` a decoder linear and the head read their input on a per-token 8-bit grid
    (what XNNPACK's qd8 kernels run on), the weights stay 4-bit, the gradient passes, and nothing is
    left behind."""
    model = load_model(open_checkpoint(tiny_model_dir))
    ids = torch.tensor([[1, 5, 9, 17, 3, 8]])
    before = model(ids).logits.detach()
    seen: dict[str, list[torch.Tensor]] = {"raw": [], "quantized": []}
    head, q_proj = model.lm_head, model.model.layers[1].self_attn.q_proj
    raw_hook = head.register_forward_pre_hook(lambda _m, args: seen["raw"].append(args[0].detach()))
    with fake_quantized(model, 32) as count:
        weights_only = model(ids).logits.detach()
    with fake_quantized(model, 32, activations=True) as count_with:
        seen_hook = head.register_forward_pre_hook(lambda _m, args: seen["quantized"].append(args[0].detach()))
        assert len(q_proj._forward_pre_hooks) == 1
        logits = model(ids).logits
        logits.sum().backward()
        seen_hook.remove()
    raw_hook.remove()
    assert count_with == count
    raw, quantized = seen["raw"][-1], seen["quantized"][0]
    assert not torch.equal(raw, quantized)
    # 255 steps span each token's range (zero included): every value a whole number of steps.
    step = (raw.amax(-1, keepdim=True).clamp_min(0) - raw.amin(-1, keepdim=True).clamp_max(0)) / 255
    assert torch.allclose(quantized / step, torch.round(quantized / step), atol=1e-3)
    assert (quantized - raw).abs().le(step / 2 + 1e-6).all()
    assert not torch.allclose(logits.detach(), weights_only)
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0
    assert not q_proj._forward_pre_hooks and not head._forward_pre_hooks
    torch.testing.assert_close(model(ids).logits, before)
    assert healed_for_int4({"healing": {"quantize": "8da4w"}})


def test_healing_for_int4_trains_the_float_factors_and_the_export_keeps_their_scales(tiny_model_dir, tmp_path):
    plain = compress(tiny_model_dir, tmp_path / "plain", CompressConfig(ratio=0.4, healing=Healing(**HEAL), **SMALL),
                     progress=quiet)
    said: list[str] = []
    int4 = compress(tiny_model_dir, tmp_path / "int4",
                    CompressConfig(ratio=0.4, healing=Healing(quantize="int4", **HEAL), **SMALL), progress=said.append)
    assert (int4.healing.quantize, int4.healing.group_size, plain.healing.quantize) == ("int4", PER_CHANNEL, "none")
    assert any(m.startswith("healing for int4:") for m in said)
    assert int4.healing.loss_after < int4.healing.loss_before  # judged through the 4-bit weights
    assert CompressionReport.read(tmp_path / "int4") == int4
    assert healed_for_int4(tmp_path / "int4") and not healed_for_int4(tmp_path / "plain")
    assert not healed_for_int4(tiny_model_dir)
    # Its export keeps the scales it was healed through, whatever the default.
    said = []
    # forward only: the scales and codes are chosen before the lowering, which a second method would repeat
    manifest = export(tmp_path / "int4", tmp_path / "bundle",
                      ExportConfig(formats="executorch", quantize="int4", max_seq_len=64, decode_method=False),
                      progress=said.append)
    assert manifest.options["int4_scales"] == "absmax" and manifest.formats["executorch"].quantization["scales"] == "absmax"
    assert "int4 scales: absmax, the ones the checkpoint was healed through" in said
    # and nearest rounding's codes, which healing trained through (not GPTQ's)
    assert manifest.options["int4_rounding"] == "nearest"
    assert manifest.formats["executorch"].quantization["rounding"] == "nearest"
    assert not any("healed with float weights" in m for m in said)
    # ONNX too: every decoder MatMulNBits holds the very weights healing trained through.
    manifest = export(tmp_path / "int4", tmp_path / "onnx-bundle", ExportConfig(formats="onnx", quantize="int4"),
                      progress=quiet)
    quantization = manifest.formats["onnx"].quantization
    assert quantization["scheme"].startswith("symmetric absmax int4 per output channel") and quantization["symmetric"]
    model = load_model(open_checkpoint(tmp_path / "int4"))
    held = weight_overrides(model, tmp_path / "onnx-bundle" / "onnx" / "model.onnx")
    decoder = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert decoder and all(f"{n}.weight" in held for n in decoder)
    for name in decoder:
        weight = model.get_parameter(f"{name}.weight").detach()
        assert torch.equal(held[f"{name}.weight"], fake_int4(weight, *int4_rounding(weight.shape[1], PER_CHANNEL))), name
    # Other scales asked for by name are kept, with a warning: the user's choice is not overridden.
    said = []
    manifest = export(tmp_path / "int4", tmp_path / "onnx-hqq", ExportConfig(formats="onnx", quantize="int4", int4_scales="hqq"),
                      progress=said.append)
    assert manifest.options["int4_scales"] == "hqq" and manifest.formats["onnx"].quantization["scheme"] == QUANTIZER
    assert any(m.startswith("warning: --int4-scales hqq on a checkpoint healed through absmax") for m in said)
    # A checkpoint healed in float is exported as asked, with a note on what heals for int4, said before
    # the lowering (stopped there: the lowering itself is the int4 export tests' business).
    said = []

    def until_balanced(message: str) -> None:
        said.append(message)
        if message.startswith("balanced "):
            raise _Stop

    with pytest.raises(_Stop):
        export(tmp_path / "plain", tmp_path / "plain-bundle",
               ExportConfig(formats="executorch", quantize="int4", max_seq_len=64, check=False), progress=until_balanced)
    assert any("healed with float weights" in m and "--heal-quantize int4" in m for m in said[:-1])
    assert not (tmp_path / "plain-bundle").exists()
    # Float factors of the same shapes, not 4-bit codes: a layer's down has more than 16 values per group.
    down = load_model(open_checkpoint(tmp_path / "int4")).model.layers[1].mlp.down_proj.down.weight
    assert down[:, :32].unique().numel() > 16 * down.shape[0]


def test_heal_quantize_and_group_size_are_checked():
    with pytest.raises(RankdownError, match="--heal-quantize"):
        Healing(quantize="int3")
    with pytest.raises(RankdownError, match="--heal-group-size must be 32, 64, 128, 256 or channel"):
        Healing(group_size=48)
