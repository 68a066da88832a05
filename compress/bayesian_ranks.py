"""Bayesian-optimized ranks (seed 002): a Gaussian-process search over per-kind keep shares.

Every unit is decomposed once, from the dense model's activations (as the authors' code
does); a trial only re-truncates those cached factors. A trial proposes a weight per kind
(q/k together, o, gate, up, down, and v where the method compresses it); the weights are
scaled jointly onto the parameter budget, so every trial meets it. Objective: perplexity
on held-back calibration windows + 1e-3 x mean KL(dense || compressed). The first trial
is the uniform allocation, so the search can only improve on it by its own objective.
The final factors are then computed by the streaming path (activations through the
compressed layers), which can change the outcome: so the chosen ranks are re-judged against
uniform with those final factors, on windows the search never saw, and the better are kept.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from rankdown.checkpoint import load_model
from rankdown.compress.calibration import collect_layer_stats, forward_bf16, held_back, layer_inputs
from rankdown.compress.config import CompressConfig
from rankdown.compress.methods import MethodSpec
from rankdown.compress.rank_allocation import allocate
from rankdown.compress.rank_job import RankJob, RankOutcome
from rankdown.compress.streaming import compress_streaming
from rankdown.compress.units import BATCH, Unit, decompose_unit, factor_modules, set_unit

KL_WEIGHT = 1e-3
WEIGHT_RANGE = (0.3, 1.0)
MIN_WINDOWS = 6  # the check holds back 2, and the search holds back 2 of the 4 it fits on


@torch.no_grad()
def _reference(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """The dense model's log-probs, one tensor per forward batch (each BATCH x T x vocab)."""
    return [F.log_softmax(model(input_ids=windows[i : i + BATCH]).logits.float(), -1)
            for i in range(0, windows.shape[0], BATCH)]


@torch.no_grad()
def _objective(model, windows: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Perplexity + KL_WEIGHT x mean KL(dense || model), summed batch by batch: the whole split's
    log-probs at once, with the KL's temporaries beside them, were four or five copies of the
    reference (2.4 GB each for SmolLM2's 96 windows) and most of the 13.7 GB the search peaked at."""
    nll = kl = 0.0
    predicted = positions = 0
    for start, dense in zip(range(0, windows.shape[0], BATCH), reference):
        chunk = windows[start : start + BATCH]
        log_probs = F.log_softmax(model(input_ids=chunk).logits.float(), -1)
        targets = chunk[:, 1:]
        nll -= log_probs[:, :-1].gather(-1, targets.unsqueeze(-1)).sum().item()
        predicted += targets.numel()
        kl += (dense.exp() * (dense - log_probs)).sum().item()
        positions += chunk.numel()
    return math.exp(nll / predicted) + KL_WEIGHT * kl / positions


def compress_with_bayes(model, spec: MethodSpec, units: list[Unit], windows: torch.Tensor, cfg: CompressConfig,
                        progress) -> tuple[list[int | None], dict[str, float]]:
    # Imported here, not with the module: the registry imports every strategy, and only bayes
    # needs optuna (seconds to import, and memory a streaming run would carry to its peak).
    import optuna

    fit_windows, eval_windows = held_back(windows, MIN_WINDOWS - 2, f"{cfg.source}: bayes allocation")
    reference = _reference(model, eval_windows)
    layers = model.model.layers
    dense = {(u.layer, m): layers[u.layer].get_submodule(m) for u in units for m in u.members}
    cache = {}
    hidden = layer_inputs(model, fit_windows) if spec.needs_data else None
    bf16 = forward_bf16(cfg.calib_precision, next(model.parameters()).device)
    for index, layer in enumerate(layers):
        start = time.perf_counter()
        stats = None
        if spec.needs_data:
            stats, hidden = collect_layer_stats(model, layer, hidden, BATCH, spec.pooled_stats, bf16)
        for i, unit in enumerate(units):
            if unit.layer == index and unit.compressible:
                cache[i] = decompose_unit(spec, layer, unit, None if stats is None else stats[unit.site])
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
    # optuna imports optional packages (greenlet, redis) on first use and keeps each ImportError with
    # its traceback, which holds every frame above that import, this one included, for the life of the
    # process: on SmolLM2 the reference log-probs, the cached decompositions and the dense model, 5 GB
    # held through healing. So this frame lets go of them before it returns.
    reference.clear()
    cache.clear()
    dense.clear()
    del hidden
    model = layers = None
    return ranks, keep


def _check_against_uniform(job: RankJob, ranks: list[int | None], windows: torch.Tensor,
                           check: torch.Tensor) -> tuple[list[int | None], dict[str, int | float | str]]:
    """Bayesian trials score cached factors from dense activations; the final factors are streamed.

    So the winner is re-judged as it will be built: both it and the uniform ranks are built by
    the streaming pass from the search's windows and scored on ``check`` windows, which the
    search never saw (and never the evaluation split); the uniform ranks are kept if they score
    at least as well.
    """
    uniform = allocate(job.units, job.cfg.ratio)
    if ranks == uniform:
        return ranks, {"kept": "uniform", "note": "the search chose the uniform ranks"}
    def quiet(_message: str) -> None:
        pass
    losses = {name: compress_streaming(job.ckpt, job.method, job.units, r, windows, None, quiet, job.workers, scored=check,
                                       bf16=job.bf16_forwards)[1]
              for name, r in (("bayes", ranks), ("uniform", uniform))}
    kept = "bayes" if losses["bayes"] < losses["uniform"] else "uniform"
    job.progress(f"check of the final factors on {check.shape[0]} unseen windows: loss bayes {losses['bayes']:.4f}, "
                 f"uniform {losses['uniform']:.4f}: keeping the {kept} ranks")
    return (ranks if kept == "bayes" else uniform), {"kept": kept, "bayes_loss": round(losses["bayes"], 5),
                                                      "uniform_loss": round(losses["uniform"], 5),
                                                      "check_windows": int(check.shape[0])}


def choose(job: RankJob) -> RankOutcome:
    """Search on the calibration windows but the last quarter, check on that quarter, then stream.

    The check's windows are not the task's training split: the shipped model was trained on it,
    and its loss there ranked the candidates the other way round from held-out text (whiten at
    0.6: bayes lower on training windows, higher perplexity on evaluation).
    """
    search, unseen = held_back(job.windows, MIN_WINDOWS, f"{job.cfg.source}: bayes allocation")
    dense = load_model(job.ckpt)
    ranks, keep_ratios = compress_with_bayes(dense, job.method, job.units, search, job.cfg, job.progress)
    del dense  # never the dense model and a compressed one at once: the final pass streams
    ranks, check = _check_against_uniform(job, ranks, search, unseen)
    model, loss = compress_streaming(job.ckpt, job.method, job.units, ranks, job.windows, job.writer, job.progress, job.workers,
                                     correct_carried=job.cfg.correct_carried, bf16=job.bf16_forwards)
    return RankOutcome(model, ranks, loss, keep_ratios, check)
