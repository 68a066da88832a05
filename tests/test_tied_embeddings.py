"""export/tied_embeddings.py: a tied embedding table is stored once in each format's files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_tiny_model
from helpers import quiet

from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.pipeline import export
from rankdown.export.tied_embeddings import table_copies


@pytest.fixture(scope="session")
def tied_factorized(tiny_tokenizer, tmp_path_factory):
    """A tied tiny Llama compressed with svd: the case where optimum's ONNX export warns about
    the tied weights. Returns the checkpoint folder."""
    from rankdown.compress.config import CompressConfig, Healing
    from rankdown.compress.pipeline import compress

    root = tmp_path_factory.mktemp("tied")
    dense = write_tiny_model(root / "dense", tiny_tokenizer, seed=5, tie_word_embeddings=True)
    compress(dense, root / "svd", CompressConfig(method="svd", ratio=0.3, calib_tokens=2048, seq_len=64, healing=Healing(steps=0)),
             progress=quiet)
    return root / "svd"


def test_table_copies_counts_stored_and_transposed_tables(tmp_path):
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    table[3] = 0.0  # a zero row must not make every run of zeros a candidate
    blob = b"\0" * 1000 + table.tobytes() + b"x" * 7 + np.ascontiguousarray(table.T).tobytes() + b"\0" * 99
    (tmp_path / "f").write_bytes(blob)
    (tmp_path / "g").write_bytes(table.tobytes()[:-4])
    assert table_copies([tmp_path / "f"], table) == 2
    assert table_copies([tmp_path / "g"], table) == 0


@pytest.fixture(scope="session")
def tied_bundle(tied_factorized, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("tied-bundle") / "b"
    return bundle, export(tied_factorized, bundle, ExportConfig(max_seq_len=64), progress=quiet)


def test_factorized_tied_model_stores_its_table_once_in_both_formats(tied_factorized, tied_bundle):
    """ExecuTorch: the lookup's constant and XNNPACK's head weight share one segment of model.ptd."""
    from rankdown.checkpoint import load_model, open_checkpoint
    from rankdown.export.tied_embeddings import tied_table

    bundle, manifest = tied_bundle
    assert manifest.model.tied_embeddings
    sizes = {}
    for name, entry in manifest.formats.items():
        assert entry.embedding_tables == 1 and entry.parity.passed, name
        sizes[name] = sum(f.bytes for f in entry.files.values())
    table = tied_table(load_model(open_checkpoint(tied_factorized)))
    assert table is not None
    # A second method (decode_step, on by default in int4) would add its own graph, but no second table.
    assert sizes["executorch"] < sizes["onnx"] + table.nbytes, sizes
    assert set(manifest.formats["executorch"].files) == {"executorch/model.pte", "executorch/model.ptd"}
    assert table_copies([bundle / "executorch" / "model.ptd"], table) == 1
    assert table_copies([bundle / "executorch" / "model.pte"], table) == 0


def test_tied_pte_with_its_ptd_runs_in_the_llm_runner_and_the_native_runner(tied_factorized, tied_bundle):
    """What apps link: TextLLMRunner given the .ptd prints PyTorch's greedy text, and the C++
    runner (``--data``) returns the Python runtime's tokens, and its logits to float rounding."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import ExecuTorchDecoder, NativeExecuTorchDecoder, greedy
    from rankdown.export.parity import torch_greedy

    bundle, _ = tied_bundle
    pte, ptd = bundle / "executorch" / "model.pte", bundle / "executorch" / "model.ptd"
    tokenizer = load_tokenizer(tied_factorized)
    model = load_model(open_checkpoint(tied_factorized)).eval()
    runner = TextLLMRunner(str(pte), str(bundle / "tokenizer.json"), data_path=str(ptd))
    prompt = "12+7="
    reference = torch_greedy(model, tokenizer(prompt)["input_ids"], 4)
    pieces: list[str] = []
    runner.generate(prompt, GenerationConfig(max_new_tokens=4, temperature=0.0, echo=False, num_bos=1),
                    token_callback=pieces.append)
    assert "".join(pieces) == tokenizer.decode(list(reference.tokens), skip_special_tokens=True)

    native = NativeExecuTorchDecoder(pte, [str(build_runner(progress=quiet) / "bin" / BINARY)], threads=1)
    a, b = greedy(native, [5, 9, 30, 7], 6), greedy(ExecuTorchDecoder(pte), [5, 9, 30, 7], 6)
    assert a.tokens == b.tokens and np.abs(a.prompt_logits - b.prompt_logits).max() < 1e-4
    native.close()


def test_a_ptd_the_manifest_does_not_list_is_refused(tied_bundle, tmp_path):
    import json
    import shutil

    from rankdown.export.manifest import MANIFEST_FILE
    from rankdown.validate.config import ValidateConfig
    from rankdown.validate.harness import validate

    bundle, _ = tied_bundle
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    del raw["formats"]["executorch"]["files"]["executorch/model.ptd"]
    (copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(RankdownError, match=r"model.pte: data it reads, executorch/model.ptd, is not listed in the "
                                            r"manifest"):
        validate(copy, ValidateConfig(runtimes="executorch", latency=None), progress=quiet)


def test_schema_1_manifest_is_read_with_tied_fields_unknown(tmp_path):
    """Bundles written before schema 2 have no tied_embeddings / embedding_tables: read as None."""
    import json

    from rankdown.export.manifest import FactorNodes, FormatEntry, Manifest, ModelSummary, SourceModel

    summary = ModelSummary(10, 4, 4, 5, 1, 0, [1], {}, tied_embeddings=True)
    entry = FormatEntry({}, 1.0, "none", None, FactorNodes(0, 0, 0, 0, 1), None, None, embedding_tables=1)
    raw = json.loads(Manifest(SourceModel("x", "0", {}, False, None), summary, {}, {}, {"onnx": entry}, {}).to_json())
    assert raw["schema_version"] == 3
    del raw["model"]["tied_embeddings"], raw["formats"]["onnx"]["embedding_tables"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw | {"schema_version": 1}))
    old = Manifest.read(tmp_path)
    assert old.model.tied_embeddings is None and old.formats["onnx"].embedding_tables is None
    (tmp_path / "manifest.json").write_text(json.dumps(raw | {"schema_version": 4}))
    with pytest.raises(RankdownError, match="invalid manifest: schema_version 4 is not one of 1, 2, 3"):
        Manifest.read(tmp_path)


def test_a_table_stored_twice_fails_the_export(tied_factorized, tmp_path, monkeypatch):
    """Without the .ptd XNNPACK packs its own copy of the head into the .pte: refused."""
    import rankdown.export.executorch as et_format

    monkeypatch.setattr(et_format, "tag_tied_table", lambda _program, _tag: False)
    with pytest.raises(RankdownError, match=r"tied embedding table \(\d+ x 64\) is stored 2 times"):
        export(tied_factorized, tmp_path / "b", ExportConfig(formats="executorch", max_seq_len=64, check=False),
               progress=quiet)
    assert not (tmp_path / "b").exists()


def test_int4_pte_stores_its_8bit_tied_table_once(tied_factorized, tmp_path):
    """ExecuTorch int4 with an 8-bit head (`--head-bits 8`, the default under nearest rounding): the
    token lookup reads the head's own int8 rows and scales (one tensor), and the .pte with its .ptd
    holds that int8 table once; the self-check (against the quantized model, then the float one)
    passes with it."""
    from rankdown.checkpoint import load_model, open_checkpoint
    from rankdown.export.et_int4 import quantize_int4
    from rankdown.factor_record import FactorRecord

    manifest = export(tied_factorized, tmp_path / "b", ExportConfig(formats="executorch", quantize="int4", head_bits=8),
                      progress=quiet)
    entry = manifest.formats["executorch"]
    assert entry.lowering is not None and entry.lowering.passed and entry.parity.passed
    files = sorted((tmp_path / "b" / "executorch").iterdir())
    assert {p.name for p in files} >= {"model.pte", "model.ptd"} and "executorch/model.ptd" in entry.files
    quantized, _ = quantize_int4(load_model(open_checkpoint(tied_factorized)), FactorRecord.read(tied_factorized), 32)
    table = quantized.get_output_embeddings().weight.detach().numpy()
    assert table.dtype == np.int8 and quantized.get_input_embeddings().weight is quantized.get_output_embeddings().weight
    assert table_copies(files, table) == 1
