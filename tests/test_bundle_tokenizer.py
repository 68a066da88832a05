"""export/bundle_tokenizer.py: the bundle's tokenizer.json loads in ExecuTorch's tokenizer library
and encodes like the model's, or the export fails."""

from __future__ import annotations

import json

import pytest

from rankdown.checkpoint import load_tokenizer
from rankdown.errors import RankdownError
from rankdown.export.bundle_tokenizer import check_texts, runtime_readable, write_bundle_tokenizer
from rankdown.export.config import ExportConfig
from rankdown.export.pipeline import export


def _with(folder, tmp_path, name, **changes):
    """A copy of ``folder``'s tokenizer files whose tokenizer.json has ``changes`` applied."""
    out = tmp_path / name
    out.mkdir()
    for file in folder.glob("*.json"):
        if "token" in file.name:
            (out / file.name).write_bytes(file.read_bytes())
    spec = json.loads((out / "tokenizer.json").read_text())
    (out / "tokenizer.json").write_text(json.dumps(spec | changes))
    return out


def test_empty_normalizer_sequence_is_removed_and_loads(tiny_model_dir, tmp_path):
    """What transformers' GGUF conversion writes (SmolLM2): pytorch_tokenizers refuses it as is."""
    source = _with(tiny_model_dir, tmp_path, "gguf-like", normalizer={"type": "Sequence", "normalizers": []})
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    changes = write_bundle_tokenizer(source, bundle, load_tokenizer(source), check_texts())
    assert changes == ["normalizer: empty Sequence removed (now null)"]
    assert json.loads((bundle / "tokenizer.json").read_text())["normalizer"] is None


def test_nested_empty_sequences_are_dropped_but_real_members_kept():
    spec = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Sequence", "pretokenizers": []}, {"type": "ByteLevel", "add_prefix_space": False}]}}
    fixed, changes = runtime_readable(spec)
    assert fixed["pre_tokenizer"]["pretokenizers"] == [{"type": "ByteLevel", "add_prefix_space": False}]
    assert changes == ["pre_tokenizer: empty Sequence removed"] and runtime_readable(fixed)[1] == []


def test_a_tokenizer_the_runtime_library_cannot_load_fails_the_export(tiny_model_dir, tmp_path):
    """pytorch_tokenizers has no Lowercase normalizer: no rewrite keeps the encoding, so refuse."""
    source = _with(tiny_model_dir, tmp_path, "lower", normalizer={"type": "Lowercase"})
    for weights in tiny_model_dir.glob("*"):
        if not (source / weights.name).exists():
            (source / weights.name).write_bytes(weights.read_bytes())
    with pytest.raises(RankdownError, match=r"pytorch_tokenizers\) cannot load it: .*Unsupported Normalizer type: Lowercase"):
        export(source, tmp_path / "b", ExportConfig(formats="onnx"), progress=lambda _m: None)
    assert not (tmp_path / "b").exists()


def test_a_tokenizer_that_encodes_differently_fails(tiny_model_dir, tmp_path):
    """NFC composes 'é' in the runtime library; a model tokenizer without it does not."""
    source = _with(tiny_model_dir, tmp_path, "nfc", normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}]})
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with pytest.raises(RankdownError, match="pytorch_tokenizers encodes .* differently from the model's tokenizer"):
        write_bundle_tokenizer(source, bundle, load_tokenizer(tiny_model_dir), ["cafe\u0301"])
