"""Bayesian-optimized ranks (seed 002): a Gaussian-process search over per-kind keep shares.

Every unit is decomposed once, from the dense model's activations (as the authors' code
does); a trial only re-truncates those cached factors. A trial proposes a weight per kind
(q/k together, o, gate, up, down, and v where the method compresses it); the weights are
scaled jointly onto the parameter budget, so every trial meets it. Objective: perplexity
on held-back calibration windows + 1e-3 x mean KL(dense || compressed). The first trial
is the uniform allocation, so the search can only improve on it by its own objective.
The chosen ranks are returned; the final factors are then computed by the streaming path
(activations through the compressed layers), which can change the outcome: the pipeline
re-judges the chosen ranks against uniform with those final factors and keeps the better.
"""

from __future__ import annotations

import math
import time

import optuna
import torch
import torch.nn.functional as F

from rankdown.compress.calibration import collect_layer_stats, layer_inputs
from rankdown.compress.config import CompressConfig
from rankdown.compress.methods import MethodSpec
from rankdown.compress.rank_allocation import Unit, allocate
from rankdown.errors import RankdownError

KL_WEIGHT = 1e-3
WEIGHT_RANGE = (0.3, 1.0)
BATCH = 8


@torch.no_grad()
def _log_probs(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.log_softmax(model(input_ids=windows[i : i + BATCH]).logits.float(), -1)
                      for i in range(0, windows.shape[0], BATCH)])


@torch.no_grad()
def _objective(model, windows: torch.Tensor, reference: torch.Tensor) -> float:
    log_probs = _log_probs(model, windows)
    targets = windows[:, 1:]
    nll = -log_probs[:, :-1].gather(-1, targets.unsqueeze(-1)).mean().item()
    kl = (reference.exp() * (reference - log_probs)).sum(-1).mean().item()
    return math.exp(nll) + KL_WEIGHT * kl


def split_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The search's fit windows and its held-back windows (the last quarter)."""
    if windows.shape[0] < 4:
        raise RankdownError("bayes allocation needs at least 4 calibration windows (give more data)")
    held = max(2, windows.shape[0] // 4)
    return windows[:-held], windows[-held:]


def compress_with_bayes(model, spec: MethodSpec, units: list[Unit], windows: torch.Tensor, cfg: CompressConfig,
                        progress) -> tuple[list[int | None], dict[str, float]]:
    from rankdown.compress.pipeline import decompose_unit, factor_modules, set_unit

    fit_windows, eval_windows = split_windows(windows)
    reference = _log_probs(model, eval_windows)
    layers = model.model.layers
    dense = {(u.layer, m): layers[u.layer].get_submodule(m) for u in units for m in u.members}
    cache = {}
    hidden = layer_inputs(model, fit_windows) if spec.needs_data else None
    for index, layer in enumerate(layers):
        start = time.perf_counter()
        stats = None
        if spec.needs_data:
            stats, hidden = collect_layer_stats(model, layer, hidden, BATCH, spec.pooled_stats)
        for i, unit in enumerate(units):
            if unit.layer == index and unit.compressible:
                cache[i] = decompose_unit(spec, layer, unit, None if stats is None else stats[unit.site],
                                         f"model.layers.{index}")
        progress(f"layer {index + 1}/{len(layers)} decomposed in {time.perf_counter() - start:.1f} s")

    def apply(ranks: list[int | None]) -> None:
        for i, (unit, rank) in enumerate(zip(units, ranks)):
            layer = layers[unit.layer]
            if rank is None:
                set_unit(layer, unit, [dense[(unit.layer, m)] for m in unit.members])
            else:
                set_unit(layer, unit, factor_modules(cache[i], unit, rank, torch.float32))

    kinds = sorted({u.kind for u in units if u.compressible})

    def objective(trial: optuna.Trial) -> float:
        weights = {k: trial.suggest_float(k, *WEIGHT_RANGE) for k in kinds}
        ranks = allocate(units, cfg.ratio, weights)
        apply(ranks)
        value = _objective(model, eval_windows, reference)
        progress(f"trial {trial.number + 1}/{cfg.trials}: objective {value:.4f} "
                 f"({', '.join(f'{k}={w:.2f}' for k, w in weights.items())})")
        return value

    sampler = optuna.samplers.GPSampler(seed=cfg.seed, n_startup_trials=min(10, max(1, cfg.trials // 3)),
                                       deterministic_objective=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.enqueue_trial({k: WEIGHT_RANGE[1] for k in kinds})  # the uniform allocation
    study.optimize(objective, n_trials=cfg.trials)
    best = {k: float(study.best_params[k]) for k in kinds}
    ranks = allocate(units, cfg.ratio, best)
    apply([None] * len(units))  # back to dense: the caller builds the final model by streaming
    progress(f"best of {cfg.trials} trials: objective {study.best_value:.4f} (uniform: {study.trials[0].value:.4f})")
    keep = {}
    for kind in kinds:
        members = [(u, r) for u, r in zip(units, ranks) if u.kind == kind]
        keep[kind] = round(sum(u.params(r) for u, r in members) / sum(u.dense_params for u, _ in members), 4)
    return ranks, keep
