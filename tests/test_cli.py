"""The console script as a user runs it: one-line errors, non-zero exits, no tracebacks."""

import json
import subprocess
import sys

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
