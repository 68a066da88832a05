"""export/tied_embeddings.py: a tied embedding table is stored once in each format's files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_tiny_model

from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.pipeline import export
from rankdown.export.tied_embeddings import table_copies


def quiet(_message: str) -> None:
    """A progress callback that prints nothing."""


@pytest.fixture(scope="session")
def tied_factorized(tiny_tokenizer, tmp_path_factory):
    """A tied tiny Llama compressed with svd: the case where optimum's ONNX export warns about
    the tied weights. Returns the checkpoint folder."""
    from rankdown.compress.config import CompressConfig
    from rankdown.compress.pipeline import compress

    root = tmp_path_factory.mktemp("tied")
    dense = write_tiny_model(root / "dense", tiny_tokenizer, seed=5, tie_word_embeddings=True)
    compress(dense, root / "svd", CompressConfig(method="svd", ratio=0.3, calib_tokens=2048, seq_len=64), progress=quiet)
    return root / "svd"


def test_table_copies_counts_stored_and_transposed_tables(tmp_path):
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    table[3] = 0.0  # a zero row must not make every run of zeros a candidate
    blob = b"\0" * 1000 + table.tobytes() + b"x" * 7 + np.ascontiguousarray(table.T).tobytes() + b"\0" * 99
    (tmp_path / "f").write_bytes(blob)
    (tmp_path / "g").write_bytes(table.tobytes()[:-4])
    assert table_copies([tmp_path / "f"], table) == 2
    assert table_copies([tmp_path / "g"], table) == 0


def test_factorized_tied_model_stores_its_table_once_in_both_formats(tied_factorized, tmp_path):
    manifest = export(tied_factorized, tmp_path / "b", ExportConfig(max_seq_len=64), progress=quiet)
    assert manifest.model.tied_embeddings
    sizes = {}
    for name, entry in manifest.formats.items():
        assert entry.embedding_tables == 1 and entry.parity.passed, name
        sizes[name] = sum(f.bytes for f in entry.files.values())
    assert sizes["executorch"] <= sizes["onnx"], sizes


def test_schema_1_manifest_is_read_with_tied_fields_unknown(tmp_path):
    """Bundles written before schema 2 have no tied_embeddings / embedding_tables: read as None."""
    import json

    from rankdown.export.manifest import FactorNodes, FormatEntry, Manifest, ModelSummary, SourceModel

    summary = ModelSummary(10, 4, 4, 5, 1, 0, [1], {}, tied_embeddings=True)
    entry = FormatEntry({}, 1.0, "none", None, FactorNodes(0, 0, 0, 0, 1), None, None, embedding_tables=1)
    raw = json.loads(Manifest(SourceModel("x", "0", {}, False, None), summary, {}, {}, {"onnx": entry}, {}).to_json())
    assert raw["schema_version"] == 2
    del raw["model"]["tied_embeddings"], raw["formats"]["onnx"]["embedding_tables"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw | {"schema_version": 1}))
    old = Manifest.read(tmp_path)
    assert old.model.tied_embeddings is None and old.formats["onnx"].embedding_tables is None
    (tmp_path / "manifest.json").write_text(json.dumps(raw | {"schema_version": 3}))
    with pytest.raises(RankdownError, match="invalid manifest: schema_version 3 is not one of 1, 2"):
        Manifest.read(tmp_path)


def test_a_table_stored_twice_fails_the_export(tied_factorized, tmp_path, monkeypatch):
    """Without the shared-weight partitioner XNNPACK packs its own copy of the head: refused."""
    import rankdown.export.executorch as et_format

    monkeypatch.setattr(et_format, "shared_weight_partitioners", lambda _int8: [])
    with pytest.raises(RankdownError, match=r"tied embedding table \(\d+ x 64\) is stored 2 times"):
        export(tied_factorized, tmp_path / "b", ExportConfig(formats="executorch", max_seq_len=64, check=False),
               progress=quiet)
    assert not (tmp_path / "b").exists()
