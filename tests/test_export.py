"""export/: both formats on tiny Llamas of every module shape, self-checked against PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_tiny_model
from helpers import cli_in_process, quiet

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.decoding import DECODE_METHOD, ExecuTorchDecoder, OnnxDecoder, greedy
from rankdown.export.factor_nodes import count_exported_program, count_onnx
from rankdown.export.manifest import Manifest, verify_files
from rankdown.export.parity import torch_greedy
from rankdown.export.pipeline import export
from rankdown.factor_record import FactorRecord, ModuleFactor


def _expected_nodes(folder) -> int:
    record = FactorRecord.read(folder)
    return sum(1 if spec.shares_down_with else 2 for spec in record.modules.values())


@pytest.fixture(scope="session")
def joint_int8_bundle(compressed_tiny, tmp_path_factory):
    folder, _ = compressed_tiny["joint"]
    bundle = tmp_path_factory.mktemp("bundles") / "joint-int8"
    return bundle, export(folder, bundle, ExportConfig(max_seq_len=128, quantize="int8"), progress=quiet)


def test_bundle_layout_manifest_and_counts(joint_bundle):
    folder, bundle, manifest = joint_bundle
    assert (bundle / "onnx" / "model.onnx").is_file() and (bundle / "executorch" / "model.pte").is_file()
    assert (bundle / "tokenizer.json").is_file()
    assert not list(bundle.parent.glob(".joint.tmp-*"))
    read = Manifest.read(bundle)
    assert read == manifest
    verify_files(bundle, read)
    record = FactorRecord.read(folder)
    owners = {s.shares_down_with for s in record.modules.values() if s.shares_down_with}
    for name in ("onnx", "executorch"):
        entry = read.formats[name]
        nodes = entry.factor_nodes
        assert nodes.pairs == len(record.modules) and nodes.shared_groups == len(owners) == 4
        assert nodes.found == nodes.expected == _expected_nodes(folder)
        assert nodes.dense_linears == 1  # lm_head
        parity = entry.parity
        assert parity.passed and parity.greedy_match and parity.top1_agreement == 1.0
        assert parity.max_abs_logit_diff <= 1e-3 * parity.logit_scale
        assert parity.prompts == 3 and parity.new_tokens == 32 and parity.tasks == ("math", "code", "prose")  # fp32: generic
    assert read.formats["executorch"].delegation["delegated_nodes"] > 0
    assert set(read.formats["executorch"].files) == {"executorch/model.pte"}  # untied: no .ptd
    assert read.source.factorized and read.source.compression["method"] == "joint"
    assert read.model.ranks == {n: s.rank for n, s in record.modules.items()}
    assert {"torch", "executorch", "onnxruntime", "optimum"} <= set(read.versions)
    assert read.options["formats"] == ["onnx", "executorch"] and read.options["quantize"] == "none"
    assert read.options["decode_method"] is True


def test_the_fused_graph_has_the_peers_ops_and_every_pair_as_two_matmuls(joint_bundle):
    """onnxruntime-genai's builder graph: attention with its KV cache and rotary in one
    GroupQueryAttention per layer, RMSNorm + residual in SkipSimplifiedLayerNormalization, and each
    factor pair as two MatMuls (a shared down once per group), none multiplied back into a dense weight."""
    import onnx

    folder, bundle, manifest = joint_bundle
    record = FactorRecord.read(folder)
    config = open_checkpoint(folder).config
    graph = onnx.load(str(bundle / "onnx" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == config.num_hidden_layers
    assert not {"RotaryEmbedding", "Softmax"} & set(ops)  # rotary inside the attention op
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * config.num_hidden_layers
    factors = [n for n in graph.node if n.op_type == "MatMul" and n.name.split("/")[-2] in ("down", "up")]
    assert len(factors) == _expected_nodes(folder) == manifest.formats["onnx"].factor_nodes.found
    assert len(factors) == 2 * len(record.modules) - sum(1 for s in record.modules.values() if s.shares_down_with)
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    dense = {(s.in_features, s.out_features) for s in record.modules.values()}
    assert not any(shape in dense or shape[::-1] in dense for shape in weights.values() if len(shape) == 2)
    assert {i.name for i in graph.input} == {"input_ids", "attention_mask"} | \
        {f"past_key_values.{i}.{kv}" for i in range(config.num_hidden_layers) for kv in ("key", "value")}


def test_the_optimum_graph_stays_an_option_and_loads_in_optimum(compressed_tiny, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, _ = compressed_tiny["joint"]
    bundle = tmp_path / "optimum"
    manifest = export(folder, bundle, ExportConfig(formats="onnx", onnx_graph="optimum"), progress=quiet)
    assert manifest.formats["onnx"].parity.passed and manifest.options["onnx_graph"] == "optimum"
    assert manifest.options["decode_method"] is False  # no .pte, so no one-token method
    assert manifest.formats["onnx"].factor_nodes.found == _expected_nodes(folder)
    assert not OnnxDecoder(bundle / "onnx" / "model.onnx").in_place  # this graph concatenates past and new
    ort_model = ORTModelForCausalLM.from_pretrained(bundle / "onnx")
    model = load_model(open_checkpoint(folder)).eval()
    ids = load_tokenizer(folder)("12+7=", return_tensors="pt", return_token_type_ids=False)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        expected = model.generate(**ids, **kwargs)
    assert torch.equal(ort_model.generate(**ids, **kwargs), expected)


def test_pte_carries_llm_runner_metadata(joint_bundle):
    from executorch.runtime import Runtime

    folder, bundle, _ = joint_bundle
    program = Runtime.get().load_program(bundle / "executorch" / "model.pte")
    def value(name):
        return program.load_method(name).execute([])[0]
    assert value("get_max_seq_len") == 128 and value("get_max_context_len") == 128
    assert value("get_vocab_size") == open_checkpoint(folder).config.vocab_size
    assert value("get_bos_id") == 0 and bool(value("use_kv_cache")) and bool(value("enable_dynamic_shape"))


@pytest.mark.slow
def test_executorch_llm_runner_answers_like_torch(shipped_math_bundle):
    """The C++ runner phone apps link (TextLLMRunner) runs the .pte with the bundle's tokenizer
    and the metadata methods, and prints what PyTorch's greedy decoding prints. The runner adds
    no BOS unless asked (num_bos defaults to 0) and samples at 0.8 by default."""
    # As the README tells an app: the attention kernels register with this import (the bundle may
    # have been built in another process, so nothing here has imported them yet).
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    folder, bundle = shipped_math_bundle
    tokenizer = load_tokenizer(folder)
    model = load_model(open_checkpoint(folder)).eval()
    # The bundle has the one-token method (as an int4 export has by default); TextLLMRunner must still run forward alone
    # (it sends tokens to a method named "decode", whose cache it does not share with forward).
    assert DECODE_METHOD in ExecuTorchDecoder(bundle / "executorch" / "model.pte").program.method_names
    runner = TextLLMRunner(str(bundle / "executorch" / "model.pte"), str(bundle / "tokenizer.json"))
    for prompt in ("12+7=", "95-38=", "40+59="):
        reference = torch_greedy(model, tokenizer(prompt)["input_ids"], 4)
        pieces: list[str] = []
        runner.generate(prompt, GenerationConfig(max_new_tokens=4, temperature=0.0, echo=False, num_bos=1),
                        token_callback=pieces.append)
        assert "".join(pieces) == tokenizer.decode(list(reference.tokens), skip_special_tokens=True)
        runner.reset()


def test_prompt_is_one_call_of_any_length(joint_bundle):
    """The prefill length is dynamic: prompts of other lengths than the example input (8)
    run in one call and match PyTorch at every position."""
    folder, bundle, _ = joint_bundle
    model = load_model(open_checkpoint(folder)).eval()
    for decoder in (OnnxDecoder(bundle / "onnx" / "model.onnx"), ExecuTorchDecoder(bundle / "executorch" / "model.pte")):
        for length in (1, 3, 60):
            prompt = list(range(3, 3 + length))
            got = greedy(decoder, prompt, 4)
            ref = torch_greedy(model, prompt, 4)
            assert got.prompt_logits.shape == (length, model.config.vocab_size)
            np.testing.assert_allclose(got.prompt_logits, ref.prompt_logits, atol=1e-4)
            assert got.tokens == ref.tokens


def test_loading_a_pte_prints_no_threadpool_probing(joint_bundle):
    """ExecuTorch's C++ threadpool logs the /sys files it probes for an ARM core id at a process's
    first load; the decoder keeps those lines off the terminal (in a fresh process: once per process)."""
    _, bundle, _ = joint_bundle
    script = ("import sys; from rankdown.export.decoding import ExecuTorchDecoder, greedy; "
              "print(list(greedy(ExecuTorchDecoder(sys.argv[1]), [3, 4, 5], 2).tokens))")
    done = subprocess.run([sys.executable, "-c", script, str(bundle / "executorch" / "model.pte")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[") and "cpuinfo_utils" not in done.stderr


def test_decoder_refuses_more_positions_than_the_cache(joint_bundle):
    _, bundle, _ = joint_bundle
    decoder = ExecuTorchDecoder(bundle / "executorch" / "model.pte")
    with pytest.raises(ValueError, match="exceeds the artifact's 128 positions"):
        greedy(decoder, list(range(3, 103)), 40)


@pytest.mark.parametrize("method", ["svd", "feature", "basis"])
def test_every_method_shape_exports_to_onnx(compressed_tiny, tmp_path, method):
    folder, _ = compressed_tiny[method]
    manifest = export(folder, tmp_path / "b", ExportConfig(formats="onnx"), progress=quiet)
    nodes = manifest.formats["onnx"].factor_nodes
    assert nodes.found == nodes.expected == _expected_nodes(folder) and nodes.shared_groups == 0
    assert manifest.formats["onnx"].parity.passed and set(manifest.formats) == {"onnx"}


def test_feature_pairs_with_bias_export_to_executorch_forward_only(compressed_tiny, tmp_path):
    """Biased pairs, exported with ``decode_method=False`` (``--no-decode-method``): a program with
    forward alone, which every runner then calls for each token too."""
    folder, _ = compressed_tiny["feature"]
    assert any(s.bias for s in FactorRecord.read(folder).modules.values())
    manifest = export(folder, tmp_path / "b", ExportConfig(formats="executorch", max_seq_len=64, decode_method=False),
                      progress=quiet)
    entry = manifest.formats["executorch"]
    assert entry.parity.passed and entry.factor_nodes.found == _expected_nodes(folder)
    decoder = ExecuTorchDecoder(tmp_path / "b" / "executorch" / "model.pte")
    assert DECODE_METHOD not in decoder.program.method_names and decoder.decode is None
    assert manifest.options["decode_method"] is False
    assert not any(key.endswith(DECODE_METHOD) for key in entry.delegation)


def test_feature_residual_biases_fold_into_the_norms(compressed_tiny, tmp_path):
    """A bias on o_proj / down_proj is the SkipSimplifiedLayerNormalization's bias input, not an Add
    node (the other pairs' biases stay Adds), and the graph still matches PyTorch."""
    import onnx

    folder, _ = compressed_tiny["feature"]
    modules = FactorRecord.read(folder).modules
    residual = {n for n, s in modules.items() if s.bias and n.endswith(("o_proj", "down_proj"))}
    other = {n for n, s in modules.items() if s.bias} - residual
    assert residual and other
    manifest = export(folder, tmp_path / "b", ExportConfig(formats="onnx"), progress=quiet)
    assert manifest.formats["onnx"].parity.passed
    graph = onnx.load(str(tmp_path / "b" / "onnx" / "model.onnx"), load_external_data=False).graph
    adds = [n.name for n in graph.node if n.op_type == "Add"]
    assert not [a for a in adds if a.endswith(("o_proj/Add", "down_proj/Add"))]
    assert len([a for a in adds if a.endswith("_proj/Add")]) == len(other)
    biased_norms = [n for n in graph.node if n.op_type == "SkipSimplifiedLayerNormalization" and len(n.input) == 4]
    assert len(biased_norms) == len(residual)
    initializers = {i.name for i in graph.initializer}
    assert all(n.input[3] in initializers for n in biased_norms)


def test_dense_model_with_tied_embeddings_exports(tiny_tokenizer, tmp_path):
    """Llama-3.2-style tied embeddings: a dense checkpoint goes through both formats."""
    folder = write_tiny_model(tmp_path / "tied", tiny_tokenizer, seed=3, tie_word_embeddings=True)
    manifest = export(folder, tmp_path / "b", ExportConfig(max_seq_len=64), progress=quiet)
    for name, entry in manifest.formats.items():
        assert entry.parity.passed and entry.factor_nodes.expected == entry.factor_nodes.found == 0
        assert entry.parity.tasks == ("math", "code", "prose")  # dense: no task of its own
        # ONNX (fused): q/k/v packed into one MatMul, 5 per layer, and the head (it holds the table; the
        # lookup reads it through a Transpose); ExecuTorch: 7 per layer, the head maybe through a transpose
        assert entry.factor_nodes.dense_linears in ((2 * 5 + 1,) if name == "onnx" else (2 * 7, 2 * 7 + 1))
        assert entry.embedding_tables == 1
    assert not manifest.source.factorized and manifest.source.compression is None


def test_int8_quantizes_every_linear_and_keeps_quality(joint_bundle, joint_int8_bundle):
    """Stated bound: int8 perplexity within 3% of fp32 in the same runtime, top-1 >= 80%."""
    import onnx

    from rankdown.evaluate import EvalConfig, token_windows
    from rankdown.tasks import Split, load_task
    from rankdown.validate.on_device import perplexity

    _, fp32, fp32_manifest = joint_bundle
    int8, manifest = joint_int8_bundle
    graph = onnx.load(str(int8 / "onnx" / "model.onnx")).graph
    quantized = sum(n.op_type == "MatMulInteger" for n in graph.node)
    nodes = manifest.formats["onnx"].factor_nodes
    assert quantized == nodes.found + nodes.dense_linears  # every factor and the head, nothing else
    int8_bytes = sum(len(t.raw_data) for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8)
    head = manifest.model.vocab_size * 64
    assert int8_bytes == manifest.model.decoder_linear_params + head  # one byte per linear weight
    windows = token_windows(load_tokenizer(int8), load_task("math", Split.EVALUATION).texts,
                            EvalConfig(window=64, max_tokens=2048))
    for name, make in (("onnx", lambda b: OnnxDecoder(b / "onnx" / "model.onnx")),
                       ("executorch", lambda b: ExecuTorchDecoder(b / "executorch" / "model.pte"))):
        entry = manifest.formats[name]
        assert entry.quantize == "int8" and entry.parity.passed and entry.parity.top1_agreement >= 0.8
        # int8 saves 3 of every 4 bytes of each linear weight; scales and graph nodes cost a little.
        saved = (sum(f.bytes for f in fp32_manifest.formats[name].files.values())
                 - sum(f.bytes for f in entry.files.values()))
        assert saved > 0.4 * 4 * (manifest.model.decoder_linear_params + head), (name, saved)
        ppl_int8, _ = perplexity(make(int8), windows)
        ppl_fp32, _ = perplexity(make(fp32), windows)
        assert abs(ppl_int8 / ppl_fp32 - 1) < 0.03, (name, ppl_int8, ppl_fp32)


def _fake_record(module: str, in_features: int, out_features: int) -> FactorRecord:
    return FactorRecord({module: ModuleFactor(rank=4, in_features=in_features, out_features=out_features, bias=False)})


@pytest.mark.parametrize(("module", "out_features"), [("model.layers.1.mlp.up_proj", 128),
                                                      ("model.layers.0.self_attn.o_proj", 64)])
def test_a_folded_pair_is_caught_in_the_onnx_graph(tiny_model_dir, tmp_path, module, out_features):
    """The builder names attention ``attn`` (``/model/layers.0/attn/o_proj/MatMul``): still found."""
    export(tiny_model_dir, tmp_path / "dense", ExportConfig(formats="onnx", check=False), progress=quiet)
    record = _fake_record(module, 64, out_features)
    with pytest.raises(RankdownError, match=f"{module.rsplit('.', 1)[1]} was folded into one dense {out_features}x64 matmul"):
        count_onnx(record, tmp_path / "dense" / "onnx" / "model.onnx")


def _exported_program(folder):
    from rankdown.export.executorch import trace

    return trace(load_model(open_checkpoint(folder)).eval(), 32)[0]


def test_a_folded_pair_is_caught_in_the_exported_program(tiny_model_dir):
    record = _fake_record("model.layers.0.self_attn.o_proj", 64, 64)
    with pytest.raises(RankdownError, match="o_proj was folded"):
        count_exported_program(record, _exported_program(tiny_model_dir), "test")


def test_shared_down_runs_once_per_group_in_executorch(compressed_tiny):
    """Eager mode applies a group's down once per member; the export must merge them (1 + k nodes)."""
    from rankdown.export.executorch import _run_shared_down_once

    folder, _ = compressed_tiny["joint"]
    record = FactorRecord.read(folder)
    program = _exported_program(folder)
    with pytest.raises(RankdownError, match="down appears 2 times; each factor runs once"):
        count_exported_program(record, program, "test")
    assert _run_shared_down_once(program) == 4
    assert count_exported_program(record, program, "test").found == _expected_nodes(folder)


def test_parity_failure_is_an_error_and_leaves_no_bundle(compressed_tiny, tmp_path, monkeypatch):
    import rankdown.export.decoding as decoding

    class Corrupted(OnnxDecoder):
        def prefill(self, ids):
            return super().prefill(ids) + 0.05 * np.sin(np.arange(len(ids)))[:, None]

    monkeypatch.setattr(decoding, "OnnxDecoder", Corrupted)
    folder, _ = compressed_tiny["svd"]
    with pytest.raises(RankdownError, match="onnx export failed its parity self-check against the float model: max \\|logit diff\\|"):
        export(folder, tmp_path / "b", ExportConfig(formats="onnx"), progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_manifest_detects_tampering_and_unknown_keys(joint_bundle, tmp_path):
    _, bundle, _ = joint_bundle
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest = Manifest.read(copy)
    with open(copy / "onnx" / "model.onnx", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(RankdownError, match="onnx/model.onnx does not match the manifest"):
        verify_files(copy, manifest)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["formats"]["onnx"]["surprise"] = 1
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(RankdownError, match="unknown keys \\['surprise'\\]"):
        Manifest.read(copy)


@pytest.mark.parametrize("case,pattern", [
    ("not-a-checkpoint", "config.json"),
    ("unknown-format", "unknown --format 'tflite': choose one of onnx, executorch"),
    ("coreml", "--backend coreml needs macOS"),
    ("no-parent", "parent folder"),
    ("inside-input", "must not be, contain, or lie inside the input"),
])
def test_cli_bad_input_is_one_clear_line(tiny_model_dir, tmp_path, capsys, case, pattern):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "not-a-checkpoint": [empty, "-o", tmp_path / "b"],
        "unknown-format": [tiny_model_dir, "-o", tmp_path / "b", "--format", "onnx,tflite"],
        "coreml": [tiny_model_dir, "-o", tmp_path / "b", "--format", "executorch", "--backend", "coreml"],
        "no-parent": [tiny_model_dir, "-o", tmp_path / "missing" / "b"],
        "inside-input": [tiny_model_dir, "-o", tiny_model_dir / "bundle"],
    }[case]
    status, stderr = cli_in_process(capsys, "export", *args)
    assert status == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("rankdown export: error:")]
    assert len(errors) == 1 and pattern in errors[0], stderr
    assert not (tmp_path / "b").exists() and not (tiny_model_dir / "bundle").exists()


def test_a_corrupt_compression_report_is_one_line_and_leaves_no_bundle(tiny_tokenizer, tmp_path):
    """compression.json decides the int4 float floor's prompts and scales: a broken one is named, not a traceback."""
    folder = write_tiny_model(tmp_path / "m", tiny_tokenizer)
    (folder / "compression.json").write_text("{not json")
    with pytest.raises(RankdownError, match=r"compression\.json: invalid compression report"):
        export(folder, tmp_path / "b", ExportConfig(formats="onnx", max_seq_len=64), progress=quiet)
    assert not (tmp_path / "b").exists()


def test_a_dense_layer_after_one_with_factor_pairs_reads_only_its_own_packed_qkv(tiny_model_dir, tmp_path):
    """The builder packs Q/K/V where all three are dense and used to keep the previous layer's K and V
    paths: the dense layer's attention then read the earlier layer's keys (error ranks leave such layers)."""
    import onnx
    import onnxruntime as ort

    from rankdown.export.onnx_builder import build_fused_onnx
    from rankdown.factor import FactorizedLinear

    model = load_model(open_checkpoint(tiny_model_dir))
    q = model.model.layers[0].self_attn.q_proj
    u, s, vh = torch.linalg.svd(q.weight.detach(), full_matrices=False)
    model.model.layers[0].self_attn.q_proj = FactorizedLinear.from_factors(vh[:8], u[:, :8] * s[:8], None)
    build_fused_onnx(model, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert attention[0].input[1] and attention[0].input[2]  # layer 0: separate Q, K, V
    assert attention[1].input[0].endswith("qkv_proj/MatMul/output_0") and attention[1].input[1:3] == ["", ""]
    ort.InferenceSession(str(tmp_path / "model.onnx"))  # shape inference failed on the stale inputs
