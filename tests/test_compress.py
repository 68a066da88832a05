import json
from pathlib import Path

import pytest
import torch
from helpers import input_stats, quiet
from safetensors.torch import load_file

from rankdown.checkpoint import load_model, open_checkpoint
from rankdown.compress.calibration import InputStats
from rankdown.compress.config import BasisTuning, CompressConfig, CompressionReport, Healing
from rankdown.compress.decomposition import UnitWeights
from rankdown.compress.methods import METHODS
from rankdown.compress.pipeline import compress
from rankdown.compress.rank_allocation import allocate
from rankdown.compress.units import Unit
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear
from rankdown.info import model_info

SMALL = dict(calib_tokens=2048, seq_len=64, healing=Healing(steps=0))  # healing has its own tests



def _skewed_inputs(n: int, count: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, n, dtype=torch.float64)
    return torch.randn(count, n, generator=g, dtype=torch.float64) * scales + 0.3


@pytest.fixture(scope="module")
def compressed(compressed_tiny):
    return compressed_tiny


@pytest.mark.parametrize("method", [m.value for m in METHODS])
def test_budget_is_met_within_one_percent(compressed, method):
    folder, report = compressed[method]
    assert abs(report.achieved_ratio - 0.3) <= 0.003
    info = model_info(open_checkpoint(folder))
    assert info.decoder_linear_params == report.params_after  # the report matches the files
    assert CompressionReport.read(folder).params_after == report.params_after
    assert json.loads((folder / "compression.json").read_text())["method"] == method


@pytest.mark.parametrize("method", [m.value for m in METHODS])
def test_full_rank_factors_reproduce_the_dense_layer(method):
    torch.manual_seed(0)
    n = 24
    members = [torch.randn(16, n, dtype=torch.float64)]
    if METHODS[method].joint_groups:
        members.append(torch.randn(8, n, dtype=torch.float64))
    unit = UnitWeights(["a", "b"][: len(members)], members, [None] * len(members), input_stats(_skewed_inputs(n)))
    decomposition = METHODS[method].decompose(unit)
    a, bs, biases = decomposition.factors(min(n, sum(w.shape[0] for w in members)))
    x = _skewed_inputs(n, 32, seed=1)
    for w, b, bias in zip(members, bs, biases):
        y = x @ a.T @ b.T + (0 if bias is None else bias)
        torch.testing.assert_close(y, x @ w.T, atol=1e-5, rtol=1e-5)


def test_joint_rank_shares_one_down_per_group(compressed):
    folder, _ = compressed["joint"]
    record = open_checkpoint(folder).record.modules
    for layer in range(2):
        q, k = f"model.layers.{layer}.self_attn.q_proj", f"model.layers.{layer}.self_attn.k_proj"
        gate, up = f"model.layers.{layer}.mlp.gate_proj", f"model.layers.{layer}.mlp.up_proj"
        assert record[k].shares_down_with == q and record[up].shares_down_with == gate
        assert record[q].rank == record[k].rank
    model = load_model(open_checkpoint(folder))
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.shared_down is attn.q_proj.down


def test_whitening_beats_svd_on_output_error_for_skewed_data():
    torch.manual_seed(0)
    n, m, rank = 32, 32, 8
    w = torch.randn(m, n, dtype=torch.float64)
    x = _skewed_inputs(n)
    unit = UnitWeights(["w"], [w], [None], input_stats(x))
    errors = {}
    for method in ("svd", "whiten"):
        a, (b,), _ = METHODS[method].decompose(unit).factors(rank)
        errors[method] = torch.linalg.norm(x @ (w - b @ a).T).item()
    assert errors["whiten"] < 0.7 * errors["svd"]


def test_basis_selection_depends_on_the_task_data():
    torch.manual_seed(0)
    n, rank = 32, 6
    w = torch.randn(32, n, dtype=torch.float64)
    first = _skewed_inputs(n, seed=2)
    second = _skewed_inputs(n, seed=3).flip(1)  # energy in the other input channels
    def pick(x):
        return METHODS["basis"].decompose(UnitWeights(["w"], [w], [None], input_stats(x))).factors(rank)[0]
    assert not torch.allclose(pick(first), pick(second), atol=1e-3)
    assert torch.allclose(pick(first), pick(first))


def test_a_unit_that_cannot_save_parameters_stays_dense():
    units = [Unit(0, ("mlp.down_proj",), 512, (512,), 0, "down", True),
             Unit(0, ("self_attn.o_proj",), 2, (2,), 0, "o", True)]
    ranks = allocate(units, 0.5)
    assert ranks[1] is None and ranks[0] is not None


def test_feature_method_reports_v_left_dense(compressed):
    _, report = compressed["feature"]
    assert report.modules["model.layers.0.self_attn.v_proj"].rank is None
    assert "left dense" in report.modules["model.layers.0.self_attn.v_proj"].note


def test_bayes_allocation_meets_the_budget_and_records_keep_ratios(tiny_model_dir, tmp_path):
    cfg = CompressConfig(method="whiten", ratio=0.4, allocate="bayes", trials=3, **SMALL)
    report = compress(tiny_model_dir, tmp_path / "b", cfg, progress=quiet)
    assert abs(report.achieved_ratio - 0.4) <= 0.004
    assert set(report.keep_ratios) == {"qk", "v", "o", "gate", "up", "down"}
    check = report.allocation_check
    if "bayes_loss" in check:  # the final factors were re-judged: the lower loss on unseen windows wins
        assert check["kept"] == ("bayes" if check["bayes_loss"] < check["uniform_loss"] else "uniform")
    else:
        assert check["kept"] == "uniform"


def test_the_bayes_search_lets_go_of_the_dense_model(tiny_model_dir, monkeypatch):
    """optuna keeps the ImportError of each optional package it tries (greenlet, redis) with its
    traceback, which holds the frames that imported it: in a fresh process, the search's. Those must
    not keep the model and the search's tensors (5 GB on SmolLM2) alive through healing."""
    import gc
    import sys
    import weakref

    from rankdown.compress.bayesian_ranks import compress_with_bayes
    from rankdown.compress.pipeline import layer_shapes, plan_units, skeleton_model

    for name in [n for n in sys.modules if n == "optuna" or n.startswith("optuna.")]:
        monkeypatch.delitem(sys.modules, name)  # as in a fresh process: optuna imported inside the search
    ckpt = open_checkpoint(tiny_model_dir)
    cfg = CompressConfig(method="whiten", ratio=0.4, allocate="bayes", trials=2, **SMALL)
    spec = METHODS[cfg.method]
    units = plan_units(layer_shapes(skeleton_model(ckpt)), spec.joint_groups, spec.dense_kinds, spec.factor_bias)
    model = load_model(ckpt)
    windows = torch.randint(0, model.config.vocab_size, (32, 32), generator=torch.Generator().manual_seed(0))
    alive = weakref.ref(model)
    ranks, _ = compress_with_bayes(model, spec, units, windows, cfg, quiet)
    assert len(ranks) == len(units)
    del model
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(ratio=0), "strictly between 0 and 1"),
    (dict(ratio=1.5), "strictly between 0 and 1"),
    (dict(ratio="x"), "strictly between 0 and 1"),
    (dict(method="magic"), "unknown --method 'magic': choose one of svd, asvd, whiten, joint, feature, basis$"),
    (dict(allocate="best"), "unknown --allocate 'best'"),
    (dict(basis_mode="trained"), "unknown --basis-mode 'trained'"),
    (dict(task=None), "give a task \\(math, code, prose, compare, identifiers\\) or a calibration file"),
    (dict(method="whiten", basis_mode="tuned"), "applies to --method basis only"),
    (dict(method="basis", basis_mode="tuned", allocate="bayes"), "leave --allocate unset"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(RankdownError, match=message):
        CompressConfig(**({"ratio": 0.4} | kwargs))


def test_interrupted_compression_leaves_no_output(tiny_model_dir, tmp_path):
    def interrupt(message):
        if message.startswith("layer 2"):
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(tiny_model_dir, out, CompressConfig(method="whiten", ratio=0.3, **SMALL), progress=interrupt)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_that_exists_or_is_the_input_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(RankdownError, match="already exists"):
        compress(tiny_model_dir, tmp_path / "taken", CompressConfig(ratio=0.3, **SMALL), progress=quiet)
    with pytest.raises(RankdownError, match="must not be"):
        compress(tiny_model_dir, tiny_model_dir / "inside", CompressConfig(ratio=0.3, **SMALL), progress=quiet)


def test_compressing_a_compressed_checkpoint_is_refused(compressed, tmp_path):
    folder, _ = compressed["svd"]
    with pytest.raises(RankdownError, match="already compressed"):
        compress(folder, tmp_path / "again", CompressConfig(ratio=0.3, **SMALL), progress=quiet)


def test_compressed_model_stays_close_to_dense_at_low_ratio(tiny_model_dir, tmp_path):
    report = compress(tiny_model_dir, tmp_path / "w", CompressConfig(method="whiten", ratio=0.05, **SMALL), progress=quiet)
    dense = load_model(open_checkpoint(tiny_model_dir))
    small = load_model(open_checkpoint(tmp_path / "w"))
    ids = torch.tensor([[0, 5, 9, 17, 3, 40, 41]])
    assert report.achieved_ratio > 0.04
    assert (dense(ids).logits - small(ids).logits).abs().max() < (dense(ids).logits.abs().max() * 0.5)


def test_info_and_report_agree_on_the_ratio(compressed):
    for method in ("feature", "joint"):
        folder, report = compressed[method]
        info = model_info(open_checkpoint(folder))
        assert info.dense_decoder_linear_params == report.params_before
        assert info.compression_ratio == pytest.approx(report.achieved_ratio)


def test_tuned_basis_meets_the_budget_with_factor_pairs_and_beats_closed_form(tiny_model_dir, tmp_path):
    tuning = BasisTuning(steps=30, batch=4, prune_steps=3, coefficient_lr=1e-2, new_bases_lr=2e-3, distill=1.0)
    tuned = compress(tiny_model_dir, tmp_path / "tuned",
                     CompressConfig(method="basis", basis_mode="tuned", ratio=0.4, tuning=tuning, **SMALL), progress=quiet)
    closed = compress(tiny_model_dir, tmp_path / "closed", CompressConfig(method="basis", ratio=0.4, allocate="uniform", **SMALL),
                      progress=quiet)
    assert abs(tuned.achieved_ratio - 0.4) <= 0.004
    assert json.loads((tmp_path / "tuned" / "compression.json").read_text())["basis_mode"] == "tuned"
    model = load_model(open_checkpoint(tmp_path / "tuned"))
    for layer in model.model.layers:
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert isinstance(layer.get_submodule(name), FactorizedLinear)
    assert model_info(open_checkpoint(tmp_path / "tuned")).decoder_linear_params == tuned.params_after
    # Ranks are an outcome of pruning: they differ between linears of one shape.
    assert len({tuned.modules[f"model.layers.{i}.mlp.up_proj"].rank for i in range(2)}
               | {tuned.modules[f"model.layers.{i}.mlp.gate_proj"].rank for i in range(2)}) > 1
    # Same calibration windows, same budget: training the bases must lower the task loss.
    assert tuned.calibration_loss < closed.calibration_loss - 0.05


def test_cholesky_ridge_leaves_the_statistics_unchanged():
    from rankdown.compress.whitening import cholesky_factor

    x = _skewed_inputs(16, count=8)  # 8 samples of 16 channels: a singular second moment
    c = input_stats(x).second_moment
    before = c.clone()
    lower = cholesky_factor(c)
    assert torch.equal(c, before)
    assert torch.allclose(lower @ lower.T, c, atol=1e-3 * c.diagonal().mean().item())


def test_streamed_loss_equals_cross_entropy_over_the_full_vocabulary():
    from rankdown.compress.streaming import streamed_loss

    torch.manual_seed(0)
    hidden, windows = torch.randn(5, 9, 16), torch.randint(0, 40000, (5, 9))
    head, norm = torch.randn(40000, 16).half(), torch.nn.LayerNorm(16)  # 40000 rows: three vocabulary slices
    logits = norm(hidden[:, :-1]) @ head.float().T
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 40000), windows[:, 1:].reshape(-1)).item()
    assert streamed_loss(hidden, windows, norm, head) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape", [(24, 64), (32, 32)])
def test_wide_whitening_without_cholesky_matches_the_cholesky_path(shape):
    """The m <= n path (eigenvectors of W C W^T, no n x n factor) gives SVD-LLM's factors: the
    same output error at every rank, and it lets go of the statistics it was handed."""
    import weakref

    from rankdown.compress.whitening import cholesky_factor, projected_factors, whitened_factors

    m, n = shape
    w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stats = input_stats(_skewed_inputs(n))
    chol = cholesky_factor(stats.second_moment)
    a_ref, (b_ref,) = whitened_factors([w], chol)
    unit = UnitWeights(["down_proj"], [w], [None], stats)
    alive = weakref.ref(stats)
    del stats
    a, (b,) = projected_factors(unit)
    assert alive() is None and unit.stats is None
    for rank in (1, m // 3, m):
        expected = ((b_ref[:, :rank] @ a_ref[:rank] - w) @ chol).norm()
        got = ((b[:, :rank] @ a[:rank] - w) @ chol).norm()
        assert got == pytest.approx(expected.item(), rel=1e-6, abs=1e-9)
    assert torch.allclose(b @ a, w, atol=1e-8)


def test_bayes_is_judged_on_windows_the_search_never_saw():
    """The check against uniform must not reuse the search's windows, else it favours the search's pick."""
    from rankdown.compress.bayesian_ranks import MIN_WINDOWS
    from rankdown.compress.calibration import held_back

    windows = torch.arange(40 * 8).reshape(40, 8)
    search, unseen = held_back(windows, MIN_WINDOWS, "task math: bayes allocation")
    assert unseen.shape[0] == 10 and torch.equal(torch.cat([search, unseen]), windows)
    # The search splits its own windows the same way: at the fewest windows allowed, both halves hold two.
    fit, judged = held_back(search[:MIN_WINDOWS - 2], MIN_WINDOWS - 2, "bayes")
    assert fit.shape[0] == 2 and judged.shape[0] == 2
    with pytest.raises(RankdownError, match="task math: bayes allocation needs at least 6 calibration windows of 8 tokens"):
        held_back(windows[:5], MIN_WINDOWS, "task math: bayes allocation")


def test_tall_whitening_by_eigenvectors_matches_the_svd_of_w_l():
    from rankdown.compress.decomposition import balanced_svd
    from rankdown.compress.whitening import cholesky_factor, whitened_factors

    n = 24
    w = torch.randn(80, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    chol = cholesky_factor(input_stats(_skewed_inputs(n)).second_moment)
    a, (b,) = whitened_factors([w], chol)
    s = balanced_svd(w @ chol)[1]
    for rank in (1, 7, n):
        # The rank-r error in the whitened norm is the tail of W L's singular values (Eckart-Young).
        got = ((b[:, :rank] @ a[:rank] - w) @ chol).norm().item()
        assert got == pytest.approx(s[rank:].norm().item(), rel=1e-6, abs=1e-9)
    assert torch.allclose(b @ a, w, atol=1e-8)


def test_older_reports_still_read_and_an_unknown_version_does_not(compressed, tmp_path):
    folder, _ = compressed["svd"]
    raw = json.loads((folder / "compression.json").read_text())
    assert raw["schema_version"] == 8 and raw["healing"] is None and (raw["workers"], raw["device"]) == (1, "cpu")
    assert raw["head"] is None and raw["weights"] == "float"
    # every setting, beside the fields the report had before (the checkpoint's whole recipe)
    config = raw["config"]
    assert (config["method"], config["calib_tokens"], config["seq_len"], config["rank_multiple"]) == ("svd", 2048, 64, 1)
    assert config["healing"]["steps"] == 0 and config["task"] == "math" and "overwrite" not in config
    v7 = {k: v for k, v in raw.items() if k != "config"} | {"schema_version": 7}
    (tmp_path / "compression.json").write_text(json.dumps(v7))
    assert CompressionReport.read(tmp_path).config == {}
    v6 = {k: v for k, v in v7.items() if k != "weights"} | {"schema_version": 6}
    (tmp_path / "compression.json").write_text(json.dumps(v6))
    assert CompressionReport.read(tmp_path).weights == "float"
    v5 = {k: v for k, v in v6.items() if k != "head"} | {"schema_version": 5}
    (tmp_path / "compression.json").write_text(json.dumps(v5))
    assert CompressionReport.read(tmp_path).head is None
    v3 = {k: v for k, v in v5.items() if k not in ("workers", "device")} | {"schema_version": 3}
    (tmp_path / "compression.json").write_text(json.dumps(v3))
    assert (CompressionReport.read(tmp_path).workers, CompressionReport.read(tmp_path).device) == (1, "cpu")
    v2 = {k: v for k, v in v3.items() if k != "healing"} | {"schema_version": 2}
    (tmp_path / "compression.json").write_text(json.dumps(v2))
    assert CompressionReport.read(tmp_path).healing is None
    old = {k: v for k, v in v2.items() if k != "allocation_check"} | {"schema_version": 1}
    (tmp_path / "compression.json").write_text(json.dumps(old))
    assert CompressionReport.read(tmp_path).allocation_check == {}
    (tmp_path / "compression.json").write_text(json.dumps(raw | {"schema_version": 9}))
    with pytest.raises(RankdownError, match="compression.json: invalid compression report: schema_version 9"):
        CompressionReport.read(tmp_path)


def test_whitening_an_all_zero_matrix_gives_finite_zero_factors():
    from rankdown.compress.whitening import decompose

    for shape in ((8, 16), (16, 8)):  # the wide (eigenvectors of W C W^T) and the tall path
        stats = input_stats(_skewed_inputs(shape[1]))
        a, (b,), _ = decompose(UnitWeights(["q_proj"], [torch.zeros(shape, dtype=torch.float64)], [None], stats)).factors(3)
        assert torch.isfinite(a).all() and torch.isfinite(b).all() and not (b @ a).any()


def test_every_rank_strategy_is_registered_and_the_config_picks_it():
    from rankdown.compress.config import Strategy
    from rankdown.compress.strategies import STRATEGIES

    assert set(STRATEGIES) == set(Strategy)
    assert CompressConfig(ratio=0.4).strategy is Strategy.ERROR  # the default: error ranks
    assert CompressConfig(ratio=0.4, allocate="uniform").strategy is Strategy.UNIFORM
    assert CompressConfig(ratio=0.4, allocate="bayes").strategy is Strategy.BAYES
    tuned = CompressConfig(ratio=0.4, method="basis", basis_mode="tuned")
    assert tuned.strategy is Strategy.TUNED_BASIS and tuned.allocation.value == "uniform"  # what the report says
    assert CompressConfig(ratio=0.4, method="basis", basis_mode="tuned", allocate="uniform").strategy is Strategy.TUNED_BASIS
    with pytest.raises(RankdownError, match="leave --allocate unset"):
        CompressConfig(ratio=0.4, method="basis", basis_mode="tuned", allocate="error")


def test_the_pipeline_runs_the_strategy_from_the_registry(tiny_model_dir, tmp_path, monkeypatch):
    """A strategy is a registry entry: replacing the entry is all it takes for compress to use it."""
    from rankdown.compress import strategies, uniform_ranks
    from rankdown.compress.config import Strategy

    seen = []

    def spy(job):
        seen.append(len(job.units))
        return uniform_ranks.choose(job)

    monkeypatch.setitem(strategies.STRATEGIES, Strategy.UNIFORM, strategies.StrategySpec(spy))
    report = compress(tiny_model_dir, tmp_path / "s", CompressConfig(method="svd", ratio=0.3, allocate="uniform", **SMALL),
                      progress=quiet)
    assert seen == [14] and abs(report.achieved_ratio - 0.3) <= 0.003  # 2 layers x 7 linears


def test_the_compress_command_defaults_are_the_configs(monkeypatch):
    from rankdown.cli import build_parser
    from rankdown.compress import pipeline

    seen = []

    def stop(_model, _out, cfg):
        seen.append(cfg)
        raise RuntimeError("stopped before compressing")

    monkeypatch.setattr(pipeline, "compress", stop)
    args = build_parser().parse_args(["compress", "-o", "out", "--ratio", "0.25"])
    with pytest.raises(RuntimeError, match="stopped before compressing"):
        args.func(args)
    assert seen == [CompressConfig(ratio=0.25)]


def _paired_stats(dense: torch.Tensor, compressed_inputs: torch.Tensor, group_rows: int = 64) -> InputStats:
    stats = InputStats(dense.shape[1], paired=True)
    for x, d in zip(compressed_inputs.split(group_rows), dense.split(group_rows)):
        stats.add_group(x, d)
    return stats


def test_carried_correction_is_the_identity_when_the_streams_agree():
    x = _skewed_inputs(16)
    assert torch.allclose(_paired_stats(x, x).carried_correction, torch.eye(16, dtype=torch.float64), atol=1e-12)


def test_carried_correction_fits_the_dense_outputs_from_the_compressed_inputs():
    # The compressed stream is the dense one seen through an error (a mixing of its features plus
    # noise): W M must reproduce W x_dense from x far better than W itself, and as well as the
    # least-squares map does, up to the ridge that damps the least-visited directions.
    dense = _skewed_inputs(16, count=4096)
    generator = torch.Generator().manual_seed(1)
    mixing = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=generator, dtype=torch.float64)
    seen = dense @ mixing.T + 0.01 * torch.randn(dense.shape, generator=generator, dtype=torch.float64)
    w = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    corrected = w @ _paired_stats(dense, seen).carried_correction
    target = dense @ w.T
    least_squares = torch.linalg.lstsq(seen, target).solution.T

    def error(weight):
        return float((seen @ weight.T - target).norm() / target.norm())

    assert error(corrected) < 0.1 * error(w)
    assert error(corrected) < 3 * error(least_squares)


def test_paired_statistics_need_the_dense_inputs_and_plain_ones_refuse_them():
    x = _skewed_inputs(8, count=64)
    with pytest.raises(RuntimeError, match="paired"):
        InputStats(8, paired=True).add_group(x)
    with pytest.raises(RuntimeError, match="paired"):
        InputStats(8).add_group(x, x)
    with pytest.raises(RuntimeError, match="dense inputs were not collected"):
        _ = input_stats(x).carried_correction


@pytest.mark.parametrize("kwargs", [dict(method="svd"), dict(method="joint"), dict(method="basis", basis_mode="tuned")])
def test_correct_carried_is_refused_where_nothing_is_fitted_on_statistics(kwargs):
    with pytest.raises(RankdownError, match="--correct-carried applies to"):
        CompressConfig(correct_carried=True, **kwargs)


def test_correct_carried_keeps_the_first_site_and_refits_the_later_ones(tiny_model_dir, tmp_path):
    # The first layer's q/k/v read the embeddings in both streams, so their factors cannot change;
    # every later site reads inputs that factored sites before it have changed, and is refitted.
    plain = compress(tiny_model_dir, tmp_path / "plain", CompressConfig(ratio=0.4, **SMALL), progress=quiet)
    fitted = compress(tiny_model_dir, tmp_path / "fitted", CompressConfig(ratio=0.4, correct_carried=True, **SMALL),
                      progress=quiet)
    assert fitted.correct_carried and not plain.correct_carried
    a = load_model(open_checkpoint(tmp_path / "plain")).model.layers
    b = load_model(open_checkpoint(tmp_path / "fitted")).model.layers
    assert torch.allclose(a[0].self_attn.q_proj.up.weight, b[0].self_attn.q_proj.up.weight, atol=1e-5)
    for later in (a[0].mlp.down_proj, b[0].mlp.down_proj), (a[1].self_attn.q_proj, b[1].self_attn.q_proj):
        assert not torch.allclose(later[0].up.weight, later[1].up.weight, atol=1e-3)


def test_a_calibration_folder_named_like_a_task_is_recorded_by_its_path(tiny_model_dir, tmp_path, monkeypatch):
    """compression.json's task is what the export's int4 floor and `validate` read back as a task:
    a calibration folder called `code`, given relative, must not come back as the task code."""
    from rankdown.export.parity import GENERIC_TASKS, parity_tasks
    from rankdown.tasks import Split, load_task

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "notes.txt").write_text("\n\n".join(load_task("prose", Split.TRAIN).texts[:40]))
    monkeypatch.chdir(tmp_path)
    report = compress(tiny_model_dir, tmp_path / "out", CompressConfig(method="svd", ratio=0.3, task=None, calib=Path("code"), **SMALL),
                      progress=quiet)
    assert report.task == str(tmp_path / "code")
    recorded = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert recorded["task"] == str(tmp_path / "code") and parity_tasks(recorded) == GENERIC_TASKS


def test_input_statistics_are_the_second_moment_and_the_pooled_group_covariance():
    """Checked against the float64 definitions, with groups of unequal lengths: each group's products
    are float32 (summed in float64), so they agree to float32's rounding, not to float64's."""
    g = torch.Generator().manual_seed(0)
    groups = [torch.randn(rows, 12, generator=g) * torch.linspace(0.1, 3, 12) + 0.5 for rows in (293, 90, 512)]
    stats = InputStats(12, pooled=True)
    for x in groups:
        stats.add_group(x)
    whole = torch.cat(groups).double()
    torch.testing.assert_close(stats.second_moment, whole.T @ whole / whole.shape[0], rtol=1e-6, atol=1e-6)
    pooled = sum(torch.cov(x.double().T, correction=0) for x in groups) / len(groups)
    torch.testing.assert_close(stats.pooled_covariance, pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.mean, whole.mean(0), rtol=1e-12, atol=1e-12)
    assert stats.second_moment.dtype == stats.pooled_covariance.dtype == torch.float64


def test_pooled_covariance_keeps_its_precision_where_channel_means_dwarf_their_spread():
    """LLM activations have channels whose mean is 100x their spread: the float32 products are taken
    on centred inputs, so the covariance does not come from a float32 cancellation of mean^2."""
    g = torch.Generator().manual_seed(2)
    groups = [torch.randn(1024, 16, generator=g) + torch.linspace(0, 100, 16) for _ in range(3)]
    stats = InputStats(16, pooled=True)
    for x in groups:
        stats.add_group(x)
    pooled = sum(torch.cov(x.double().T, correction=0) for x in groups) / len(groups)
    assert (stats.pooled_covariance - pooled).abs().max() < 1e-5  # uncentred float32 products: about 1e-3
    whole = torch.cat(groups).double()
    torch.testing.assert_close(stats.second_moment, whole.T @ whole / whole.shape[0], rtol=1e-6, atol=1e-6)


def test_input_statistics_keep_float32_products_inside_a_bf16_autocast_forward():
    """Calibration's hooks run inside the forward pass, under bf16 autocast where that is on: the
    statistics' products must not follow it to bfloat16 (they would lose 3 decimal digits)."""
    g = torch.Generator().manual_seed(1)
    groups = [torch.randn(64, 24, generator=g) * torch.linspace(0.1, 30, 24) for _ in range(3)]

    def collected(autocast: bool) -> InputStats:
        stats = InputStats(24, pooled=True, paired=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for x in groups:
                stats.add_group(x, x + 0.01)
        return stats

    plain, under_autocast = collected(False), collected(True)
    assert torch.equal(plain.second_moment, under_autocast.second_moment)
    assert torch.equal(plain.pooled_covariance, under_autocast.pooled_covariance)
    assert torch.equal(plain.carried_correction, under_autocast.carried_correction)


@pytest.mark.parametrize("native", [True, False])
def test_calibration_forward_precision_auto_follows_the_hardware(monkeypatch, native):
    from rankdown.compress import calibration
    from rankdown.compress.config import Precision

    monkeypatch.setattr(calibration, "bf16_native", lambda device: native)
    cpu = torch.device("cpu")
    assert calibration.forward_bf16(Precision.AUTO, cpu) is native
    assert calibration.forward_bf16(Precision.FP32, cpu) is False
    assert calibration.forward_bf16(Precision.BF16, cpu) is True


def test_bf16_calibration_forward_passes_run_the_linears_in_bf16_and_are_recorded(tiny_model_dir, tmp_path, monkeypatch):
    """--calib-precision bf16: every calibration forward's linears give bfloat16 (autocast), the
    statistics and factors stay float32/64, the loss stays close to float32's, and the report says so."""
    import rankdown.compress.calibration as calibration

    seen: set[torch.dtype] = set()
    real_forward = calibration._forward

    def spying(model, layer, chunk, bf16):
        handles = [m.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
                   for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        try:
            return real_forward(model, layer, chunk, bf16)
        finally:
            for h in handles:
                h.remove()

    monkeypatch.setattr(calibration, "_forward", spying)
    reports = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        out = tmp_path / precision
        compress(tiny_model_dir, out, CompressConfig(ratio=0.4, calib_precision=precision, **SMALL), progress=quiet)
        reports[precision] = CompressionReport.read(out)
        assert seen == {torch.float32 if precision == "fp32" else torch.bfloat16}
        assert reports[precision].calib_precision == precision
        stored = {t.dtype for shard in out.glob('*.safetensors') for t in load_file(shard).values()}
        assert stored == {torch.float32}
    fp32, bf16 = reports["fp32"].calibration_loss, reports["bf16"].calibration_loss
    assert fp32 is not None and bf16 is not None and fp32 != bf16 and abs(bf16 - fp32) < 0.02 * fp32


def test_bayes_objective_streamed_by_batch_equals_the_whole_split(tiny_model_dir, monkeypatch):
    """The search's objective is summed batch by batch (its memory is one batch's log-probs, not the
    split's); it must still be the split's perplexity + KL_WEIGHT x mean KL, batches of unequal size too."""
    import math

    import torch.nn.functional as F

    from rankdown.compress import bayesian_ranks
    from rankdown.compress.bayesian_ranks import KL_WEIGHT, _objective, _reference
    from rankdown.compress.units import BATCH

    model = load_model(open_checkpoint(tiny_model_dir)).eval()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (2 * BATCH + 3, 16), generator=g)
    reference = _reference(model, windows)
    assert [r.shape[0] for r in reference] == [BATCH, BATCH, 3]
    dense = torch.cat(reference)

    def whole_split() -> tuple[float, float]:
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=windows).logits.float(), -1)
        nll = -log_probs[:, :-1].gather(-1, windows[:, 1:].unsqueeze(-1)).mean().item()
        return math.exp(nll), (dense.exp() * (dense - log_probs)).sum(-1).mean().item()

    perplexity, kl = whole_split()
    assert abs(kl) < 1e-5  # the dense model against its own reference
    assert _objective(model, windows, reference) == pytest.approx(perplexity, rel=1e-5)
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.mul_(0.5)
    perplexity, kl = whole_split()
    assert kl > 1e-4
    assert _objective(model, windows, reference) == pytest.approx(perplexity + KL_WEIGHT * kl, rel=1e-5)
    # the KL half on its own: at the real weight it is far below the perplexity's rounding
    monkeypatch.setattr(bayesian_ranks, "KL_WEIGHT", 1e6)
    assert (_objective(model, windows, reference) - perplexity) / 1e6 == pytest.approx(kl, rel=1e-3)


def test_weights_int4_is_the_measured_recipe_under_what_is_given():
    from rankdown.compress.config import INT4_HEALING, INT4_RECIPE, HealQuantize, compress_config
    from rankdown.int4_numerics import PER_CHANNEL

    float_cfg = compress_config("float", ratio=0.4)
    assert float_cfg == CompressConfig(ratio=0.4)  # float: the defaults, untouched
    cfg = compress_config("int4", ratio=0.4, task="compare")
    assert cfg.weights.value == "int4"  # recorded, for export --quantize auto
    assert (cfg.rank_multiple, cfg.max_pair_share, cfg.head_rank) == (32, 0.6, 64)
    assert (cfg.healing.quantize, cfg.healing.group_size, cfg.healing.steps) == (HealQuantize.INT4_8DA, PER_CHANNEL, 512)
    assert set(INT4_RECIPE) == {"rank_multiple", "max_pair_share", "head_rank"}
    assert cfg.healing.lr == Healing().lr and cfg.method == CompressConfig.method  # the rest: the defaults
    # a field given wins over the recipe, the rest of the recipe stays
    cfg = compress_config("int4", {"steps": 64}, ratio=0.4, head_rank=None, max_pair_share=0.7)
    assert (cfg.healing.steps, cfg.healing.quantize, cfg.head_rank, cfg.max_pair_share, cfg.rank_multiple) == \
        (64, INT4_HEALING["quantize"], None, 0.7, 32)
    # uniform ranks take no error-rank options: the recipe leaves them out rather than failing
    cfg = compress_config("int4", ratio=0.4, allocate="uniform")
    assert (cfg.rank_multiple, cfg.max_pair_share, cfg.head_rank, cfg.healing.steps) == (1, 1.0, 64, 512)
    with pytest.raises(RankdownError, match="--rank-multiple applies to error ranks"):
        compress_config("int4", ratio=0.4, allocate="uniform", rank_multiple=32)  # given, so still refused
    with pytest.raises(RankdownError, match="--weights must be float or int4, got 'int3'"):
        compress_config("int3", ratio=0.4)


def test_the_command_line_builds_the_int4_recipe(monkeypatch, tmp_path):
    """`compress --weights int4` passes the recipe; an option on the command line wins over it."""
    import rankdown.compress.pipeline as pipeline
    from rankdown.cli import build_parser

    seen: list[CompressConfig] = []

    class Stop(Exception):
        pass

    def fake_compress(model, out, cfg, *args, **kwargs):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(pipeline, "compress", fake_compress)
    for argv in (["--weights", "int4"], ["--weights", "int4", "--heal-steps", "32", "--head-rank", "128"], [],
                 ["--weights", "int4", "--head-rank", "dense"]):
        args = build_parser().parse_args(["compress", str(tmp_path), "-o", str(tmp_path / "o"), "--ratio", "0.4", *argv])
        with pytest.raises(Stop):
            args.func(args)
    recipe, given, plain, dense_head = seen
    assert (recipe.healing.steps, recipe.head_rank, recipe.max_pair_share, recipe.rank_multiple) == (512, 64, 0.6, 32)
    assert recipe.healing.quantize.value == "8da4w"
    assert (given.healing.steps, given.head_rank, given.max_pair_share) == (32, 128, 0.6)
    assert plain == CompressConfig(ratio=0.4, task=plain.task)
    # `--head-rank dense` keeps the head dense under the recipe, which otherwise factors it
    assert (dense_head.head_rank, dense_head.max_pair_share, dense_head.healing.steps) == (None, 0.6, 512)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", str(tmp_path), "-o", str(tmp_path / "o"), "--ratio", "0.4",
                                   "--head-rank", "tall"])


def test_info_says_how_compress_made_a_checkpoint(compressed, tiny_model_dir):
    from rankdown.checkpoint import open_checkpoint
    from rankdown.compress.report_line import made_by
    from rankdown.info import format_info, model_info

    folder, _ = compressed["svd"]
    line = made_by(folder)
    assert line == "compress svd, uniform ranks, task math, up to 2,048 calibration tokens, not healed, for float weights"
    assert f"made by:               {line}" in format_info(model_info(open_checkpoint(folder)), line).splitlines()
    assert made_by(tiny_model_dir) is None  # not compress's output
