"""runtime_tests/: validate bundles in onnxruntime and ExecuTorch; catch bad ones loudly."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import onnx
import pytest
from helpers import cli_in_process, quiet
from onnx import numpy_helper

from rankdown.errors import RankdownError
from rankdown.export.manifest import MANIFEST_FILE, Manifest, sha256_file
from rankdown.validate.config import LatencyPlan, ValidateConfig
from rankdown.validate.harness import validate

FAST = dict(max_examples=20, max_tokens=512, latency=LatencyPlan(prompt_lengths=(8, 32), decode_tokens=8, repeats=2))


@pytest.fixture(scope="module")
def good_report(joint_bundle, tmp_path_factory):
    _, bundle, _ = joint_bundle
    report_dir = tmp_path_factory.mktemp("report")
    return validate(bundle, ValidateConfig(report_dir=report_dir, **FAST), progress=quiet), report_dir


def test_a_good_bundle_passes_in_both_runtimes(good_report):
    report, _ = good_report
    assert report.passed and report.failures == [] and set(report.runtimes) == {"onnxruntime", "executorch"}
    for r in report.runtimes.values():
        assert r.passed and r.parity.greedy_match and r.parity.greedy_tokens == 64
        assert r.parity.max_abs_logit_diff <= 1e-3 * r.parity.logit_scale and r.parity.top1_agreement == 1.0
        # the runtime's own task quality equals PyTorch's on the same data
        assert r.quality.examples == 20 and r.quality.exact_match == r.quality.reference_exact_match
        assert r.quality.perplexity == pytest.approx(r.quality.reference_perplexity, rel=1e-4)
        assert r.quality.quantized_reference_exact_match is None  # fp32: no quantized reference


def test_report_schema_and_latency_shape(good_report):
    report, folder = good_report
    raw = json.loads((folder / "report.json").read_text())
    assert raw["schema_version"] == 11 and raw["passed"] is True and raw["comparisons"] == {}
    env = raw["environment"]
    assert env["device"] == {"name": "local", "transport": "local", "machine": platform.machine(),
                             "system": platform.system(), "cores": os.cpu_count(), "emulated": False}
    assert {"machine", "system", "cores", "versions"} == set(env["host"]) and "onnxruntime" in env["host"]["versions"]
    for name in ("onnxruntime", "executorch"):
        r = raw["runtimes"][name]
        assert {"greedy_match", "max_abs_logit_diff", "top1_agreement"} <= set(r["parity"])
        assert r["parity"]["float_prompt_tasks"] == []  # fp32: no float floor beside a lowering check
        assert {"exact_match", "perplexity"} <= set(r["quality"])
        assert r["quality"]["task"] == "math" and r["quality"]["gptq_tasks"] == []  # fp32: no codes chosen
        lat = r["latency"]
        assert {"ttft_ms", "decode_tokens_per_s", "peak_rss_mb", "load_s"} <= set(lat)
        assert set(lat["ttft_ms"]) == {"8", "32"}
        for spread in [*lat["ttft_ms"].values(), lat["decode_tokens_per_s"]]:
            assert spread["runs"] == 2 and 0 < spread["min"] <= spread["median"] <= spread["max"]
        assert 0 < lat["peak_rss_mb"] < 4096 and lat["size_bytes"] > 0 and lat["load_s"] >= 0
    assert "| onnxruntime |" in (folder / "report.md").read_text()
    assert (folder / "latency.png").read_bytes()[:4] == b"\x89PNG"


def _corrupt_onnx_weights(bundle, out):
    """A copy whose ONNX weights are wrong but whose manifest matches the files: the kind of
    bundle a broken export would produce. Only parity can tell."""
    shutil.copytree(bundle, out)
    path = out / "onnx" / "model.onnx"
    data = path.with_name("model.onnx.data")  # the fused graph's weights; kept external, so sizes compare
    model = onnx.load(str(path))
    target = next(t for t in model.graph.initializer if len(t.dims) == 2 and 0 < t.dims[1] < 128)
    flipped = -numpy_helper.to_array(target)
    target.CopyFrom(numpy_helper.from_array(flipped, target.name))
    external = data.is_file()
    if external:
        data.unlink()  # onnx appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name,
              size_threshold=0)
    raw = json.loads((out / MANIFEST_FILE).read_text())
    for file in [path] + ([data] if external else []):
        raw["formats"]["onnx"]["files"][f"onnx/{file.name}"] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    (out / MANIFEST_FILE).write_text(json.dumps(raw))
    Manifest.read(out)


def test_flipped_weights_fail_parity(joint_bundle, tmp_path):
    _, bundle, _ = joint_bundle
    _corrupt_onnx_weights(bundle, tmp_path / "bad")
    report = validate(tmp_path / "bad", ValidateConfig(runtimes="onnxruntime", latency=None, max_examples=20,
                                                       max_tokens=512), progress=quiet)
    assert not report.passed
    assert "onnxruntime.parity.greedy_match" in report.failures
    assert "onnxruntime.parity.max_abs_logit_diff" in report.failures


def test_wrong_reference_fails_executorch_parity(joint_bundle, compressed_tiny):
    """The .pte is judged against another checkpoint: its logits do not match, and it fails."""
    _, bundle, _ = joint_bundle
    other, _ = compressed_tiny["svd"]
    report = validate(bundle, ValidateConfig(runtimes="executorch", reference=other, latency=None, max_examples=5,
                                             max_tokens=256), progress=quiet)
    assert not report.passed and "executorch.parity.max_abs_logit_diff" in report.failures


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rankdown.cli", "validate", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_cli_exit_status_gates_ci(joint_bundle, tmp_path):
    _, bundle, _ = joint_bundle
    ok = _cli(bundle, "--runtime", "onnxruntime", "--no-latency", "--max-examples", "5")
    assert ok.returncode == 0, ok.stderr
    assert "passed" in ok.stdout
    _corrupt_onnx_weights(bundle, tmp_path / "bad")
    bad = _cli(tmp_path / "bad", "--runtime", "onnxruntime", "--no-latency", "--max-examples", "5",
               "--report", tmp_path / "report")
    assert bad.returncode == 1
    assert "rankdown validate: FAILED: onnxruntime.parity.greedy_match" in bad.stderr
    assert json.loads((tmp_path / "report" / "report.json").read_text())["passed"] is False


def test_tampered_files_are_refused_before_running(joint_bundle, tmp_path, capsys):
    _, bundle, _ = joint_bundle
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "executorch" / "model.pte", "r+b") as f:
        f.seek(64)
        f.write(b"\x00" * 16)
    status, stderr = cli_in_process(capsys, "validate", copy, "--no-latency")
    assert status == 2
    assert "executorch/model.pte does not match the manifest" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("case,pattern", [
    ("no-manifest", "not a rankdown bundle (no manifest.json)"),
    ("missing-artifact", "holds no executorch artifact for executorch (it has onnx)"),
    ("unknown-runtime", "unknown --runtime 'tflite': choose one of onnxruntime, executorch, onnxruntime-genai"),
    ("source-gone", "pass --reference MODEL"),
])
def test_cli_bad_input_is_one_clear_line(joint_bundle, tmp_path, capsys, case, pattern):
    _, bundle, _ = joint_bundle
    target = tmp_path / "b"
    shutil.copytree(bundle, target)
    args = [target, "--no-latency"]
    raw = json.loads((target / MANIFEST_FILE).read_text())
    if case == "no-manifest":
        (target / MANIFEST_FILE).unlink()
    elif case == "missing-artifact":
        del raw["formats"]["executorch"]
        (target / MANIFEST_FILE).write_text(json.dumps(raw))
        args += ["--runtime", "executorch"]
    elif case == "unknown-runtime":
        args += ["--runtime", "onnxruntime,tflite"]
    else:
        raw["source"]["path"] = str(tmp_path / "deleted")
        (target / MANIFEST_FILE).write_text(json.dumps(raw))
    status, stderr = cli_in_process(capsys, "validate", *args)
    assert status == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("rankdown validate: error:")]
    assert len(errors) == 1 and pattern in errors[0], stderr


def test_a_runtime_missing_here_is_a_clear_error(joint_bundle, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    _, bundle, _ = joint_bundle
    with pytest.raises(RankdownError, match="runtime onnxruntime is not installed here"):
        validate(bundle, ValidateConfig(latency=None), progress=quiet)


def test_runtime_crash_is_reported_with_the_artifact(joint_bundle, tmp_path):
    """A runtime that dies on its artifact (here: a .pte whose program is zeroed behind an intact
    header, so the host's header check passes, with a matching manifest) is reported as a
    one-line error naming the file, not a hang or a traceback."""
    _, bundle, _ = joint_bundle
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    pte = bad / "executorch" / "model.pte"
    data = bytearray(pte.read_bytes())
    data[64:4096] = bytes(4096 - 64)
    pte.write_bytes(bytes(data))
    raw = json.loads((bad / MANIFEST_FILE).read_text())
    raw["formats"]["executorch"]["files"]["executorch/model.pte"] = {"bytes": len(data), "sha256": sha256_file(pte)}
    (bad / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(RankdownError, match=r"executorch/model.pte: executorch failed \(exit status 1\)"):
        validate(bad, ValidateConfig(runtimes="executorch", latency=None, max_examples=2, max_tokens=128),
                 progress=quiet)


@pytest.mark.slow
def test_shipped_bundle_validates_with_task_quality(shipped_math_bundle, tmp_path):
    """End to end on the shipped model: the runtimes' own exact match equals PyTorch's."""
    _, bundle = shipped_math_bundle
    report = validate(bundle, ValidateConfig(max_examples=100, latency=LatencyPlan(repeats=2)), progress=quiet)
    assert report.passed, report.failures
    for r in report.runtimes.values():
        assert r.quality.exact_match >= 0.9 and r.quality.exact_match == r.quality.reference_exact_match
        assert r.latency.decode_tokens_per_s.median > 0


class _RecordingRunner:
    """The local runner, noting which bundle each timed job ran on."""

    name, emulated = "local", False

    def __init__(self):
        from rankdown.validate.local_runner import LocalRunner

        self.inner, self.timed = LocalRunner(), []

    def run(self, job, bundle):
        if "latency" in job:
            self.timed.append(bundle.name)
        return self.inner.run(job, bundle)


def test_compare_times_both_bundles_interleaved_and_reports_ratios_and_quality(joint_bundle, tmp_path):
    _, bundle, _ = joint_bundle
    other = tmp_path / "other"
    _corrupt_onnx_weights(bundle, other)
    runner = _RecordingRunner()
    cfg = ValidateConfig(runtimes="onnxruntime", report_dir=tmp_path / "report", compare=other, **FAST)
    report = validate(bundle, cfg, progress=quiet, runner=runner)
    assert runner.timed == [bundle.name, "other"] * 2  # one timed repeat per run, alternating
    c = report.comparisons["onnxruntime"]
    mine = report.runtimes["onnxruntime"].latency
    assert mine is not None and mine.decode_tokens_per_s.runs == 2 and c.latency.decode_tokens_per_s.runs == 2
    assert set(c.ratios) == {"decode_tokens_per_s", "ttft_ms_8", "ttft_ms_32", "size_bytes", "peak_rss_mb"}
    assert c.ratios["decode_tokens_per_s"] == pytest.approx(
        mine.decode_tokens_per_s.median / c.latency.decode_tokens_per_s.median)
    assert c.ratios["size_bytes"] == pytest.approx(1.0, rel=0.01)
    # The other bundle's flipped weights score differently in the same runtime on the same data.
    assert c.perplexity is not None and c.perplexity_ratio == pytest.approx(
        report.runtimes["onnxruntime"].quality.perplexity / c.perplexity) and abs(c.perplexity_ratio - 1) > 1e-4
    raw = json.loads((tmp_path / "report" / "report.json").read_text())
    assert raw["comparisons"]["onnxruntime"]["other"] == str(other)
    assert "Compared with" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_itself_and_no_latency(joint_bundle):
    _, bundle, _ = joint_bundle
    with pytest.raises(RankdownError, match="--compare needs another bundle"):
        validate(bundle, ValidateConfig(runtimes="onnxruntime", compare=bundle, **FAST), progress=quiet)
    with pytest.raises(RankdownError, match="leave out --no-latency"):
        validate(bundle, ValidateConfig(runtimes="onnxruntime", compare=bundle, **(FAST | {"latency": None})),
                 progress=quiet)


def test_sweep_threads_times_the_bundle_at_each_count_interleaved_and_names_the_fastest(joint_bundle, tmp_path):
    """validate --sweep-threads 1,2: the latency job again at each count, one timed repeat per process,
    the counts alternating; the report keeps each count's latency and report.md names the fastest."""
    _, bundle, _ = joint_bundle
    counts: list = []

    class Recorder(_RecordingRunner):
        def run(self, job, folder):
            if "latency" in job and "parity" not in job:
                counts.append(job["threads"])
            return self.inner.run(job, folder)

    cfg = ValidateConfig(runtimes="onnxruntime", report_dir=tmp_path / "report", sweep_threads=(1, 2), **FAST)
    report = validate(bundle, cfg, progress=quiet, runner=Recorder())
    assert counts == [1, 2, 1, 2]
    sweep = report.runtimes["onnxruntime"].thread_sweep
    assert [lat.threads for lat in sweep] == [1, 2] and all(lat.decode_tokens_per_s.runs == 2 for lat in sweep)
    assert all(lat.decode_tokens_per_s.median > 0 for lat in sweep)
    fastest = max(sweep, key=lambda lat: lat.decode_tokens_per_s.median).threads
    raw = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [s["threads"] for s in raw["runtimes"]["onnxruntime"]["thread_sweep"]] == [1, 2]
    table = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
             if line.startswith("| onnxruntime | ") and "fastest decode" in line]
    assert len(table) == 1 and table[0].startswith(f"| onnxruntime | {fastest} | ")


@pytest.mark.parametrize("extra,pattern", [
    ({"sweep_threads": (2,)}, "two or more distinct counts"),
    ({"sweep_threads": (1, 1)}, "two or more distinct counts"),
    ({"sweep_threads": (0, 2)}, "two or more distinct counts"),
    ({"sweep_threads": (1, 2), "latency": None}, "leave out --no-latency"),
    ({"sweep_threads": (1, 2), "compare": "other"}, "not both"),
])
def test_sweep_threads_refuses_what_it_cannot_time(extra, pattern):
    with pytest.raises(RankdownError, match=pattern):
        ValidateConfig(**(FAST | extra))


def test_cli_sweep_threads_that_are_not_numbers_is_one_clear_line(joint_bundle, capsys):
    _, bundle, _ = joint_bundle
    status, stderr = cli_in_process(capsys, "validate", bundle, "--sweep-threads", "1,two")
    assert status == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("rankdown validate: error:")]
    assert len(errors) == 1 and "--sweep-threads must be comma-separated thread counts" in errors[0], stderr


def test_a_model_calibrated_on_a_file_needs_a_task_or_eval_file(joint_bundle, tmp_path):
    """Its compression.json names the calibration file, which is not a task: `validate` says what to
    give instead of failing on an unknown task or judging it on math."""
    _, bundle, _ = joint_bundle
    moved = tmp_path / "bundle"
    shutil.copytree(bundle, moved)
    raw = json.loads((moved / MANIFEST_FILE).read_text())
    raw["source"]["compression"]["task"] = "/data/calib"
    (moved / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(RankdownError, match=r"compressed for /data/calib, not a built-in task \(a calibration file, or "
                                            r"a task this version does not know\): give --task or --eval"):
        validate(moved, ValidateConfig(runtimes="onnxruntime", latency=None, max_examples=2), progress=quiet)
    report = validate(moved, ValidateConfig(runtimes="onnxruntime", latency=None, max_examples=2, task="math"),
                      progress=quiet)
    assert report.runtimes["onnxruntime"].quality is not None


def test_a_pytorch_model_answers_through_the_runtimes_loop_as_generate_does(shipped_math_checkpoint):
    """validate scores a quantized reference (a module without ``generate``) through the loop the
    runtimes answer with (budgets, stop tokens), as a decoder; on the float model that gives
    transformers' batched generate's answers, problem for problem."""
    from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
    from rankdown.evaluate import greedy_answers
    from rankdown.export.parity import TorchDecoder
    from rankdown.tasks import Split, load_task
    from rankdown.validate.harness import _exact_match, _stop_ids
    from rankdown.validate.on_device import task_answers

    model = load_model(open_checkpoint(shipped_math_checkpoint)).eval()
    tokenizer = load_tokenizer(shipped_math_checkpoint)
    qa = load_task("math", Split.EVALUATION).qa[:30]
    expected = greedy_answers(model, tokenizer, qa, batch_size=64)
    assert sum(a == ex.answer for a, ex in zip(expected, qa)) / len(qa) > 0.5  # a wrong cut would show
    got = task_answers(TorchDecoder(model), [tokenizer(ex.prompt)["input_ids"] for ex in qa],
                       [len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + 2 for ex in qa],
                       set(_stop_ids(tokenizer)))
    for ex, want, tokens in zip(qa, expected, got):
        assert _exact_match(tokenizer, [tokens], (ex,)) == float(want == ex.answer), ex.prompt
