"""ONNX int4: onnxruntime's MatMulNBitsQuantizer on the exported graph. Factor pairs stay two
(MatMulNBits) nodes, ranks that are no multiple of the block are quantized (not refused), the
head is 4-bit under GPTQ rounding (8-bit by choice), the self-check's int4 bounds hold, the file shrinks, and validate runs it."""

from __future__ import annotations

import onnx
import pytest
from helpers import quiet

from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig, Quantize
from rankdown.export.manifest import Manifest
from rankdown.export.onnx_fused_inputs import fused_members
from rankdown.export.onnx_int4_reference import weight_overrides
from rankdown.export.pipeline import export
from rankdown.factor_record import FactorRecord
from rankdown.validate.config import Checks, QualityBounds, ValidateConfig
from rankdown.validate.harness import validate


def _weights(graph) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(init.dims) for init in graph.initializer}


def test_int4_graph_keeps_every_factor_pair_as_two_matmulnbits(onnx_int4_bundles):
    folder, _, (bundle, manifest) = onnx_int4_bundles
    record = FactorRecord.read(folder)
    assert any(spec.rank % 2 for spec in record.modules.values())  # an odd K for some up
    graph = onnx.load(str(bundle / "onnx" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    # A fused node (first stages that read one input) counts as each of its members, by their rows.
    members = [(name, a | {"N": rows}) for n, a in zip(nbits, attrs)
               for name, rows in (fused_members(n) or [(n.name, a["N"])])]
    assert len(members) > len(nbits)  # some downs and dense linears read one input: stacked
    factors = [a for name, a in members if name.split("/")[-2] in ("down", "up")]
    entry = manifest.formats["onnx"]
    expected = sum(1 if spec.shares_down_with else 2 for spec in record.modules.values())
    assert entry.factor_nodes.found == entry.factor_nodes.expected == expected == len(factors)
    assert all(a["bits"] == 4 and a["block_size"] == 32 for a in factors)
    odd = [a for a in factors if a["K"] % 32]
    assert odd and all(a["K"] in {spec.rank for spec in record.modules.values()} for a in odd)
    # No weight anywhere has a dense (out x in) shape of a factorized module: no pair was multiplied back.
    dense = {(s.in_features, s.out_features) for s in record.modules.values()}
    assert not any((a["K"], a["N"]) in dense for _, a in members)
    assert not any(shape[-2:] in dense or shape[-2:][::-1] in dense for shape in _weights(graph).values()
                   if len(shape) == 2)
    head = [a for n, a in zip(nbits, attrs) if n.output[0] == "logits"]
    # GPTQ (the default rounding) rounds the head too, so the default head is 4-bit
    assert len(head) == 1 and head[0]["bits"] == 4 and manifest.options["head_bits"] == 4
    assert [n.op_type for n in graph.node if "Gather" in n.op_type and n.input[0] in _weights(graph)] \
        == ["GatherBlockQuantized"]
    assert not any(n.op_type == "MatMul" and n.input[1] in _weights(graph) for n in graph.node)  # nothing left fp32
    assert entry.quantization["partial_last_block"] == len(odd)  # the library zero-pads their last block


def test_int4_parity_size_and_manifest(onnx_int4_bundles):
    _, (fp32_bundle, fp32), (bundle, manifest) = onnx_int4_bundles
    entry = manifest.formats["onnx"]
    assert entry.quantize == "int4" and entry.parity.passed
    # held first to PyTorch with the graph's own weights, shared downs read back once for their group
    assert entry.lowering is not None and entry.lowering.passed
    assert entry.lowering.max_abs_logit_diff < entry.parity.max_abs_logit_diff
    assert entry.parity.top1_agreement >= 0.6 and entry.parity.max_abs_logit_diff <= 0.5 * entry.parity.logit_scale
    assert entry.quantization["embedding"] == "GatherBlockQuantized 4-bit" and entry.quantization["block_size"] == 32
    # Every file of the format is in the manifest (model.onnx and any external data), and nothing else is there.
    listed = set(entry.files)
    assert listed == {p.relative_to(bundle).as_posix() for p in (bundle / "onnx").rglob("*") if p.is_file()}
    model_bytes = sum(f.bytes for name, f in entry.files.items() if not name.endswith(".json"))
    fp32_bytes = sum(f.bytes for name, f in fp32.formats["onnx"].files.items() if not name.endswith(".json"))
    assert model_bytes < 0.4 * fp32_bytes
    assert Manifest.read(bundle).formats["onnx"].quantization == entry.quantization  # survives the round trip


def test_block_scales_are_fp16_in_the_file_and_fp32_constants_once_loaded(onnx_int4_bundles, tmp_path):
    """Every block scale is stored fp16 behind a Cast (2 bytes a block less); onnxruntime folds each
    Cast into an fp32 constant when the session is made, so the kernels prepack constant scales and
    decoding runs no Cast."""
    import onnxruntime as ort

    _, _, (bundle, manifest) = onnx_int4_bundles
    graph = onnx.load(str(bundle / "onnx" / "model.onnx")).graph
    initializers = {i.name: i for i in graph.initializer}
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.input[0] in initializers}
    quantized = [n for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert quantized and all(n.input[2] in casts for n in quantized)
    assert {initializers[c.input[0]].data_type for c in casts.values()} == {onnx.TensorProto.FLOAT16}
    assert manifest.formats["onnx"].quantization["scales"].startswith("fp16")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(bundle / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    constants = {i.name: i.data_type for i in optimized.initializer}
    assert not any(n.op_type == "Cast" and n.output[0] in casts for n in optimized.node)
    kept = [n for n in optimized.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert len(kept) == len(quantized)
    assert all(constants.get(n.input[2]) == onnx.TensorProto.FLOAT for n in kept)


def test_validate_runs_the_int4_onnx_bundle(onnx_int4_bundles):
    """validate applies the manifest's int4 bounds and measures task quality in onnxruntime."""
    _, _, (bundle, _) = onnx_int4_bundles
    report = validate(bundle, ValidateConfig(latency=None, max_examples=5, max_tokens=256), progress=quiet)
    result = report.runtimes["onnxruntime"]
    assert report.passed and result.passed, result.failures
    assert result.parity.top1_agreement >= 0.6
    assert result.quality.perplexity is not None and result.quality.reference_perplexity is not None
    # The quality bounds are int4's unless given: a perplexity bound below the measured ratio fails.
    ratio = result.quality.perplexity / result.quality.reference_perplexity
    strict = validate(bundle, ValidateConfig(latency=None, max_examples=5, max_tokens=256,
                                             checks=Checks(max_perplexity_increase=ratio - 1 - 1e-3)), progress=quiet)
    assert strict.failures == ["onnxruntime.quality.perplexity"]
    assert QualityBounds.for_quantize(Quantize.INT4).max_perplexity_increase > QualityBounds().max_perplexity_increase


def test_tied_table_is_stored_once_in_8_bits_for_head_and_lookup(tiny_tokenizer, tmp_path):
    """The fused graph's tied lookup reads the head's weight through a Transpose; after the head is
    quantized to 8 bits the lookup becomes a GatherBlockQuantized over the head's own 8-bit blocks
    (as onnxruntime-genai's builder does): one 8-bit table, no fp32 copy. Block size 64 = hidden;
    256 pads each row's block, and a Slice cuts the lookup back."""
    from conftest import write_tiny_model

    from rankdown.checkpoint import load_model, open_checkpoint
    from rankdown.export.tied_embeddings import table_copies, tied_table
    from rankdown.int4_numerics import group_for

    dense = write_tiny_model(tmp_path / "dense", tiny_tokenizer, seed=5, tie_word_embeddings=True)
    table = tied_table(load_model(open_checkpoint(dense)))
    for group in (64, 256):
        bundle = tmp_path / f"b{group}"
        manifest = export(dense, bundle, ExportConfig(formats="onnx", quantize="int4", group_size=group,
                                                              head_bits=8), progress=quiet)
        entry = manifest.formats["onnx"]
        assert entry.parity.passed and entry.quantization["head"] == "MatMulNBits 8-bit"
        assert entry.quantization["embedding"].startswith("GatherBlockQuantized 8-bit, the head's weight")
        graph = onnx.load(str(bundle / "onnx" / "model.onnx"), load_external_data=False).graph
        head = next(n for n in graph.node if n.output[0] == "logits")
        lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
        assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 8
        assert {a.name: a.i for a in lookup.attribute}["bits"] == 8 and set(lookup.input[2:]) <= set(head.input)
        assert ("Slice" in {n.op_type for n in graph.node}) == (group == 256)
        # Each decoder MatMul in the block ExecuTorch and healing give its input width: at 256, a
        # 64-wide input is one block of 64, not a block of 256 that is three quarters padding.
        decoder = [{a.name: a.i for a in n.attribute} for n in graph.node
                   if n.op_type == "MatMulNBits" and n is not head]
        assert decoder and all(a["block_size"] == (group_for(a["K"], group) or group) for a in decoder)
        assert all(a["K"] % a["block_size"] == 0 for a in decoder) and entry.quantization["partial_last_block"] == 0
        # gate/up read one input: one node each layer, counted as two linears
        assert entry.quantization["fused_input_linears"] == 2
        assert sum(entry.quantization["decoder_block_sizes"].values()) == len(decoder) + 2
        assert entry.embedding_tables == 0 and table_copies(list((bundle / "onnx").iterdir()), table) == 0
        # the self-check's reference reads that one table back for both (export/onnx_int4_reference.py)
        overrides = weight_overrides(load_model(open_checkpoint(dense)), bundle / "onnx" / "model.onnx")
        assert overrides["lm_head.weight"] is overrides["model.embed_tokens.weight"]
        # made per call: the lookup dequantizes the rows it reads of the head's blocks
        _per_call_reference_matches_the_kept_one(load_model(open_checkpoint(dense)), bundle / "onnx" / "model.onnx")


def test_optimum_tied_head_gets_its_own_8bit_copy(tiny_tokenizer, tmp_path):
    """optimum's tied head reads the table through a Transpose, which the quantizer cannot see as a
    constant weight: it is given the transposed table first, then quantized to 8 bits; the lookup is
    4-bit, so no fp32 copy of the table is left."""
    from conftest import write_tiny_model

    from rankdown.checkpoint import load_model, open_checkpoint
    from rankdown.compress.config import CompressConfig, Healing
    from rankdown.compress.pipeline import compress
    from rankdown.export.tied_embeddings import table_copies, tied_table

    dense = write_tiny_model(tmp_path / "dense", tiny_tokenizer, seed=5, tie_word_embeddings=True)
    compress(dense, tmp_path / "svd", CompressConfig(method="svd", ratio=0.3, calib_tokens=2048, seq_len=64, healing=Healing(steps=0)),
             progress=quiet)
    manifest = export(tmp_path / "svd", tmp_path / "b", ExportConfig(formats="onnx", quantize="int4", onnx_graph="optimum",
                                                                                head_bits=8),
                      progress=quiet)
    entry = manifest.formats["onnx"]
    assert entry.parity.passed and entry.quantization["head"] == "MatMulNBits 8-bit (own copy of the tied table)"
    graph = onnx.load(str(tmp_path / "b" / "onnx" / "model.onnx"), load_external_data=False).graph
    head = next(n for n in graph.node if n.output[0] == "logits")
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 8
    assert entry.embedding_tables == 0
    assert table_copies([tmp_path / "b" / "onnx" / "model.onnx"], tied_table(load_model(open_checkpoint(dense)))) == 0
    # the self-check's reference: the 8-bit head copy for the head, the 4-bit table for the lookup
    overrides = weight_overrides(load_model(open_checkpoint(tmp_path / "svd")), tmp_path / "b" / "onnx" / "model.onnx")
    head, lookup = overrides["lm_head.weight"], overrides["model.embed_tokens.weight"]
    assert head.shape == lookup.shape and 0 < (head - lookup).abs().max() < 0.5 * head.abs().max()
    _per_call_reference_matches_the_kept_one(load_model(open_checkpoint(tmp_path / "svd")),
                                             tmp_path / "b" / "onnx" / "model.onnx")


def test_feature_biases_leave_no_add_after_a_factor(compressed_tiny, tmp_path):
    """feature's up biases: o/down's in the norms, the rest the MatMulNBits' own bias input, so no
    Add follows a factor; the graph still passes its int4 self-check."""
    folder, _ = compressed_tiny["feature"]
    biased = [n for n, s in FactorRecord.read(folder).modules.items() if s.bias]
    manifest = export(folder, tmp_path / "b", ExportConfig(formats="onnx", quantize="int4"), progress=quiet)
    entry = manifest.formats["onnx"]
    assert entry.parity.passed
    graph = onnx.load(str(tmp_path / "b" / "onnx" / "model.onnx"), load_external_data=False).graph
    assert not [n.name for n in graph.node if n.op_type == "Add" and n.name.endswith("_proj/Add")]
    with_bias = [n for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) == 6]
    assert all(n.name.split("/")[-2] == "up" and n.input[5] in _weights(graph) for n in with_bias)
    residual = sum(1 for n in biased if n.endswith(("o_proj", "down_proj")))
    assert entry.quantization["folded_biases"] == len(with_bias) == len(biased) - residual > 0


def test_first_stages_that_read_one_input_run_as_one_node(compressed_tiny, tmp_path):
    """q/k/v's and gate/up's first stages (a pair's down, or a dense linear) are stacked into one
    MatMulNBits and a Split, with the numbers the separate nodes gave; each member is still counted
    and read back as itself."""
    import shutil

    import numpy as np
    import torch

    from rankdown.checkpoint import load_model, open_checkpoint
    from rankdown.export.decoding import OnnxDecoder
    from rankdown.export.factor_nodes import count_onnx
    from rankdown.export.onnx_int4 import quantize_int4

    folder, _ = compressed_tiny["feature"]
    manifest = export(folder, tmp_path / "fp32", ExportConfig(formats="onnx"), progress=quiet)
    fp32 = tmp_path / "fp32" / "onnx" / "model.onnx"
    record, model = FactorRecord.read(folder), load_model(open_checkpoint(folder))
    logits, read_back = {}, {}
    for fuse in (True, False):
        out = tmp_path / f"fuse-{fuse}"
        summary = quantize_int4(fp32, out / "model.onnx", 32, fuse_inputs=fuse)
        shutil.copy(fp32.parent / "config.json", out / "config.json")
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        fused = [n for n in graph.node if fused_members(n) is not None]
        assert summary.fused_input_linears == sum(len(fused_members(n)) - 1 for n in fused)
        if fuse:
            # two groups a layer; every member a first stage, none with a bias of its own
            assert len(fused) == 2 * 2 and summary.fused_input_linears > 0
            consumers = {i: n for n in graph.node for i in n.input}
            for node in fused:
                split = consumers[node.output[0]]
                assert split.op_type == "Split" and len(split.output) == len(fused_members(node))
                assert all(name.split("/")[-2] != "up" for name, _ in fused_members(node))
                assert len(node.input) <= 4 or not node.input[5]
        else:
            assert not fused and summary.fused_input_linears == 0
        counted = count_onnx(record, out / "model.onnx")
        assert counted.found == counted.expected == manifest.formats["onnx"].factor_nodes.expected
        read_back[fuse] = weight_overrides(model, out / "model.onnx")
        decoder = OnnxDecoder(out / "model.onnx", threads=1)
        logits[fuse] = np.stack([decoder.prefill(list(range(5, 25)))[-1]] + [decoder.step(t) for t in (7, 9, 11)])
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-4)
    assert read_back[True].keys() == read_back[False].keys()
    assert all(torch.equal(read_back[True][k], read_back[False][k]) for k in read_back[True])


@pytest.mark.parametrize("method,head_bits,decoder", [("feature", 8, True), ("joint", 8, True), ("feature", 4, True),
                                                    ("feature", 4, False)])
def test_gptq_picks_new_codes_at_the_quantizers_blocks_and_lowers_the_output_error(compressed_tiny, tmp_path, method,
                                                                                    head_bits, decoder):
    """GPTQ on the graph (export/onnx_int4_gptq.py): the same nodes, scales and zero points as the
    quantizer's nearest rounding, other codes in the 4-bit nodes only (stacked and shared-down nodes
    included; the head when it is 4-bit; the head alone without ``decoder``, as a checkpoint healed
    through the 4-bit weights gets), and the model with the graph's own weights closer to the float
    model on the calibration text than nearest rounding's."""
    import numpy as np
    import torch
    from torch.func import functional_call

    from rankdown.checkpoint import load_model, open_checkpoint
    from rankdown.export.int4_gptq import GptqStatistics
    from rankdown.export.onnx_int4 import quantize_int4
    from rankdown.export.onnx_int4_gptq import gptq_round_graph

    folder, _ = compressed_tiny[method]
    export(folder, tmp_path / "fp32", ExportConfig(formats="onnx"), progress=quiet)
    fp32 = tmp_path / "fp32" / "onnx" / "model.onnx"
    model = load_model(open_checkpoint(folder)).eval()
    windows = torch.randint(3, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    summaries, graphs, error = {}, {}, {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / rounding / "model.onnx"
        reround = (lambda g: gptq_round_graph(g, GptqStatistics(model, windows), quiet, decoder=decoder)) if rounding == "gptq" else None
        summaries[rounding] = quantize_int4(fp32, out, 32, head_bits=head_bits, reround=reround).as_dict()
        graphs[rounding] = onnx.load(str(out)).graph
        weights = weight_overrides(model, out)
        with torch.no_grad():
            logits = functional_call(model, weights, (windows,), strict=False).logits
            error[rounding] = float((logits - model(windows).logits).pow(2).mean())
    assert "gptq" not in summaries["nearest"]
    gptq = summaries["gptq"]["gptq"]
    assert gptq["tokens"] == windows.numel() and 0 < gptq["error_vs_nearest"] < 1
    nodes = {r: {n.name: n for n in g.node} for r, g in graphs.items()}
    assert nodes["gptq"].keys() == nodes["nearest"].keys()
    values = {r: {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer} for r, g in graphs.items()}
    for r, g in graphs.items():  # fp16 scales behind a Cast
        values[r] |= {n.output[0]: values[r][n.input[0]] for n in g.node if n.op_type == "Cast" and n.input[0] in values[r]}
    changed = set()
    for name, node in nodes["gptq"].items():
        if node.op_type != "MatMulNBits":
            continue
        bits = next(a.i for a in node.attribute if a.name == "bits")
        for position, tensor in enumerate(node.input[1:4], start=1):
            same = np.array_equal(values["gptq"][tensor], values["nearest"][tensor])
            if position == 1 and bits == 4:
                changed |= set() if same else {name}
            else:  # scales, zero points, and an 8-bit head's codes: the quantizer's
                assert same, (name, tensor)
    four_bit = {name for name, node in nodes["gptq"].items() if node.op_type == "MatMulNBits"
                and next(a.i for a in node.attribute if a.name == "bits") == 4
                and (decoder or "lm_head" in name)}
    assert changed == four_bit and gptq["linears"] >= len(changed)  # no 4-bit node skipped, no other touched
    assert any("lm_head" in name for name in changed) == (head_bits == 4)
    assert error["gptq"] < error["nearest"]


def test_a_4bit_head_shares_its_blocks_with_the_tied_lookup(tiny_tokenizer, tmp_path):
    """--head-bits 4: the head is 4-bit MatMulNBits and the tied lookup a 4-bit GatherBlockQuantized
    over the same blocks (the table stored once), smaller than the 8-bit head, and within int4 bounds."""
    from conftest import write_tiny_model

    folder = write_tiny_model(tmp_path / "tied", tiny_tokenizer, seed=3, tie_word_embeddings=True)
    sizes = {}
    for bits in (8, 4):
        manifest = export(folder, tmp_path / f"b{bits}", ExportConfig(formats="onnx", quantize="int4", head_bits=bits),
                          progress=quiet)
        entry = manifest.formats["onnx"]
        assert entry.parity.passed and entry.quantization["head"] == f"MatMulNBits {bits}-bit"
        graph = onnx.load(str(tmp_path / f"b{bits}" / "onnx" / "model.onnx"), load_external_data=False).graph
        head = next(n for n in graph.node if "logits" in n.output)
        lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lookup.attribute}
        assert {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}["bits"] == attrs["bits"] == bits
        reshape = next(n for n in graph.node if lookup.input[0] in n.output)
        assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1]  # the head's own blocks
        head_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
        table = {(head_attrs["N"], head_attrs["K"]), (head_attrs["K"], head_attrs["N"])}
        assert not [i.name for i in graph.initializer if tuple(i.dims) in table]  # no fp32 table left
        sizes[bits] = sum(f.bytes for name, f in entry.files.items() if not name.endswith(".json"))
    assert sizes[4] < sizes[8]


def test_head_bits_is_refused_without_int4():
    with pytest.raises(RankdownError, match="--head-bits applies to --quantize int4"):
        ExportConfig(formats="onnx", quantize="int8", head_bits=4)
    with pytest.raises(RankdownError, match="--head-bits must be one of 4, 8"):
        ExportConfig(formats="onnx", quantize="int4", head_bits=2)



def test_a_missed_float_floor_says_the_rounding_cost_it_and_min_top1_accepts_it(onnx_int4_bundles, tmp_path,
                                                                                        capsys):
    """An int4 artifact whose runtime matches its quantized PyTorch model but keeps fewer of the float
    model's top tokens than the floor fails in one line that puts the loss on the weights and names
    the floor that would accept it; exported with that floor it passes, the manifest records it, and
    validate holds the bundle to the floor it was exported with (a bad one in the manifest is named)."""
    import json
    import re

    from rankdown.cli import main

    folder, _, (_, default) = onnx_int4_bundles
    kept = default.formats["onnx"].parity.top1_agreement
    assert kept < 1.0  # int4 moves some top tokens of this model: a floor of 1.0 cannot hold
    with pytest.raises(RankdownError) as failed:
        export(folder, tmp_path / "strict", ExportConfig(formats="onnx", quantize="int4", min_top1=1.0), progress=quiet)
    message = str(failed.value)
    assert "\n" not in message
    assert re.search(r"onnx export failed its parity self-check against the float model( on [a-z, ]+ text)?: "
                     r"top-1 agreement [0-9.]+% < 100.0% \(its runtime matches", message), message
    assert "its runtime matches the int4 PyTorch model" in message and "--weights int4" in message
    assert "`--head-bits 8` keeps an 8-bit head" in message  # the default head is 4-bit under GPTQ
    accept = float(re.search(r"`--min-top1 ([0-9.]+)` accepts this format's loss", message).group(1))
    assert accept <= kept < accept + 0.05
    assert not (tmp_path / "strict").exists()
    bundle = tmp_path / "accepted"
    manifest = export(folder, bundle, ExportConfig(formats="onnx", quantize="int4", min_top1=accept), progress=quiet)
    assert manifest.options["min_top1"] == accept and manifest.formats["onnx"].parity.passed
    plain = ValidateConfig(runtimes="onnxruntime", latency=None, max_examples=3, max_tokens=256)
    passed = validate(bundle, plain, progress=quiet)
    assert "onnxruntime.parity.float_top1_agreement" not in passed.failures
    assert passed.runtimes["onnxruntime"].parity.float_top1_floor == accept  # reported beside the top-1
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["options"]["min_top1"] = 1.0  # the floor the bundle says it was exported with, and no other
    (bundle / "manifest.json").write_text(json.dumps(raw))
    status = main(["validate", str(bundle), "--runtime", "onnxruntime", "--no-latency", "--max-examples", "3",
                   "--report", str(tmp_path / "report")])
    printed = capsys.readouterr().out
    assert status == 1 and "top-1 against the float model" in printed and ", floor 100.0%" in printed, printed
    failed_floor = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "onnxruntime.parity.float_top1_agreement" in failed_floor["failures"]
    assert failed_floor["runtimes"]["onnxruntime"]["parity"]["float_top1_floor"] == 1.0
    assert "floor 100.0%" in (tmp_path / "report" / "report.md").read_text()
    raw["options"]["min_top1"] = "high"
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(RankdownError, match=r"manifest.json: options.min_top1 must be a share in \(0, 1\], got 'high'"):
        validate(bundle, plain, progress=quiet)


def test_min_top1_is_a_share_and_only_for_quantized_exports(tiny_model_dir, tmp_path):
    assert ExportConfig(quantize="int4", min_top1=0.5).thresholds.min_top1_agreement == 0.5
    assert ExportConfig(quantize="int4", min_top1=0.5).floor_thresholds.min_top1_agreement == 0.5
    assert ExportConfig(quantize="int4").floor_thresholds.min_top1_agreement == 0.6
    assert ExportConfig(quantize="int8", min_top1=0.7).thresholds.min_top1_agreement == 0.7
    for bad in (0, 1.5, -0.1, True, float("nan")):
        with pytest.raises(RankdownError, match="--min-top1 must be a share in"):
            ExportConfig(quantize="int4", min_top1=bad)
    with pytest.raises(RankdownError, match="--min-top1 applies to --quantize int8 or int4"):
        ExportConfig(quantize="none", min_top1=0.5)
    # auto: a dense checkpoint exports in float, which the floor does not apply to; said before any work
    with pytest.raises(RankdownError, match=r"--min-top1 applies to a quantized export \(this checkpoint exports in "
                                            r"float unless --quantize int8 or int4 is given\)"):
        export(tiny_model_dir, tmp_path / "b", ExportConfig(min_top1=0.5), progress=quiet)
    assert not (tmp_path / "b").exists()

def _per_call_reference_matches_the_kept_one(model, graph) -> None:
    """Past ``keep_bytes`` the int4 reference dequantizes each linear's weight when it runs (and a
    lookup's rows when they are read) instead of keeping a second float copy of the model: the same
    logits to the bit as the kept reference, the float model's differ, and the model is left as it was."""
    import numpy as np
    import torch

    from rankdown.export.onnx_int4_reference import int4_reference
    from rankdown.export.parity import torch_greedy

    before = {name: p.clone() for name, p in model.named_parameters()}
    prompt = [5, 9, 13, 9, 40, 2]
    kept_reference, per_call_reference = int4_reference(model, graph), int4_reference(model, graph, keep_bytes=0)
    assert kept_reference.note is None and "dequantized per call" in per_call_reference.note  # the progress line
    kept = torch_greedy(kept_reference, prompt, 6)
    per_call = torch_greedy(per_call_reference, prompt, 6)
    assert kept.tokens == per_call.tokens
    assert np.array_equal(kept.prompt_logits, per_call.prompt_logits)
    assert np.array_equal(kept.step_logits, per_call.step_logits)
    assert not np.array_equal(torch_greedy(model, prompt, 6).prompt_logits, kept.prompt_logits)  # 4-bit weights
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert not any("forward" in vars(module) for module in model.modules())


def test_the_read_back_made_per_call_computes_what_the_kept_one_does(onnx_int4_bundles):
    from rankdown.checkpoint import load_model, open_checkpoint

    folder, _, (bundle, _) = onnx_int4_bundles
    _per_call_reference_matches_the_kept_one(load_model(open_checkpoint(folder)), bundle / "onnx" / "model.onnx")


def test_the_attention_kernel_bench_times_two_graphs_that_compute_the_same_attention():
    """bench.onnx_attention_ops compares GroupQueryAttention with ONNX's Attention: its verdict
    means something only if both graphs give one token the same output from the same cache."""
    import numpy as np
    import onnxruntime as ort

    from bench.onnx_attention_ops import graphs

    results = []
    for _, model, feeds, _ in graphs(layers=2, position=40):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        results.append(session.run(["out0", "out1"], feeds))
    for fused, plain in zip(*results):
        assert fused.shape == plain.shape == (1, 1, 9 * 64)
        np.testing.assert_allclose(fused, plain, atol=1e-5)


def test_the_openvino_bench_decodes_as_the_project_decoder_does(onnx_int4_bundles):
    """bench/onnx_openvino.py runs its own greedy loop (it lives in a venv without the project): on the
    CPU provider it must pick the tokens rankdown's OnnxDecoder picks, or its OpenVINO verdict means nothing."""
    import json

    import onnxruntime as ort

    from bench.onnx_openvino import decode
    from rankdown.export.decoding import OnnxDecoder, greedy

    _, _, (bundle, _) = onnx_int4_bundles
    genai = json.loads((bundle / "onnx" / "genai_config.json").read_text())["model"]["decoder"]
    prompt = [5, 17, 42, 99, 7, 3]
    session = ort.InferenceSession(str(bundle / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, first, seconds = decode(session, prompt, 8, genai["num_key_value_heads"], genai["head_size"])
    reference = greedy(OnnxDecoder(bundle / "onnx" / "model.onnx", threads=1), prompt, 9)
    assert tuple(ids) == reference.tokens
    assert len(seconds) == 8 and first.shape == reference.prompt_logits[-1].shape
