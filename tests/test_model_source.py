"""MODEL as a hub id: resolved from a Hugging Face cache laid out as huggingface_hub lays it out
(models--org--name/blobs, snapshots/REV/ links into blobs, refs/main), offline, never downloading."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rankdown.cli import main
from rankdown.errors import RankdownError
from rankdown.model_source import resolve_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(hub: os.PathLike, repo_id: str, model_dir) -> None:
    """``model_dir``'s files as huggingface_hub stores a downloaded snapshot."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    def no_network(*_args, **_kwargs):
        pytest.fail("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("RANKDOWN_CACHE", str(tmp_path / "rankdown-cache"))
    return tmp_path / "hf" / "hub"


def test_a_cached_hub_id_runs_as_a_plain_folder(hub, tiny_model_dir, capsys):
    fake_hub_cache(hub, "org/tiny", tiny_model_dir)
    assert main(["info", "org/tiny"]) == 0
    captured = capsys.readouterr()
    assert "decoder linear params" in captured.out
    assert f"cached snapshot {REVISION[:12]}" in captured.err
    folder = resolve_model("org/tiny", say=lambda _m: None)
    assert not any(p.is_symlink() for p in folder.iterdir())
    assert (folder / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_an_uncached_hub_id_says_how_to_fetch_it(hub, capsys):
    assert main(["info", "org/absent"]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "huggingface-cli download org/absent" in err
    assert err.count("\n") == 1


def test_a_snapshot_link_out_of_the_blobs_is_refused(hub, tiny_model_dir, tmp_path):
    fake_hub_cache(hub, "org/tiny", tiny_model_dir)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    link = hub / "models--org--tiny" / "snapshots" / REVISION / "config.json"
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(RankdownError, match="links outside the cache's blobs"):
        resolve_model("org/tiny", say=lambda _m: None)


def test_a_ref_that_escapes_the_snapshots_is_refused(hub, tiny_model_dir):
    fake_hub_cache(hub, "org/tiny", tiny_model_dir)
    (hub / "models--org--tiny" / "refs" / "main").write_text("../../..")
    with pytest.raises(RankdownError, match="names a snapshot outside"):
        resolve_model("org/tiny", say=lambda _m: None)


def test_an_existing_path_wins_over_a_hub_id(hub, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(tiny_model_dir)
    assert resolve_model("org/tiny", say=lambda _m: pytest.fail("looked in the hub cache")) == Path("org/tiny")


def test_a_cached_gguf_repository_is_imported_once(hub, tiny_model_dir, tmp_path, capsys):
    from gguf_files import write_gguf

    gguf_only = tmp_path / "gguf-repo"
    gguf_only.mkdir()
    write_gguf(tiny_model_dir, gguf_only / "tiny-Q8_0.gguf")
    fake_hub_cache(hub, "org/tiny-GGUF", gguf_only)
    assert main(["info", "org/tiny-GGUF"]) == 0
    assert "importing once into" in capsys.readouterr().err
    (gguf_only / "tiny-F32.gguf").write_bytes((gguf_only / "tiny-Q8_0.gguf").read_bytes())
    fake_hub_cache(hub, "org/two-GGUF", gguf_only)
    assert main(["info", "org/two-GGUF"]) == 2
    assert "holds 2 GGUF files; give one as MODEL" in capsys.readouterr().err


def test_a_bad_option_is_refused_before_the_libraries_load(tiny_model_dir, tmp_path):
    """Each command checks its own options before its pipeline loads transformers and the runtimes:
    such a mistake took 1.5 s here, and 5.3-6.3 s while the imports came first."""
    model, out = str(tiny_model_dir), str(tmp_path / "out")
    commands = {"export": (["export", model, "-o", out, "--format", "tflite"], "unknown --format 'tflite'"),
                "validate": (["validate", model, "--runtime", "tflite"], "unknown --runtime 'tflite'"),
                "compress": (["compress", model, "-o", out, "--ratio", "1.2"], "--ratio must be a number strictly"),
                "eval": (["eval", model, "--task", "math", "--threads", "0"], "--threads must be at least 1"),
                "fit": (["fit", model, "--device", "local-cpu", "-o", out, "--ratios", "1.5"], "--ratios must be numbers")}
    for name, (argv, said) in commands.items():
        script = f"import sys; from rankdown.cli import main; rc = main({argv!r}); print(rc, 'transformers' in sys.modules)"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["2", "False"], (name, done.stderr)
        assert done.stderr.strip().splitlines()[-1].startswith(f"rankdown {name}: error: {said}"), done.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_model_path_is_refused_before_the_model_libraries_load(tmp_path):
    """A typo in MODEL fails in the time it takes to start, not after importing transformers."""
    script = ("import sys; from rankdown.cli import main; "
              f"rc = main(['compress', {str(tmp_path / 'typo')!r}, '-o', {str(tmp_path / 'out')!r}, '--ratio', '0.3']); "
              "print(rc, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"rankdown compress: error: {tmp_path / 'typo'}: no such folder"
