"""--correct: each layer fitted to the dense model's outputs from the compressed model's inputs."""

from __future__ import annotations

import pytest
import torch

from rankdown.compress.calibration import InputStats, collect_layer_stats, collect_paired_stats
from rankdown.compress.decomposition import UnitWeights
from rankdown.compress.whitening import decompose
from rankdown.errors import RankdownError
from tests.helpers import quiet


def _paired(dense: torch.Tensor, compressed: torch.Tensor) -> InputStats:
    stats = InputStats(dense.shape[1], paired=True)
    for d, c in zip(dense.split(64), compressed.split(64)):
        stats.add_group(c)
        stats.add_pair(d, c)
    return stats


def _inputs(n: int, count: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(count, n, generator=g, dtype=torch.float64) * torch.logspace(1, -1, n, dtype=torch.float64)
    # The compressed model's inputs: the dense ones, distorted by a fixed map and noise.
    distort = torch.eye(n, dtype=torch.float64) + 0.2 * torch.randn(n, n, generator=g, dtype=torch.float64)
    return dense, dense @ distort + 0.1 * torch.randn(count, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])  # the wide (SVD) and the tall (eigh) path
def test_the_up_refit_fits_the_dense_outputs_and_its_energies_price_each_rank_exactly(shape):
    m, n = shape
    dense, compressed = _inputs(n)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    corrected = decompose(UnitWeights(["q_proj"], [w], [None], _paired(dense, compressed)))
    plain = decompose(UnitWeights(["q_proj"], [w], [None], _paired(compressed, compressed)))  # whitening on X^
    target = dense @ w.T
    total = float((target**2).sum() / dense.shape[0])

    def error(d, rank: int) -> float:
        a, (b,), _ = d.factors(rank)
        return float(((compressed @ a.T @ b.T - target) ** 2).sum() / dense.shape[0])

    for rank in (1, 4, min(m, n)):
        # Each kept direction lowers the error against the dense outputs by its energy...
        assert error(corrected, rank) == pytest.approx(total - float(corrected.energies[:rank].sum()), abs=1e-5 * total)  # the ridge
        # ...and refitting up to the dense outputs beats whitening alone, which fits W's outputs on X^.
        assert error(corrected, rank) < error(plain, rank)
    assert (corrected.energies[:-1] >= corrected.energies[1:]).all()  # a prefix is the best rank-r choice


def test_on_identical_streams_the_correction_is_plain_whitening():
    dense, _ = _inputs(10)
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    stats = InputStats(10)
    for chunk in dense.split(64):
        stats.add_group(chunk)
    a, (b,), _ = decompose(UnitWeights(["q_proj"], [w], [None], _paired(dense, dense))).factors(4)
    a0, (b0,), _ = decompose(UnitWeights(["q_proj"], [w], [None], stats)).factors(4)
    assert torch.allclose(b @ a, b0 @ a0, atol=1e-3)  # up to the Cholesky ridge


def test_paired_statistics_pair_the_same_tokens_and_return_the_dense_stream(tiny_model_dir):
    from rankdown.checkpoint import load_model, open_checkpoint

    model = load_model(open_checkpoint(tiny_model_dir))
    layer = model.model.layers[0]
    ids = torch.randint(3, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    hidden = model.model.embed_tokens(ids).detach()
    shifted = hidden + 0.05
    stats, dense_out = collect_paired_stats(model, layer, shifted, hidden, batch=4)
    alone, dense_alone = collect_layer_stats(model, layer, hidden, 4)
    shifted_alone, _ = collect_layer_stats(model, layer, shifted, 4)
    assert torch.allclose(dense_out, dense_alone, atol=1e-6)
    site = "attn_in"
    assert torch.allclose(stats[site].second_moment, shifted_alone[site].second_moment, atol=1e-9)
    same, _ = collect_paired_stats(model, layer, hidden, hidden, batch=4)
    assert torch.allclose(same[site].cross_moment, alone[site].second_moment, atol=1e-9)
    assert not torch.allclose(stats[site].cross_moment, stats[site].second_moment, atol=1e-6)


def test_compress_with_correct_records_it_and_other_methods_refuse_it(tiny_model_dir, tmp_path):
    from rankdown.compress.config import CompressConfig, CompressionReport
    from rankdown.compress.pipeline import compress

    cfg = dict(ratio=0.3, calib_tokens=2048, seq_len=64)
    plain = compress(tiny_model_dir, tmp_path / "plain", CompressConfig(method="whiten", **cfg), progress=quiet)
    fixed = compress(tiny_model_dir, tmp_path / "fixed", CompressConfig(method="whiten", correct=True, **cfg),
                     progress=quiet)
    assert CompressionReport.read(tmp_path / "fixed").corrected and not plain.corrected
    assert fixed.params_after == plain.params_after
    with pytest.raises(RankdownError, match="--correct applies to --method whiten, not feature"):
        compress(tiny_model_dir, tmp_path / "feature", CompressConfig(method="feature", correct=True, **cfg),
                 progress=quiet)
    assert not (tmp_path / "feature").exists()
