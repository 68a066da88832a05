"""--allocate error: error profiles from each method's decomposition, and the greedy allocation."""

import pytest
import torch
from helpers import input_stats, quiet

from rankdown.compress import error_ranks, streaming
from rankdown.compress.config import CompressConfig, Healing
from rankdown.compress.decomposition import UnitWeights
from rankdown.compress.error_ranks import ErrorScale, allocate_by_error, predicted_error
from rankdown.compress.methods import METHODS
from rankdown.compress.pipeline import compress
from rankdown.compress.rank_allocation import TOLERANCE, allocate, total_params
from rankdown.compress.units import Unit, decompose_unit, plan_units
from rankdown.errors import RankdownError


def _skewed_inputs(n: int, count: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, n, generator=g, dtype=torch.float64) * torch.logspace(1, -2, n, dtype=torch.float64)


def _shipped_shapes(layers: int = 6) -> list[dict[str, tuple[int, int, bool]]]:
    """The shipped model's decoder linears: hidden 256, GQA k/v 64, intermediate 1024."""
    attn = {"self_attn.q_proj": (256, 256, False), "self_attn.k_proj": (64, 256, False),
            "self_attn.v_proj": (64, 256, False), "self_attn.o_proj": (256, 256, False)}
    mlp = {"mlp.gate_proj": (1024, 256, False), "mlp.up_proj": (1024, 256, False), "mlp.down_proj": (256, 1024, False)}
    return [attn | mlp] * layers


def _random_profiles(units: list[Unit], seed: int = 0) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    profiles: list[torch.Tensor | None] = []
    for unit in units:
        length = min(unit.in_features, sum(unit.out_features))
        decay = float(torch.rand(1, generator=g)) * 0.1
        profiles.append(torch.exp(-decay * torch.arange(length, dtype=torch.float64)) * float(torch.rand(1, generator=g) + 0.1))
    return profiles


def test_whitened_tail_error_is_the_calibration_output_error():
    """SVD-LLM's truncation loss: the tail of the whitened energies is E||(W - B A) x||^2, at every rank."""
    n = 24
    # Skewed, but not so far that the Cholesky ridge (1e-6 of the mean variance) shows in the smallest tail.
    x = torch.randn(2048, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * torch.logspace(
        0.5, -0.5, n, dtype=torch.float64)
    for m in (16, 40):  # the wide (W C W^T) and the tall (L^T W^T W L) path
        w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
        decomposition = METHODS["whiten"].decompose(UnitWeights(["w"], [w], [None], input_stats(x)))
        for rank in (1, 5, min(m, n) - 1):
            a, (b,), _ = decomposition.factors(rank)
            measured = (((w - b @ a) @ x.T) ** 2).sum().item() / x.shape[0]
            assert decomposition.tail_error(rank) == pytest.approx(measured, rel=1e-4)


@pytest.mark.parametrize("method", ["svd", "joint"])
def test_data_free_tail_error_is_the_frobenius_error(method):
    w = torch.randn(20, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    decomposition = METHODS[method].decompose(UnitWeights(["w"], [w], [None], None))
    a, (b,), _ = decomposition.factors(4)
    assert decomposition.tail_error(4) == pytest.approx(((w - b @ a) ** 2).sum().item(), rel=1e-9)
    assert decomposition.tail_error(12) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["feature", "basis", "asvd"])
def test_every_method_gives_a_descending_profile_of_its_full_rank(method):
    n = 16
    w = torch.randn(24, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    energies = METHODS[method].decompose(UnitWeights(["w"], [w], [None], input_stats(_skewed_inputs(n)))).energies
    assert energies.shape[0] >= n and (energies >= 0).all()  # output PCA has one per output (m > n)
    assert (energies[1:] <= energies[:-1] + 1e-9).all()


def test_the_flat_spectrum_needs_more_rank_than_the_steep_one():
    """Energy concentrated in a few directions is kept by a few ranks; a flat spectrum's error falls
    only with rank, so the greedy spends the budget there."""
    units = [Unit(0, ("mlp.down_proj",), 128, (128,), 0, "down", True),
             Unit(0, ("self_attn.o_proj",), 128, (128,), 0, "o", True)]
    steep = 0.5 ** torch.arange(128, dtype=torch.float64)
    flat = torch.ones(128, dtype=torch.float64)
    for scale in ErrorScale:
        ranks = allocate_by_error(units, [steep, flat], 0.6, scale)
        assert ranks[0] is not None and ranks[1] is not None and ranks[0] < 10 < ranks[1]


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_budget_is_met_within_one_percent_and_ranks_stay_below_break_even(ratio):
    units = plan_units(_shipped_shapes(), joint=False, dense_kinds=frozenset())
    profiles = _random_profiles(units)
    for scale in ErrorScale:
        ranks = allocate_by_error(units, profiles, ratio, scale)
        target = (1 - ratio) * sum(u.dense_params for u in units)
        assert abs(total_params(units, ranks) - target) <= TOLERANCE * target
        assert all(r is None or 1 <= r <= u.max_saving_rank for u, r in zip(units, ranks))
        # Greedy on convex error curves: never worse than the uniform ranks by its own measure.
        uniform = allocate(units, ratio)
        assert predicted_error(profiles, ranks, scale) <= predicted_error(profiles, uniform, scale)


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_rank_multiple_gives_ranks_in_steps_and_still_meets_the_budget(ratio):
    """--rank-multiple 16: every factored rank a multiple of 16 (at export to int4 nothing is padded),
    the budget met within 1%, and still below uniform ranks' error by its own measure."""
    units = plan_units(_shipped_shapes(), joint=False, dense_kinds=frozenset())
    profiles = _random_profiles(units)
    target = (1 - ratio) * sum(u.dense_params for u in units)
    fine = allocate_by_error(units, profiles, ratio, ErrorScale.ABSOLUTE)
    assert any(r is not None and r % 16 for r in fine)  # the control: one-rank steps land anywhere
    stepped = allocate_by_error(units, profiles, ratio, ErrorScale.ABSOLUTE, multiple=16)
    assert all(r is None or (r % 16 == 0 and 16 <= r <= u.max_saving_rank) for u, r in zip(units, stepped))
    assert abs(total_params(units, stepped) - target) <= TOLERANCE * target
    assert predicted_error(profiles, stepped, ErrorScale.ABSOLUTE) < predicted_error(profiles, allocate(units, ratio),
                                                                                      ErrorScale.ABSOLUTE)


def test_max_pair_share_leaves_near_break_even_units_dense_and_still_meets_the_budget():
    """--max-pair-share 0.7: no pair holds more than 70% of its dense parameters (the units whose
    error would take them there are dense instead), and the budget is still met within 1%."""
    units = plan_units(_shipped_shapes(), joint=False, dense_kinds=frozenset())
    capped = plan_units(_shipped_shapes(), joint=False, dense_kinds=frozenset(), pair_share=0.7)
    assert all(c.max_saving_rank < u.max_saving_rank for u, c in zip(units, capped))
    # Slowly decaying profiles: the free allocation takes many units past 70% of dense.
    profiles = [torch.exp(-0.01 * torch.arange(min(u.in_features, sum(u.out_features)), dtype=torch.float64))
                for u in units]
    target = 0.8 * sum(u.dense_params for u in units)
    free = allocate_by_error(units, profiles, 0.2, ErrorScale.ABSOLUTE, multiple=16)
    assert any(r is not None and u.params(r) > 0.7 * u.dense_params for u, r in zip(units, free))  # the control
    ranks = allocate_by_error(capped, profiles, 0.2, ErrorScale.ABSOLUTE, multiple=16)
    assert all(r is None or c.params(r) <= 0.7 * c.dense_params for c, r in zip(capped, ranks))
    assert sum(r is None for r in ranks) > sum(r is None for r in free)
    assert abs(total_params(capped, ranks) - target) <= TOLERANCE * target
    for bad in (0, 1.5, -0.2, True, "x"):
        with pytest.raises(RankdownError, match="--max-pair-share must be a number in"):
            CompressConfig(max_pair_share=bad)
    # Pairs capped below the share the budget keeps: the error says which option to raise.
    tight = plan_units(_shipped_shapes(), joint=False, dense_kinds=frozenset(), pair_share=0.5)
    with pytest.raises(RankdownError, match=r"capped at 0.5 of their dense parameters \(raise --max-pair-share\)"):
        allocate_by_error(tight, profiles, 0.4, ErrorScale.ABSOLUTE, multiple=16)
    with pytest.raises(RankdownError, match="--max-pair-share applies to error ranks"):
        CompressConfig(max_pair_share=0.7, allocate="uniform")


def test_rank_multiple_is_refused_outside_error_ranks_and_out_of_range():
    assert CompressConfig(rank_multiple=32).rank_multiple == 32  # error ranks are the default
    with pytest.raises(RankdownError, match="--rank-multiple applies to error ranks"):
        CompressConfig(rank_multiple=32, allocate="uniform")
    for bad in (0, 257, 2.5, True):
        with pytest.raises(RankdownError, match="--rank-multiple must be a whole number from 1 to 256"):
            CompressConfig(rank_multiple=bad)


def test_a_unit_whose_error_never_falls_enough_is_kept_dense_not_past_break_even():
    """At break-even a factor pair costs the dense linear's parameters: the next step is dense."""
    units = plan_units(_shipped_shapes(1), joint=True, dense_kinds=frozenset({"v"}))
    profiles = [None if not u.compressible else 0.9 ** torch.arange(min(u.in_features, sum(u.out_features)),
                                                                      dtype=torch.float64) for u in units]
    o = next(i for i, u in enumerate(units) if u.kind == "o")
    profiles[o] = torch.ones(256, dtype=torch.float64)  # flat: every rank matters as much as the first
    ranks = allocate_by_error(units, profiles, 0.1, ErrorScale.RELATIVE)
    assert ranks[o] is None
    assert ranks[[u.kind for u in units].index("v")] is None  # the method's dense kind stays dense
    with pytest.raises(RankdownError, match="ratio 0.999 is out of reach"):
        allocate_by_error(units, profiles, 0.999, ErrorScale.RELATIVE)


@pytest.mark.parametrize("method", ["whiten", "feature"])
def test_error_allocation_compresses_and_records_what_it_chose(tiny_model_dir, tmp_path, monkeypatch, method):
    cfg = CompressConfig(method=method, ratio=0.4, allocate="error", calib_tokens=2048, seq_len=64, healing=Healing(steps=0))
    given: dict[str, list] = {"profile": [], "factors": []}

    def recording(stage):
        def decompose(*args, **kwargs):
            given[stage].append(kwargs.get("output_weights", args[6] if len(args) > 6 else None))
            return decompose_unit(*args, **kwargs)
        return decompose

    def weighed_twice(*args, **kwargs):
        raise AssertionError("energies already in the loss's metric were weighed again")

    monkeypatch.setattr(error_ranks, "decompose_unit", recording("profile"))
    monkeypatch.setattr(streaming, "decompose_unit", recording("factors"))
    monkeypatch.setattr(error_ranks, "weighted_energies", weighed_twice)
    report = compress(tiny_model_dir, tmp_path / "e", cfg, progress=quiet)
    # The ranks are priced, and the factors fitted, in the loss-weighted metric: every unit of
    # both passes was handed its outputs' sensitivities, each factored unit the ones it was priced by.
    for stage in ("profile", "factors"):
        assert given[stage] and all(w is not None and (w > 0).all() for w in given[stage])
    priced = [w.cpu() for w in given["profile"]]
    assert all(any(p.shape == w.shape and torch.allclose(p, w.cpu()) for p in priced) for w in given["factors"])
    assert report.allocation_check["loss_weighted_factors"] == 1
    assert abs(report.achieved_ratio - 0.4) <= 0.004
    kinds = {"qk", "o", "gate", "up", "down"} | ({"v"} if method == "whiten" else set())  # feature leaves v dense
    assert report.allocate == "error" and set(report.keep_ratios) == kinds
    check = report.allocation_check
    assert check["error_scale"] in {s.value for s in ErrorScale}
    assert isinstance(check["predicted_error"], float) and isinstance(check["uniform_predicted_error"], float)
    assert check["predicted_error"] <= check["uniform_predicted_error"]


def test_compress_with_a_rank_multiple_writes_ranks_in_steps(tiny_model_dir, tmp_path):
    from rankdown.factor_record import FactorRecord

    cfg = CompressConfig(method="whiten", ratio=0.4, calib_tokens=2048, seq_len=64, healing=Healing(steps=0),
                         rank_multiple=16)
    report = compress(tiny_model_dir, tmp_path / "out", cfg, progress=lambda _m: None)
    ranks = [spec.rank for spec in FactorRecord.read(tmp_path / "out").modules.values() if spec.rank is not None]
    assert ranks and all(r % 16 == 0 for r in ranks)
    assert report.allocation_check["rank_multiple"] == 16 and abs(report.achieved_ratio - 0.4) <= 0.004


def test_compress_with_a_max_pair_share_keeps_every_pair_under_it(shipped_model_dir, tmp_path):
    from rankdown.factor_record import FactorRecord

    # A cap under the share the budget keeps (0.3 of 60%): the allocation mixes dense units and small
    # pairs, while uniform ranks (the report's reference) could not meet the budget under the cap.
    cfg = CompressConfig(method="whiten", ratio=0.4, calib_tokens=2048, seq_len=64, healing=Healing(steps=0),
                         rank_multiple=32, max_pair_share=0.3)
    report = compress(shipped_model_dir, tmp_path / "out", cfg, progress=lambda _m: None)
    specs = [s for s in FactorRecord.read(tmp_path / "out").modules.values() if s.rank is not None]
    assert specs and all(s.rank * (s.in_features + s.out_features) <= 0.3 * s.in_features * s.out_features
                         for s in specs)
    assert report.allocation_check["max_pair_share"] == 0.3 and abs(report.achieved_ratio - 0.4) <= TOLERANCE * 0.6
    assert report.allocation_check["uniform_predicted_error"] > 0
