"""GGUF input (issue 13, items 1 and 7): tiny Llamas written with the gguf package in F32, F16,
Q8_0 and Q4_1, tied and untied, imported and compared tensor by tensor with the folder they
came from; the CLI's MODEL takes the file directly and imports it once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_tiny_model
from gguf import GGMLQuantizationType
from gguf_files import gguf_name, round_trip, write_gguf
from helpers import quiet
from safetensors.numpy import load_file

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.cli import main
from rankdown.gguf_import import IMPORT_FILE, ImportRecord, import_gguf, sha256_of

QTYPES = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16,
          "Q8_0": GGMLQuantizationType.Q8_0, "Q4_1": GGMLQuantizationType.Q4_1}



@pytest.fixture(scope="module")
def tiny_pair(tiny_tokenizer, tmp_path_factory):
    """An untied and a tied tiny Llama folder (hidden 64: every row is whole quantization blocks)."""
    root = tmp_path_factory.mktemp("gguf-src")
    return {False: write_tiny_model(root / "untied", tiny_tokenizer, seed=1),
            True: write_tiny_model(root / "tied", tiny_tokenizer, seed=2, tie_word_embeddings=True)}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_imported_tensors_equal_the_source_as_stored(tiny_pair, tmp_path, qtype, tied):
    source = tiny_pair[tied]
    gguf_file = write_gguf(source, tmp_path / "m.gguf", QTYPES[qtype])
    out = tmp_path / "imported"
    record = import_gguf(gguf_file, out, progress=quiet)
    expected = load_file(source / "model.safetensors")
    got = load_file(out / "model.safetensors")
    if tied:
        expected.pop("lm_head.weight", None)
    assert sorted(got) == sorted(expected)
    for name, w in expected.items():
        want = w if qtype == "F32" else round_trip(w, QTYPES[qtype])
        # Exact: the importer must undo llama.cpp's query/key row permutation, not approximate it.
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want, err_msg=f"{name} ({gguf_name(name)})")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["architectures"] == ["LlamaForCausalLM"]
    assert record.sha256 == sha256_of(gguf_file)
    assert ImportRecord.read(out) == record
    assert record.tensor_types[qtype if qtype != "F32" else "F32"] >= 14
    assert not (out / "tokenizer.model").exists(), "a copy of the GGUF was kept as tokenizer.model"


def test_imported_model_computes_what_the_source_computes(tiny_pair, tiny_tokenizer, tmp_path):
    source = tiny_pair[False]
    out = tmp_path / "imported"
    import_gguf(write_gguf(source, tmp_path / "m.gguf"), out, progress=quiet)
    ids = torch.tensor([tiny_tokenizer("the cat sat on 12 mats")["input_ids"]])
    with torch.no_grad():
        want = load_model(open_checkpoint(source))(ids).logits
        got = load_model(open_checkpoint(out))(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_tokenizer_and_chat_template_come_from_the_file(tiny_pair, tiny_tokenizer, tmp_path):
    out = tmp_path / "imported"
    import_gguf(write_gguf(tiny_pair[False], tmp_path / "m.gguf"), out, progress=quiet)
    tokenizer = load_tokenizer(out)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    text = "the cat sat on the mat"  # no digits: the source splits digits, a GGUF byte-level BPE cannot say so
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == (tiny_tokenizer.bos_token, tiny_tokenizer.eos_token)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    assert json.loads((out / "tokenizer.json").read_text())["normalizer"] is None


def test_import_refuses_an_existing_output_and_writes_nothing_on_failure(tiny_pair, tmp_path):
    from rankdown.errors import RankdownError

    gguf_file = write_gguf(tiny_pair[False], tmp_path / "m.gguf")
    out = tmp_path / "imported"
    out.mkdir()
    with pytest.raises(RankdownError, match="already exists"):
        import_gguf(gguf_file, out, progress=quiet)
    assert list(out.iterdir()) == []


def test_cli_imports_a_gguf_once_and_reuses_it(tiny_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANKDOWN_CACHE", str(tmp_path / "cache"))
    gguf_file = write_gguf(tiny_pair[True], tmp_path / "m.gguf", GGMLQuantizationType.Q8_0)
    assert main(["info", str(gguf_file)]) == 0
    first = capsys.readouterr()
    folder = tmp_path / "cache" / "imported" / sha256_of(gguf_file)
    assert "importing once into" in first.err and (folder / IMPORT_FILE).is_file()
    assert "decoder linear params" in first.out
    assert main(["info", str(gguf_file), "--json"]) == 0
    second = capsys.readouterr()
    assert "using its import made earlier" in second.err
    assert json.loads(second.out)["folder"] == str(folder)


def test_cli_import_writes_the_folder(tiny_pair, tmp_path, capsys):
    gguf_file = write_gguf(tiny_pair[False], tmp_path / "m.gguf", GGMLQuantizationType.Q4_1)
    assert main(["import", str(gguf_file), "-o", str(tmp_path / "out")]) == 0
    assert f"imported {gguf_file}" in capsys.readouterr().out
    assert open_checkpoint(tmp_path / "out").config.num_hidden_layers == 2
    assert main(["import", str(tmp_path / "out"), "-o", str(tmp_path / "again")]) == 2
    assert "is used as it is" in capsys.readouterr().err
