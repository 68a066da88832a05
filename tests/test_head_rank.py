"""compress --head-rank (compress/head.py): the output head, and a tied token table, as one factor pair."""

from __future__ import annotations

import pytest
import torch
from conftest import write_tiny_model
from helpers import quiet
from safetensors import safe_open

from rankdown.checkpoint import load_model, open_checkpoint
from rankdown.compress.config import CompressConfig, CompressionReport, Healing
from rankdown.compress.head import weighted_factors
from rankdown.compress.pipeline import compress
from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.pipeline import export
from rankdown.factor import FactoredEmbedding, FactorizedLinear
from rankdown.factor_record import FactorRecord
from rankdown.info import model_info

RANK = 16


def _compress(dense, out, **kwargs):
    cfg = CompressConfig(method="feature", ratio=0.3, calib_tokens=4096, seq_len=64, healing=Healing(steps=0), **kwargs)
    return compress(dense, out, cfg, progress=quiet)


@pytest.fixture(scope="module")
def tied_head(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    dense = write_tiny_model(root / "dense", tiny_tokenizer, seed=4, tie_word_embeddings=True)
    report = _compress(dense, root / "c", head_rank=RANK)
    return dense, root / "c", report


def test_full_rank_weighted_factors_rebuild_the_table_and_low_rank_beats_plain_svd_where_weighted():
    torch.manual_seed(0)
    w = torch.randn(50, 12, dtype=torch.float64)
    mix = torch.randn(12, 12, dtype=torch.float64)
    second = mix @ mix.T + 0.1 * torch.eye(12, dtype=torch.float64)
    frequency = torch.zeros(50, dtype=torch.float64)
    frequency[:5] = 1000.0
    a, b = weighted_factors(w, second, frequency, 12)
    assert torch.allclose(b @ a, w, atol=1e-8)

    def weighted_error(approx):
        rows = (frequency + 1).sqrt()[:, None]
        return float(((rows * (w - approx)) @ torch.linalg.cholesky(second)).norm())

    a, b = weighted_factors(w, second, frequency, 4)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    plain = (u[:, :4] * s[:4]) @ vh[:4]
    assert weighted_error(b @ a) < 0.8 * weighted_error(plain)
    # the Gram-matrix route gives the weighted SVD's optimum: SVD of D^1/2 W C^1/2, truncated, unweighted
    rows, root = (frequency + 1).sqrt()[:, None], _sqrtm(second)
    u, s, vh = torch.linalg.svd(rows * w @ root, full_matrices=False)
    direct = ((u[:, :4] * s[:4]) @ vh[:4]) @ torch.linalg.inv(root) / rows
    assert torch.allclose(b @ a, direct, atol=1e-8)


def _sqrtm(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.sqrt()) @ vectors.T


def test_the_statistics_are_the_final_norm_outputs_second_moment_and_the_token_counts(tiny_model_dir):
    from rankdown.compress.head import _statistics

    model = load_model(open_checkpoint(tiny_model_dir))
    windows = torch.randint(0, model.config.vocab_size, (3, 16))
    second, counts = _statistics(model, windows)
    with torch.no_grad():
        hidden = model.model(input_ids=windows).last_hidden_state.reshape(-1, model.config.hidden_size).double()
    assert torch.allclose(second, hidden.T @ hidden / hidden.shape[0], atol=1e-6)
    assert torch.equal(counts, torch.bincount(windows.reshape(-1), minlength=model.config.vocab_size).double())


def test_balancing_a_factored_tied_head_keeps_the_lookup_in_step(tied_head):
    from rankdown.export.factor_balance import balance_factors

    _, folder, _ = tied_head
    model = load_model(open_checkpoint(folder))
    ids = torch.tensor([[3, 7, 11, 19]])
    with torch.no_grad():
        before = model(ids).logits, model.model.embed_tokens(ids)
        balance_factors(model)
        after = model(ids).logits, model.model.embed_tokens(ids)
    assert torch.allclose(before[1], after[1], atol=1e-5) and torch.allclose(before[0], after[0], atol=1e-4)
    assert model.lm_head.up.weight is model.model.embed_tokens.table.weight


def test_equalizing_a_factored_tied_head_keeps_both_functions_and_evens_the_table_columns(tied_head):
    """The lookup's proj follows by its own columns, not by copying the head's down: a checkpoint
    healed through the lookup has a proj that is no longer down's transpose."""
    from rankdown.export.factor_balance import equalize_head

    _, folder, _ = tied_head
    model = load_model(open_checkpoint(folder)).double()
    table = model.model.embed_tokens
    with torch.no_grad():
        table.proj.weight.mul_(1.0 + 0.1 * torch.randn_like(table.proj.weight))  # proj != down.T
        model.lm_head.up.weight[:, 2].mul_(40.0)  # an outlier column, as real tables have
        model.lm_head.down.weight[2].div_(40.0)
    peaks = model.lm_head.up.weight.abs().amax(dim=0)
    assert peaks.max() / peaks.min() > 10
    ids = torch.tensor([[3, 7, 11, 19]])
    with torch.no_grad():
        before = model(ids).logits, table(ids)
        assert equalize_head(model)
        after = model(ids).logits, table(ids)
    torch.testing.assert_close(after[1], before[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(after[0], before[0], rtol=1e-10, atol=1e-10)
    peaks = model.lm_head.up.weight.abs().amax(dim=0)
    torch.testing.assert_close(peaks, torch.full_like(peaks, float(peaks.mean())), rtol=1e-12, atol=0)
    assert model.lm_head.up.weight is table.table.weight


def test_equalizing_a_model_without_a_factored_head_changes_nothing(tiny_model_dir):
    from rankdown.export.factor_balance import equalize_head

    model = load_model(open_checkpoint(tiny_model_dir))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert not equalize_head(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_head_in_a_shared_down_group_is_a_record_error(tied_head, tmp_path):
    import json
    import shutil

    _, folder, _ = tied_head
    copy = shutil.copytree(folder, tmp_path / "c")
    record = json.loads((copy / "factorization.json").read_text())
    record["modules"]["lm_head"]["group"] = "lm_head"
    (copy / "factorization.json").write_text(json.dumps(record))
    with pytest.raises(RankdownError, match="lm_head must be a pair of its own"):
        open_checkpoint(copy)


def test_too_little_calibration_text_for_the_head_is_refused_before_the_decoder(tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("one two three four five six seven eight nine ten " * 4)  # two windows of 64 tokens
    cfg = CompressConfig(method="feature", ratio=0.3, task=None, calib=calib, seq_len=64, healing=Healing(steps=0),
                         head_rank=RANK)
    messages = []
    with pytest.raises(RankdownError, match="--head-rank needs at least 4 calibration windows"):
        compress(tiny_model_dir, tmp_path / "c", cfg, progress=messages.append)
    assert not any("layer" in m for m in messages)  # refused before any layer was compressed
    assert not (tmp_path / "c").exists()


def test_info_piped_into_a_reader_that_leaves_prints_no_traceback(shipped_model_dir):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "rankdown.cli", "info", str(shipped_model_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line is written
    _, err = process.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err
    assert process.returncode == 141


def test_a_tied_table_is_one_factor_pair_shared_by_lookup_and_head(tied_head):
    dense_dir, folder, report = tied_head
    model = load_model(open_checkpoint(folder))
    head, lookup = model.lm_head, model.model.embed_tokens
    assert isinstance(head, FactorizedLinear) and isinstance(lookup, FactoredEmbedding)
    assert head.rank == lookup.rank == RANK and head.up.weight is lookup.table.weight
    assert torch.equal(lookup.proj.weight, head.down.weight.T)
    assert FactorRecord.read(folder).modules["lm_head"].rank == RANK
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.table.weight" in names and "lm_head.up.weight" not in names
    assert report.head is not None and report.head.rank == RANK
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert (report.head.params_before, report.head.params_after) == (vocab * hidden, vocab * RANK + 2 * RANK * hidden)
    assert CompressionReport.read(folder).head == report.head
    assert model_info(open_checkpoint(folder)).head_rank == RANK
    # the lookup is the factored table's row: B[t] A
    ids = torch.tensor([[3, 7, 11]])
    assert torch.allclose(lookup(ids), head.up.weight[ids] @ head.down.weight, atol=1e-6)
    # a random tiny model has no structure to keep at 16 of 64: the loss moves, but stays finite and near
    assert abs(report.head.loss_after - report.head.loss_before) < 1.0


def test_a_factored_tied_head_exports_fp32_with_the_table_stored_once(tied_head, tmp_path):
    _, folder, _ = tied_head
    manifest = export(folder, tmp_path / "b", ExportConfig(max_seq_len=64), progress=quiet)
    for entry in manifest.formats.values():
        assert entry.parity.passed and entry.parity.greedy_match and entry.parity.top1_agreement == 1.0
        assert entry.embedding_tables == 1
        assert entry.factor_nodes.expected == entry.factor_nodes.found  # the head's pair included


def test_an_untied_head_is_factored_and_the_lookup_left_dense(tiny_model_dir, tmp_path):
    report = _compress(tiny_model_dir, tmp_path / "c", head_rank=RANK)
    model = load_model(open_checkpoint(tmp_path / "c"))
    assert isinstance(model.lm_head, FactorizedLinear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert report.head is not None and report.head.params_after == vocab * RANK + RANK * hidden


def test_int8_export_of_a_factored_head_is_refused(tied_head, tmp_path):
    _, folder, _ = tied_head
    with pytest.raises(RankdownError, match="--quantize int8 does not take a factored head"):
        export(folder, tmp_path / "b", ExportConfig(quantize="int8"), progress=quiet)
    assert not (tmp_path / "b").exists()


def test_a_factored_tied_head_exports_int4_with_the_8bit_table_stored_once(tied_head, tmp_path):
    """Both formats: the head's pair 8-bit, its V x r table read by the lookup (stored once), the
    lookup's projection fp32. ExecuTorch pads rank 16 to 32 for the 4-bit groups, the lookup's table
    with it; each self-check holds the runtime to PyTorch with the same quantized weights."""
    import onnx

    from rankdown.export.et_int4 import ByteFactoredLookup, quantize_int4

    _, folder, _ = tied_head
    # --head-bits 8: the default under nearest rounding (GPTQ's default head is 4-bit, its own table)
    manifest = export(folder, tmp_path / "b", ExportConfig(quantize="int4", max_seq_len=64, head_bits=8), progress=quiet)
    for entry in manifest.formats.values():
        assert entry.parity.passed and entry.factor_nodes.expected == entry.factor_nodes.found
    assert manifest.options["head_equalized"] is True
    assert (tmp_path / "b" / "executorch" / "model.ptd").is_file()  # the shared 8-bit table, stored once
    graph = onnx.load(str(tmp_path / "b" / "onnx" / "model.onnx")).graph
    nbits = {n.name: {a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"}
    head_nodes = {name: attrs["bits"] for name, attrs in nbits.items() if "lm_head" in name}
    assert sorted(head_nodes.values()) == [8, 8] and len(head_nodes) == 2
    lookups = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookups) == 1
    assert any(n.op_type == "MatMul" and "embed_tokens" in n.name for n in graph.node)  # the fp32 projection
    model = load_model(open_checkpoint(folder))
    quantized, plan = quantize_int4(model, FactorRecord.read(folder), 32)
    lookup = quantized.model.embed_tokens
    assert isinstance(lookup, ByteFactoredLookup) and plan.padded["lm_head"] == (RANK, 32)
    assert lookup.table.weight is quantized.lm_head.up.weight and lookup.table.weight.dtype == torch.int8
    ids = torch.tensor([[3, 7, 11]])
    with torch.no_grad():  # the padded lookup still gives the float model's rows, to 8-bit rounding
        assert torch.allclose(lookup(ids), model.model.embed_tokens(ids), atol=0.05)


@pytest.mark.parametrize("rank, message", [(0, "at least 1"), (True, "at least 1"), (48, "saves nothing")])
def test_a_head_rank_that_saves_nothing_is_refused(tiny_tokenizer, tmp_path, rank, message):
    dense = write_tiny_model(tmp_path / "dense", tiny_tokenizer, tie_word_embeddings=True)
    with pytest.raises(RankdownError, match=message):
        _compress(dense, tmp_path / "c", head_rank=rank)
    assert not (tmp_path / "c").exists()


def test_workers_then_healing_then_the_head_give_what_one_process_gives(tiny_tokenizer, tmp_path):
    """With workers and healing, the workers factor the decoder, one process heals it, and the head
    is factored last from the healed model, as one process does it: the same ranks, healing and head,
    and nothing of the staging folder is left."""
    dense = write_tiny_model(tmp_path / "dense", tiny_tokenizer, tie_word_embeddings=True)
    settings = dict(method="feature", allocate="uniform", task="prose", ratio=0.3, calib_tokens=4096, seq_len=64, head_rank=RANK,
                    healing=Healing(steps=2, batch=2, seq_len=32, held_back=2))
    one = compress(dense, tmp_path / "one", CompressConfig(**settings), progress=quiet)
    said: list[str] = []
    two = compress(dense, tmp_path / "two", CompressConfig(workers=2, **settings), progress=said.append)
    assert two.workers == 2 and two.head is not None and two.head.rank == RANK and two.healing.steps == 2
    assert two.modules == one.modules and two.head.params_after == one.head.params_after
    assert two.healing.loss_after == pytest.approx(one.healing.loss_after, rel=1e-3)
    assert two.head.loss_after == pytest.approx(one.head.loss_after, rel=1e-3)
    assert model_info(open_checkpoint(tmp_path / "two")).head_rank == RANK
    assert CompressionReport.read(tmp_path / "two") == two
    healed = next(i for i, m in enumerate(said) if m.startswith("healing step 2/2"))
    assert healed < next(i for i, m in enumerate(said) if m.startswith("factoring the head"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "one", "two"]
