"""The console script as a user runs it: one-line errors, non-zero exits, no tracebacks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

RANKDOWN = [sys.executable, "-m", "rankdown.cli"]


def run(*args):
    return subprocess.run([*RANKDOWN, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_info_reports_parameters_as_json(tiny_model_dir):
    result = run("info", tiny_model_dir, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["decoder_linear_params"] == info["dense_decoder_linear_params"] == 2 * (3 * 64 * 128 + 2 * 64 * 64 + 2 * 32 * 64)
    assert info["compression_ratio"] == 0.0


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: p, "no config.json"),
        (lambda p: (p / "junk.safetensors").write_bytes(b"\x00" * 3) and p, "no config.json"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, make, expected):
    result = run("info", make(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr


def test_truncated_weights_are_one_line_errors(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run("eval", folder, "--task", "math")
    assert result.returncode == 2 and "model.safetensors: not a valid safetensors file" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_writes_json_for_user_data(tiny_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"text": "some words here"}\n')
    out = tmp_path / "result.json"
    result = run("eval", tiny_model_dir, "--eval", data, "--json", out)
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    assert payload["exact_match"] == 0.0 and payload["examples"] == 1 and payload["perplexity"] > 1


def test_eval_refuses_empty_data_file(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run("eval", tiny_model_dir, "--eval", empty)
    assert result.returncode == 2 and "empty.jsonl: no data" in result.stderr


def test_compress_writes_a_checkpoint_and_refuses_bad_ratio(tiny_model_dir, tmp_path):
    out = tmp_path / "c"
    result = run("compress", tiny_model_dir, "--method", "joint", "--ratio", "0.3", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "layer 2/2 compressed" in result.stderr and (out / "factorization.json").is_file()
    report = json.loads((out / "compression.json").read_text())
    assert report["method"] == "joint" and abs(report["achieved_ratio"] - 0.3) < 0.003
    assert report["healing"]["steps"] == 256 and "healed 256 steps" in result.stdout  # the default heals
    bad = run("compress", tiny_model_dir, "--ratio", "1.2", "-o", tmp_path / "d")
    assert bad.returncode == 2 and "strictly between 0 and 1" in bad.stderr and not (tmp_path / "d").exists()
    unknown = run("compress", tiny_model_dir, "--ratio", "0.3", "--method", "magic", "-o", tmp_path / "e")
    assert unknown.returncode == 2 and "--method: invalid choice: 'magic'" in unknown.stderr


@pytest.mark.parametrize("args,expected", [
    (["eval", "{model}", "--task", "math", "--threads", "-1"], "--threads must be at least 1, got -1"),
    (["eval", "{model}", "--task", "math", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["eval", "{model}", "--task", "math", "--threads", "100000"], "--threads 100000: this process may run on"),
    (["eval", "{model}", "--task", "math", "--max-examples", "-3"], "--max-examples must be at least 1, got -3"),
    (["eval", "{model}", "--task", "math", "--json", "{tmp}"], "is a folder; give a file name"),
    (["eval", "{model}", "--task", "math", "--json", "{tmp}/missing/e.json"], "parent folder"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--trials", "5"],
     "--trials applies to --allocate bayes only (these ranks are error)"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--tune-steps", "20"], "--tune-steps applies to"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--heal-group-size", "64"],
     "--heal-group-size applies to healing through 4-bit weights, given by --heal-quantize int4 or 8da4w"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--weights", "int4", "--heal-quantize", "none",
      "--heal-group-size", "64"], "--heal-group-size applies to healing through 4-bit weights, which --heal-quantize none"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--heal-steps", "0", "--heal-lr", "2e-4"],
     "--heal-lr applies to healing, which --heal-steps 0 turns off"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--heal-steps", "0", "--heal-quantize", "int4"],
     "--heal-quantize applies to healing, which --heal-steps 0 turns off"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--calib-tokens", "10"],
     "--calib-tokens must be at least one window of 128 tokens, got 10"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--method", "basis", "--basis-mode", "tuned",
      "--tune-steps", "-1"], "--tune-steps must be at least 1, got -1"),
    (["compress", "{model}", "-o", "{out}", "--ratio", "0.4", "--heal-lr", "-1"], "--heal-lr must be positive, got -1.0"),
    (["export", "{model}", "-o", "{out}", "--format", "onnx", "--max-seq-len", "64"],
     "--max-seq-len applies to the executorch format, which --format onnx leaves out"),
    (["export", "{model}", "-o", "{out}", "--format", "onnx", "--backend", "xnnpack"], "--backend applies to the executorch"),
    (["export", "{model}", "-o", "{out}", "--format", "executorch", "--onnx-graph", "optimum"],
     "--onnx-graph applies to the onnx format"),
    (["export", "{model}", "-o", "{out}", "--quantize", "int4", "--task", "maths"], "unknown task 'maths'"),
    (["export", "{model}", "-o", "{out}", "--quantize", "int8", "--task", "math"], "--task applies to --quantize int4"),
    (["export", "{model}", "-o", "{out}", "--task", "math"], "--task applies to --quantize int4 only"),
    (["export", "{model}", "-o", "{out}", "--quantize", "int8", "--int4-rounding", "gptq"],
     "--int4-rounding applies to --quantize int4"),
    (["validate", "{out}", "--greedy-tokens", "0"], "--greedy-tokens must be at least 1, got 0"),
    (["validate", "{out}", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["validate", "{out}", "--min-top1", "2"], "--min-top1 must be from 0 to 1, got 2.0"),
    (["validate", "{out}", "--max-em-drop", "1.5"], "--max-em-drop must be from -1 to 1, got 1.5"),
    (["validate", "{out}", "--max-ppl-increase", "-1"], "--max-ppl-increase must be above -1, got -1.0"),
    (["validate", "{out}", "--max-rel-logit-diff=-1e-3"], "--max-rel-logit-diff must be at least 0, got -0.001"),
    (["validate", "{out}"], "out: no such folder"),
])
def test_options_that_could_not_work_or_would_be_ignored_are_refused_before_any_work(
        tiny_model_dir, tmp_path, capsys, args, expected):
    """Each was accepted before: some failed with a traceback after the work (eval --json into a
    folder, --greedy-tokens 0), some were used as nonsense (--max-examples -3 as a slice) or
    silently ignored (--trials under error ranks, --max-seq-len without a .pte)."""
    from rankdown.cli import main

    out = tmp_path / "out"
    status = main([a.format(model=tiny_model_dir, tmp=tmp_path, out=out) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists() and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("args,expected", [
    (["--allocate", "bayes", "--trials", "3"], {"trials": 3, "tune_steps": 60, "heal_lr": 1e-4}),
    (["--method", "basis", "--basis-mode", "tuned", "--tune-steps", "20"], {"trials": 30, "tune_steps": 20}),
    (["--heal-quantize", "int4", "--heal-group-size", "64", "--heal-lr", "2e-4"],
     {"group_size": 64, "quantize": "int4", "heal_lr": 2e-4}),
    (["--heal-steps", "0", "--heal-quantize", "none"], {"steps": 0, "quantize": "none"}),
    ([], {"trials": 30, "tune_steps": 60, "heal_lr": 1e-4, "precision": "auto", "steps": 256}),
])
def test_options_reach_the_config_where_they_apply(tiny_model_dir, tmp_path, monkeypatch, args, expected):
    """The refusals above leave each option working where it applies, and its default where not given."""
    import rankdown.compress.pipeline as pipeline
    from rankdown.cli import main

    seen = []

    def stop(model, out, cfg):  # right after the config is built: as Ctrl-C would
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compress", stop)
    assert main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--ratio", "0.4", *args]) == 130
    cfg = seen[0]
    got = {"trials": cfg.trials, "tune_steps": cfg.tuning.steps, "heal_lr": cfg.healing.lr, "steps": cfg.healing.steps,
           "group_size": cfg.healing.group_size, "quantize": cfg.healing.quantize.value,
           "precision": cfg.healing.precision.value}
    assert {k: got[k] for k in expected} == expected


def test_a_report_folder_is_checked_before_the_bundle_runs(joint_bundle, tmp_path, capsys):
    from rankdown.atomic import check_report_folder
    from rankdown.cli import main

    (tmp_path / "afile").write_text("x")
    status = main(["validate", str(joint_bundle[1]), "--report", str(tmp_path / "afile"), "--no-latency"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "afile: exists and is not a folder" in err[0]
    with pytest.raises(Exception, match="is not a folder"):
        check_report_folder(tmp_path / "afile" / "below")
    check_report_folder(tmp_path)  # a folder holding other files is fine: the report's own files are replaced
    check_report_folder(tmp_path / "new" / "deeper")  # created with its parents


def test_a_report_rewritten_without_latency_or_compare_drops_the_earlier_plots(joint_bundle, tmp_path):
    from rankdown.validate.config import ValidateConfig
    from rankdown.validate.harness import validate

    folder = tmp_path / "report"
    folder.mkdir()
    for name in ("latency.png", "comparison.png", "notes.txt"):
        (folder / name).write_text("an earlier run's")
    validate(joint_bundle[1], ValidateConfig(latency=None, max_examples=3, max_tokens=256, report_dir=folder),
             progress=lambda _m: None)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "report.json", "report.md"]


@pytest.mark.parametrize("args,expected", [(["--threads", "100000"], "--threads 100000: this process may run on"),
                                           (["--sweep-threads", "1,100000"], "--sweep-threads 100000: this process")])
def test_validate_refuses_more_threads_than_cpus_where_it_runs_them(joint_bundle, capsys, args, expected):
    from rankdown.cli import main

    status = main(["validate", str(joint_bundle[1]), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and expected in err[0], err


def test_a_bundle_given_where_a_model_is_taken_is_named_as_one(joint_bundle, tmp_path, capsys):
    from rankdown.cli import main

    status = main(["export", str(joint_bundle[1]), "-o", str(tmp_path / "again")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "a rankdown bundle (export's output), not a model folder" in err[0]


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_stop_that_a_library_turned_into_its_own_error_still_ends_as_a_stop(tiny_model_dir, tmp_path, monkeypatch,
                                                                             capsys, request, signum, status, word):
    """The signal can land inside an extension that converts the raised exception (safetensors'
    reader turned it into a ValueError in CI): the run still ends as the user asked, one line, no
    traceback; and an error raised with no signal is not mistaken for one."""
    import rankdown.compress.pipeline as pipeline
    from rankdown.cli import main

    def load_in_an_extension(model, out, cfg):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises during this sleep
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        raise AssertionError("the signal was not handled")

    monkeypatch.setattr(pipeline, "compress", load_in_an_extension)
    # as from a terminal: under nohup or in a background job SIGINT is ignored, and the CLI keeps it so
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    model = tiny_model_dir
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main(["compress", str(model), "-o", str(tmp_path / "o"), "--ratio", "0.4"]) == status
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"rankdown compress: {word}; nothing was written"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers

    def fails(model, out, cfg):
        raise ValueError("a real bug")

    monkeypatch.setattr(pipeline, "compress", fails)
    with pytest.raises(ValueError, match="a real bug"):
        main(["compress", str(model), "-o", str(tmp_path / "o"), "--ratio", "0.4"])
