"""The validator itself: it fails closed on subtly wrong bundles, says where
the largest difference is, and checks real tokens through cached and uncached decoding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import quiet
from onnx import helper, numpy_helper

from rankdown.checkpoint import load_tokenizer
from rankdown.export.config import ExportConfig
from rankdown.export.manifest import MANIFEST_FILE, sha256_file
from rankdown.export.pipeline import export
from rankdown.tasks import Split, load_task
from rankdown.validate.config import ValidateConfig
from rankdown.validate.harness import validate
from rankdown.validate.local_runner import LocalRunner

CHEAP = dict(runtimes="onnxruntime", latency=None, max_examples=5, max_tokens=256)


@pytest.fixture(scope="module")
def feature_bundle(compressed_tiny, tmp_path_factory):
    """The feature checkpoint (factor pairs with an up bias) as an ONNX bundle."""
    folder, _ = compressed_tiny["feature"]
    bundle = tmp_path_factory.mktemp("validator") / "feature"
    export(folder, bundle, ExportConfig(formats="onnx"), progress=quiet)
    return bundle


def _resign(bundle, rel, section="onnx"):
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    path = bundle / rel
    entry = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if section == "tokenizer":
        raw["tokenizer_files"][rel] = entry
    else:
        raw["formats"][section]["files"][rel] = entry
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))


def _edited(bundle, tmp_path, edit):
    """A copy whose ONNX graph ``edit`` changed, re-signed: only the validator's checks can tell."""
    copy = shutil.copytree(bundle, tmp_path / "edited")
    path = copy / "onnx" / "model.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))
    _resign(copy, "onnx/model.onnx")
    return copy


def _initializer(model, node_name: str, index: int = 1):
    node = next(n for n in model.graph.node if n.name == node_name)
    name = node.input[index]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return tensor, numpy_helper.to_array(tensor).copy()


def _replace(tensor, array):
    tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))


def _scale_one_factor(model):
    tensor, array = _initializer(model, "/model.layers.1.mlp.down_proj/up/MatMul")
    _replace(tensor, array * 1.01)


def _swap_two_heads(model):
    """Query heads 0 and 1 (head_dim 16, both read KV head 0) trade places in q_proj's up factor."""
    tensor, array = _initializer(model, "/model.layers.0.self_attn.q_proj/up/MatMul")  # [rank, out]
    array[:, 0:16], array[:, 16:32] = array[:, 16:32].copy(), array[:, 0:16].copy()
    _replace(tensor, array)
    add = next(n for n in model.graph.node if n.name == "/model/layers.0/attn/q_proj/Add")
    bias_name = next(i for i in add.input if i in {t.name for t in model.graph.initializer})
    bias = next(t for t in model.graph.initializer if t.name == bias_name)
    values = numpy_helper.to_array(bias).copy()
    values[0:16], values[16:32] = values[16:32].copy(), values[0:16].copy()
    _replace(bias, values)


def _drop_a_bias(model):
    """Layer 1's down_proj bias: in the fused graph, the bias input of the norm that adds it to the residual."""
    norm = next(n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"
                and len(n.input) == 4 and "layers.1.mlp.down_proj" in n.input[3])
    bias = next(t for t in model.graph.initializer if t.name == norm.input[3])
    _replace(bias, np.zeros_like(numpy_helper.to_array(bias)))


# fails closed --------------------------------------------------------------------------------

@pytest.mark.parametrize("edit", [_swap_two_heads, _drop_a_bias], ids=["swap heads", "drop bias"])
def test_subtly_wrong_bundles_fail_with_where_the_difference_is(feature_bundle, tmp_path, edit):
    bad = _edited(feature_bundle, tmp_path, edit)
    report = validate(bad, ValidateConfig(report_dir=tmp_path / "report", **CHEAP), progress=quiet)
    assert not report.passed and "onnxruntime.parity.max_abs_logit_diff" in report.failures
    parity = report.runtimes["onnxruntime"].parity
    assert parity.max_abs_logit_diff > 1e-3 * parity.logit_scale
    assert parity.max_diff_at.startswith("prompt ") and " position " in parity.max_diff_at
    assert json.loads((tmp_path / "report" / "report.json").read_text())["passed"] is False


def test_one_factor_scaled_by_1_01_fails_in_the_cli_with_where(feature_bundle, tmp_path):
    """Invisible at the prompt positions alone (under 1e-3 of the logit scale there); the
    continuation positions, run without the cache, expose it."""
    bad = _edited(feature_bundle, tmp_path, _scale_one_factor)
    result = subprocess.run([sys.executable, "-m", "rankdown.cli", "validate", str(bad), "--runtime", "onnxruntime",
                             "--no-latency", "--max-examples", "5", "--report", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    # the scaled factor also flips a near-tie greedy token on some CPUs (AVX2 without VNNI): more may fail
    failed = next(line for line in result.stderr.splitlines() if line.startswith("rankdown validate: FAILED: "))
    assert "onnxruntime.parity.max_abs_logit_diff" in failed.split(": ", 2)[2].split(", ")
    line = next(line for line in result.stdout.splitlines() if line.startswith("onnxruntime") and "greedy" in line)
    assert " at prompt " in line and " position " in line
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] is False and report["runtimes"]["onnxruntime"]["parity"]["max_diff_at"].startswith("prompt ")


# real tokens, cached and uncached ----------------------------------------------------------

class _Recording(LocalRunner):
    def __init__(self):
        super().__init__()
        self.jobs = []

    def run(self, job, bundle):
        self.jobs.append(job)
        return super().run(job, bundle)


def test_parity_runs_real_text_through_the_shipped_tokenizer(feature_bundle):
    """Also the control for every edited bundle here: unedited, the same bundle passes."""
    runner = _Recording()
    report = validate(feature_bundle, ValidateConfig(**CHEAP), progress=quiet, runner=runner)
    assert report.passed, report.failures
    parity = report.runtimes["onnxruntime"].parity
    assert parity.cache_consistent and parity.cache_max_abs_logit_diff <= 1e-3 * parity.logit_scale
    assert report.tokenizer_matches_reference is True
    (job,) = runner.jobs
    tokenizer = load_tokenizer(feature_bundle)
    prompts = job["parity"]["prompts"]
    cached, uncached = prompts[:3], prompts[3:]
    sources = [load_task("math", Split.EVALUATION).qa[0].prompt, load_task("code", Split.EVALUATION).texts[0],
               load_task("prose", Split.EVALUATION).texts[0]]
    for ids, source in zip(cached, sources):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert len(ids) > 3 and text.strip() and text.strip() in source
    for short, long in zip(cached, uncached):  # the same sequence again, continued, as one prompt
        assert long[: len(short)] == short and len(long) > len(short)


def _ignore_the_cache(model):
    """Multiply every past key/value by zero: the prompt (no past) is untouched, cached decode is broken."""
    zero = numpy_helper.from_array(np.zeros((), np.float32), "rankdown_test_zero")
    model.graph.initializer.append(zero)
    for graph_input in model.graph.input:
        if not graph_input.name.startswith("past_key_values."):
            continue
        cleared = graph_input.name + "_cleared"
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name == graph_input.name:
                    node.input[i] = cleared
        model.graph.node.insert(0, helper.make_node("Mul", [graph_input.name, zero.name], [cleared]))


def test_an_artifact_right_on_prompts_but_wrong_with_its_cache_fails(feature_bundle, tmp_path):
    bad = _edited(feature_bundle, tmp_path, _ignore_the_cache)
    report = validate(bad, ValidateConfig(**CHEAP), progress=quiet)
    parity = report.runtimes["onnxruntime"].parity
    assert parity.max_abs_logit_diff <= 1e-3 * parity.logit_scale, "prompt logits alone look perfect"
    assert not report.passed
    assert {"onnxruntime.parity.greedy_match", "onnxruntime.parity.cache_consistency"} <= set(report.failures)
    assert parity.cache_consistent is False


def test_a_bundle_shipping_another_tokenizer_fails(feature_bundle, tmp_path):
    """Swapping two token ids in the shipped tokenizer keeps runtime-vs-PyTorch parity perfect
    (both see the same ids); only comparing with the reference's tokenizer catches it."""
    copy = shutil.copytree(feature_bundle, tmp_path / "tok")
    raw = json.loads((copy / "tokenizer.json").read_text())
    vocab = raw["model"]["vocab"]
    vocab["+"], vocab["="] = vocab["="], vocab["+"]
    (copy / "tokenizer.json").write_text(json.dumps(raw))
    _resign(copy, "tokenizer.json", section="tokenizer")
    report = validate(copy, ValidateConfig(**CHEAP), progress=quiet)
    assert report.tokenizer_matches_reference is False
    assert "tokenizer.matches_reference" in report.failures and not report.passed
