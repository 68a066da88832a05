"""onnxruntime-genai runs the ONNX bundle as exported: the export writes genai_config.json (and the
tokenizer beside it) into onnx/, the manifest hashes them, the Generator's greedy tokens are
PyTorch's, and ``validate --runtime onnxruntime-genai`` judges it like onnxruntime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
from helpers import quiet
from tokenizers import Tokenizer

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.errors import RankdownError
from rankdown.export.bundle_tokenizer import check_texts
from rankdown.export.config import ExportConfig
from rankdown.export.decoding import OnnxDecoder
from rankdown.export.manifest import MANIFEST_FILE, Manifest, sha256_file
from rankdown.export.onnx_genai import GenaiDecoder, genai_encodings, genai_readable
from rankdown.export.parity import parity_prompts, torch_greedy
from rankdown.export.pipeline import export
from rankdown.validate.config import LatencyPlan, ValidateConfig
from rankdown.validate.harness import _runtimes, validate

FAST = dict(max_examples=10, max_tokens=256, latency=LatencyPlan(prompt_lengths=(8,), decode_tokens=8, repeats=1))


@pytest.fixture(scope="module")
def genai_bundles(tiny_model_dir, tmp_path_factory):
    """The tiny model with shared-down factor pairs (joint, data-free) to ONNX, fp32 and int4:
    (checkpoint, fp32 bundle, int4 bundle)."""
    from rankdown.compress.config import CompressConfig, Healing
    from rankdown.compress.pipeline import compress

    root = tmp_path_factory.mktemp("genai")
    compress(tiny_model_dir, root / "ckpt", CompressConfig(method="joint", ratio=0.3, calib_tokens=1024, seq_len=64,
                                                           healing=Healing(steps=0)), progress=quiet)
    export(root / "ckpt", root / "fp32", ExportConfig(formats="onnx"), progress=quiet)
    export(root / "ckpt", root / "int4", ExportConfig(formats="onnx", quantize="int4"), progress=quiet)
    return root / "ckpt", root / "fp32", root / "int4"


def test_export_writes_a_genai_config_naming_the_graphs_io_and_the_manifest_lists_it(genai_bundles):
    _, bundle, _ = genai_bundles
    files = Manifest.read(bundle).formats["onnx"].files
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        entry = files[f"onnx/{name}"]
        assert (entry.bytes, entry.sha256) == ((bundle / "onnx" / name).stat().st_size, sha256_file(bundle / "onnx" / name))
    config = json.loads((bundle / "onnx" / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    graph = onnx.load(str(bundle / "onnx" / "model.onnx"), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    layers = decoder["num_hidden_layers"]
    # The model builder's graph: positions come from the mask inside GroupQueryAttention (no position_ids).
    assert {decoder["inputs"][k] for k in ("input_ids", "attention_mask")} | \
        {decoder["inputs"][k] % i for k in ("past_key_names", "past_value_names") for i in range(layers)} == inputs
    assert {decoder["outputs"]["logits"]} | \
        {decoder["outputs"][k] % i for k in ("present_key_names", "present_value_names") for i in range(layers)} == outputs
    model_config = json.loads((bundle / "onnx" / "config.json").read_text())
    assert config["model"]["context_length"] == model_config["max_position_embeddings"] == 256
    # GroupQueryAttention writes the step into a cache of max_length positions that past and present share.
    assert (decoder["filename"], config["model"]["type"], config["search"]["past_present_share_buffer"]) == \
        ("model.onnx", "llama", True)
    assert {n.op_type for n in graph.node} >= {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}


def test_genai_tokenizer_encodes_real_prompts_as_the_model_tokenizer_without_bos(genai_bundles):
    ckpt, bundle, _ = genai_bundles
    tokenizer = og.Tokenizer(og.Model(str(bundle / "onnx")))
    reference = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for text in check_texts():
        assert [int(t) for t in tokenizer.encode(text)] == reference.encode(text, add_special_tokens=False).ids


def test_genai_generator_greedy_tokens_equal_pytorch(genai_bundles):
    """The way an app runs it: append the prompt, then generate_next_token until max_length."""
    ckpt, bundle, _ = genai_bundles
    model = load_model(open_checkpoint(ckpt)).eval()
    genai = og.Model(str(bundle / "onnx"))
    for prompt in parity_prompts(load_tokenizer(bundle), room=200):
        want = torch_greedy(model, prompt, 24).tokens
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
        generator = og.Generator(genai, params)
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        assert [int(t) for t in generator.get_sequence(0)][len(prompt):] == list(want)


def test_validate_passes_in_onnxruntime_genai_on_the_fp32_bundle(genai_bundles):
    _, bundle, _ = genai_bundles
    report = validate(bundle, ValidateConfig(runtimes="onnxruntime-genai", **FAST), progress=quiet)
    result = report.runtimes["onnxruntime-genai"]
    assert report.passed and result.passed, report.failures
    assert result.parity.greedy_match and result.parity.cache_consistent and result.parity.top1_agreement == 1.0
    assert result.parity.max_abs_logit_diff <= 1e-3 * result.parity.logit_scale
    assert result.quality.exact_match is not None and result.latency is not None
    assert result.latency.decode_tokens_per_s.median > 0
    # Run only when named: the bundle's own runtime stays the default.
    assert [r.value for r in _runtimes(bundle, Manifest.read(bundle), ValidateConfig())] == ["onnxruntime"]


def test_the_int4_bundle_runs_in_genai_with_onnxruntimes_logits(genai_bundles):
    """MatMulNBits and GatherBlockQuantized (opset 21) run in onnxruntime-genai 0.18 as in onnxruntime."""
    _, _, bundle = genai_bundles
    prompt = parity_prompts(load_tokenizer(bundle), room=200)[1]
    genai, plain = GenaiDecoder(bundle / "onnx", threads=1), OnnxDecoder(bundle / "onnx" / "model.onnx", threads=1)
    np.testing.assert_allclose(genai.prefill(prompt), plain.prefill(prompt), atol=1e-5)
    token = int(np.argmax(plain.prefill(prompt)[-1]))
    genai.prefill(prompt)
    np.testing.assert_allclose(genai.step(token), plain.step(token), atol=1e-5)
    report = validate(bundle, ValidateConfig(runtimes="onnxruntime-genai", latency=None, max_examples=3, max_tokens=128),
                      progress=quiet)
    assert report.passed, report.failures


@pytest.mark.parametrize("which", [1, 2])
def test_onnxruntime_writes_the_builders_cache_in_place_with_the_concatenating_logits(genai_bundles, which):
    """One buffer per layer bound as past and present (as onnxruntime-genai runs the graph), grown
    from 4 positions while decoding: every logit equals the path that concatenates the cache."""
    bundle = genai_bundles[which]
    prompt = parity_prompts(load_tokenizer(bundle), room=200)[0]
    in_place = OnnxDecoder(bundle / "onnx" / "model.onnx", threads=1, cache_positions=4)
    growing = OnnxDecoder(bundle / "onnx" / "model.onnx", threads=1, in_place=False)
    assert in_place.in_place and not growing.in_place
    for ids in (prompt, prompt[:3]):  # a second prefill starts a fresh cache
        np.testing.assert_allclose(in_place.prefill(ids), growing.prefill(ids), rtol=0, atol=1e-6)
        token = 7
        for _ in range(24):
            expected = growing.step(token)
            np.testing.assert_allclose(in_place.step(token), expected, rtol=0, atol=1e-6)
            token = int(np.argmax(expected))
        assert in_place._length == len(ids) + 24 <= in_place._capacity < 2 * (len(ids) + 24)


def test_a_bundle_without_genai_config_refuses_the_runtime_in_one_line(genai_bundles, tmp_path):
    """A bundle exported before genai_config.json existed: the file is absent and unlisted."""
    _, bundle, _ = genai_bundles
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    (old / "onnx" / "genai_config.json").unlink()
    raw = json.loads((old / MANIFEST_FILE).read_text())
    del raw["formats"]["onnx"]["files"]["onnx/genai_config.json"]
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(RankdownError, match=r"onnxruntime-genai needs onnx/genai_config.json") as e:
        validate(old, ValidateConfig(runtimes="onnxruntime-genai", latency=None), progress=quiet)
    assert "\n" not in str(e.value)


GGUF_DECODER = {"type": "Sequence", "decoders": [  # what transformers' GGUF conversion writes for SmolLM2
    {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}


def test_a_gguf_converted_byte_level_tokenizer_is_made_readable_for_genai(genai_bundles, tmp_path):
    """With a SentencePiece-style decoder onnxruntime-extensions encodes a byte-level BPE to -1s;
    the copy in onnx/ keeps only the ByteLevel decoder, and then encodes and decodes as the original."""
    _, bundle, _ = genai_bundles
    folder = tmp_path / "onnx"
    shutil.copytree(bundle / "onnx", folder)
    spec = json.loads((bundle / "tokenizer.json").read_text())
    spec["decoder"], spec["model"]["byte_fallback"] = GGUF_DECODER, True
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = check_texts()
    want = [original.encode(t, add_special_tokens=False).ids for t in texts]
    assert -1 in genai_encodings(folder, texts)[1]  # the library's failure this works around
    fixed, changes = genai_readable(spec)
    assert fixed["decoder"] == GGUF_DECODER["decoders"][-1] and changes == ["decoder: ByteFallback, Fuse, Replace dropped before ByteLevel"]
    (folder / "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False))
    assert genai_encodings(folder, texts) == want
    copy = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert all(copy.decode(ids) == original.decode(ids) for ids in want)
    assert genai_readable(json.loads((bundle / "tokenizer.json").read_text()))[1] == []  # a plain ByteLevel decoder stays
