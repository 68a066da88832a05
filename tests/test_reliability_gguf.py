"""Hostile or broken model input: GGUF files that are truncated, whose tensor offsets,
sizes or counts lie, whose tokenizer does not match the vocabulary, or that are no Llama; and
Hugging Face folders whose config.json disagrees with the weights or is absurd. Each is refused
in one line, in seconds, with bounded memory, before any real work, and nothing is written."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
import tracemalloc

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf_files import patch_tensor_info, write_gguf
from safetensors.numpy import load_file, save_file

from rankdown.cli import main
from rankdown.errors import RankdownError
from rankdown.gguf_check import check_gguf
from rankdown.gguf_import import import_gguf


@pytest.fixture(scope="module")
def good_gguf(tiny_model_dir, tmp_path_factory):
    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "good.gguf", GGMLQuantizationType.Q8_0)


def _first_tensor_offset(raw: bytes, tmp_dir) -> int:
    from rankdown.gguf_check import read_gguf_header

    path = tmp_dir / "probe.gguf"
    path.write_bytes(raw)
    return min(t.offset for t in read_gguf_header(path).tensors.values())


def _counts(raw: bytes, tensors: int | None = None, kv: int | None = None) -> bytes:
    out = bytearray(raw)
    if tensors is not None:
        struct.pack_into("<Q", out, 8, tensors)
    if kv is not None:
        struct.pack_into("<Q", out, 16, kv)
    return bytes(out)


def _nan_in_first_tensor(raw: bytes) -> bytes:
    import tempfile
    from pathlib import Path

    out = bytearray(raw)
    with tempfile.TemporaryDirectory() as d:
        start = _first_tensor_offset(raw, Path(d))
    struct.pack_into("<e", out, start, float("nan"))  # a Q8_0 block's scale
    return bytes(out)


BYTE_CASES = {
    "truncated in the metadata": (lambda raw: raw[:2000], "(runs past the end|more than the file can hold)"),
    "truncated in the weights": (lambda raw: raw[: len(raw) - 1000], "lies outside the file"),
    "a trillion tensors": (lambda raw: _counts(raw, tensors=10**12), "claims 1000000000000 tensors"),
    "a trillion metadata entries": (lambda raw: _counts(raw, kv=10**12), "claims 1000000000000 metadata entries"),
    "more tensors than the file holds": (lambda raw: _counts(raw, tensors=5000), "claims 5000 tensors .* more than its"),
    "offset beyond the end": (lambda raw: patch_tensor_info(raw, "blk.1.ffn_up.weight", offset=1 << 40),
                              "'blk.1.ffn_up.weight' lies outside the file"),
    "offset onto another tensor": (lambda raw: patch_tensor_info(raw, "blk.1.ffn_up.weight", offset=0),
                                   "overlaps another tensor"),
    "size that lies": (lambda raw: patch_tensor_info(raw, "blk.0.attn_q.weight", dim0=64 * 4096),
                       "'blk.0.attn_q.weight' (lies outside the file|overlaps)"),
    "unknown tensor type": (lambda raw: patch_tensor_info(raw, "blk.0.attn_v.weight", type_id=99),
                            "'blk.0.attn_v.weight': unknown tensor type 99"),
    "not GGUF at all": (lambda raw: b"GGUX" + raw[4:], "no GGUF magic"),
    "future version": (lambda raw: raw[:4] + struct.pack("<I", 99) + raw[8:], "version 99"),
    "weights that dequantize to NaN": (_nan_in_first_tensor, "dequantizes to NaN or Inf"),
}

WRITTEN_CASES = {
    "not a Llama": (dict(arch="qwen2"), "GGUF architecture 'qwen2' is not supported"),
    "tokenizer shorter than the vocabulary": (dict(tokens_cut=1), "the tokenizer has 399 tokens but the embedding has 400 rows"),
    "vocab_size that lies": (dict(metadata_overrides={"llama.vocab_size": 4000}), "llama.vocab_size 4000"),
    "layer count that lies": (dict(metadata_overrides={"llama.block_count": 1_000_000}), "block_count is 1000000 but the file holds 2"),
    "width that lies": (dict(metadata_overrides={"llama.embedding_length": 32}), "'token_embd.weight' is missing or not"),
    "heads that lie": (dict(metadata_overrides={"llama.attention.head_count_kv": 4}), "'blk.0.attn_k.weight' has shape"),
}


def _case_file(case, good_gguf, tiny_model_dir, tmp_path):
    path = tmp_path / "bad.gguf"
    if case in BYTE_CASES:
        path.write_bytes(BYTE_CASES[case][0](good_gguf.read_bytes()))
        return path, BYTE_CASES[case][1]
    kwargs, pattern = WRITTEN_CASES[case]
    return write_gguf(tiny_model_dir, path, GGMLQuantizationType.Q8_0, **kwargs), pattern


@pytest.mark.parametrize("case", sorted(BYTE_CASES) + sorted(WRITTEN_CASES))
def test_hostile_gguf_is_refused_in_one_line_with_bounded_memory(good_gguf, tiny_model_dir, tmp_path, case):
    path, pattern = _case_file(case, good_gguf, tiny_model_dir, tmp_path)
    out = tmp_path / "out"
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(RankdownError, match=pattern) as info:
            import_gguf(path, out, progress=lambda _m: None)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert time.perf_counter() - start < 10
    assert peak < 64 * 2**20, f"checking a {path.stat().st_size}-byte file allocated {peak / 2**20:.0f} MiB"
    assert not out.exists() and not list(tmp_path.glob(".out*")), "import left something behind"


@pytest.mark.parametrize("command", ["info", "eval", "compress", "export"])
def test_every_command_refuses_a_hostile_gguf_before_caching_it(good_gguf, tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("RANKDOWN_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_counts(good_gguf.read_bytes(), tensors=10**12))
    extra = {"eval": ["--task", "math"], "compress": ["--ratio", "0.3", "-o", str(tmp_path / "o")],
             "export": ["-o", str(tmp_path / "o")]}.get(command, [])
    assert main([command, str(bad), *extra]) == 2
    err = capsys.readouterr().err
    assert "claims 1000000000000 tensors" in err and err.count("\n") == 1
    assert not (tmp_path / "cache" / "imported").exists() or not any((tmp_path / "cache" / "imported").iterdir())
    assert not (tmp_path / "o").exists()


def test_the_good_file_passes_the_same_checks(good_gguf):
    header = check_gguf(good_gguf)
    assert header.tensors["token_embd.weight"].shape == (400, 64)


# Hugging Face folders whose config.json disagrees with the weights, or is absurd ---------------

CONFIG_LIES = {
    "a million layers": ({"num_hidden_layers": 1_000_000}, "num_hidden_layers 1000000 is absurd"),
    "a billion-wide hidden state": ({"hidden_size": 10**9}, "hidden_size 1000000000 is absurd"),
    "negative vocabulary": ({"vocab_size": -5}, "vocab_size must be a positive integer"),
    "layers as text": ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer"),
    "head size that lies": ({"head_dim": 8}, "q_proj.weight' has shape"),
    "kv heads that lie": ({"num_key_value_heads": 4}, "k_proj.weight' has shape"),
    "MLP width that lies": ({"intermediate_size": 96}, "gate_proj.weight' has shape"),
    "more layers than stored": ({"num_hidden_layers": 40}, "num_hidden_layers is 40 but the weights hold 2 layers"),
    "tie flag not a boolean": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_LIES))
@pytest.mark.parametrize("command", ["info", "compress"])
def test_a_config_that_lies_is_refused_in_seconds(tiny_model_dir, tmp_path, capsys, case, command):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(CONFIG_LIES[case][0])
    (folder / "config.json").write_text(json.dumps(config))
    extra = ["--ratio", "0.3", "-o", str(tmp_path / "o")] if command == "compress" else []
    start = time.perf_counter()
    assert main([command, str(folder), *extra]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 5
    assert err.count("\n") == 1
    assert re.search(CONFIG_LIES[case][1], err), err
    assert not (tmp_path / "o").exists()


def test_weights_with_an_extra_layer_are_named(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.7.input_layernorm.weight"] = np.ones(64, dtype=np.float32)
    save_file(tensors, folder / "model.safetensors")
    assert main(["info", str(folder)]) == 2
    assert "the weights hold 3 layers (model.layers.7.* is not in the model the config describes)" in capsys.readouterr().err
