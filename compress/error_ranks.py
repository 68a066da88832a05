"""Ranks from measured error: every rank of every unit priced by its truncation loss.

SVD-LLM's truncation loss: after whitening, dropping singular value s_i of W L adds s_i^2 to
the calibration output error, so each unit's error-versus-rank curve is known once its
decomposition exists (``Decomposition.energies``, in each method's own metric). The budget
is then spread over all units of all layers by marginal error per parameter, greedily (the
curves are convex, energies descending, so greedy solves the knapsack that ROCKET solves by
DP, up to the last step). For the data-aware methods the energies are first weighed by the
loss's sensitivity to each output (compress/sensitivity.py: one backward pass of the whole dense
model per micro-batch of a few calibration windows); the methods that can (``output_weighted``:
feature, whiten) then minimize that weighted error itself, in the profile and in the factors, so
the ranks are priced in the metric the factors are fitted in. Then two passes, one layer in memory at a
time: the first streams the dense model over a few calibration windows and keeps only each
unit's vector of energies; the second is the usual streaming pass at the ranks chosen.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from enum import Enum

import torch
import torch.nn.functional as F

from rankdown.checkpoint import read_tensors, skeleton_model
from rankdown.compress.calibration import collect_layer_stats
from rankdown.compress.distributed import Workers, share_vector
from rankdown.compress.methods import MethodSpec
from rankdown.compress.rank_allocation import TOLERANCE, allocate, total_params
from rankdown.compress.rank_job import Progress, RankJob, RankOutcome
from rankdown.compress.sensitivity import output_fisher, unit_output_weights, weighted_energies
from rankdown.compress.streaming import compress_streaming
from rankdown.compress.units import BATCH, Unit, decompose_unit
from rankdown.errors import RankdownError
from rankdown.memory import release_free_memory

SENSITIVITY_WINDOWS = 128  # calibration windows whose gradients weigh each linear's output error
PROFILE_WINDOWS = 128  # calibration windows whose statistics price the ranks (the factors use them all)


class ErrorScale(str, Enum):
    """How one unit's error is made comparable with another's."""

    RELATIVE = "relative"  # tail energy / the unit's total energy: scale-free
    ABSOLUTE = "absolute"  # tail energy as is: SVD-LLM's loss, in each unit's own output units




def error_scale(spec: MethodSpec) -> ErrorScale:
    """Absolute where the energies are output errors on calibration data (whitened: SVD-LLM's loss
    itself; weighed by the loss's sensitivities before they are compared); shares where they are
    data-free weight norms, which say nothing about what a unit's
    outputs weigh against another's. Measured on the shipped model, math, loss on held-back
    calibration windows: whiten 0.6 uniform 1.2297, relative 1.2282, absolute 1.2253; svd 0.6
    uniform 1.9501, relative 1.2385, absolute 1.7924 (both scales helped at 0.4 by less)."""
    return ErrorScale.ABSOLUTE if spec.needs_data else ErrorScale.RELATIVE


def dense_energies(ckpt, spec: MethodSpec, units: list[Unit], windows: torch.Tensor,
                   progress: Progress, workers: Workers, bf16: bool = False,
                   fisher: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor | None]:
    """Each compressible unit's energies, from the dense model's activations, one layer at a time.

    The layer's dense outputs come from the same forward pass that collects its statistics, and
    only the energies (a vector per unit) outlive the layer. With several workers, as in the
    streaming pass: statistics summed over the workers, units spread over them, energies broadcast.

    ``fisher`` (per linear, the loss's sensitivity to each output channel) puts the energies in the
    loss's units: the ``output_weighted`` methods decompose in that metric, the others' energies
    are weighed along their own directions (sensitivity.weighted_energies).
    """
    model = skeleton_model(ckpt)
    model.model.rotary_emb.to(workers.device)
    hidden = None
    if spec.needs_data:
        embed = read_tensors(ckpt, "model.embed_tokens.weight")["model.embed_tokens.weight"].to(workers.device)
        hidden = F.embedding(workers.local_windows(windows).to(workers.device), embed).float()
        del embed
    energies: list[torch.Tensor | None] = [None] * len(units)
    for index, layer in enumerate(model.model.layers):
        start = time.perf_counter()
        prefix = f"model.layers.{index}."
        weights = read_tensors(ckpt, prefix, torch.float32)
        layer.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items()}, assign=True)
        layer.to(workers.device)
        del weights
        stats = None
        if hidden is not None:
            stats, hidden = collect_layer_stats(model, layer, hidden, BATCH, spec.pooled_stats, bf16)
            workers.sum_stats(stats)
        todo = sorted((i for i, u in enumerate(units) if u.layer == index and u.compressible),
                      key=lambda i: -units[i].in_features)
        mine = [(position, i) for position, i in enumerate(todo) if workers.owner(position) == workers.rank]
        for k, (_, i) in enumerate(mine):
            unit = units[i]
            last_of_site = all(units[j].site != unit.site for _, j in mine[k + 1 :])
            site_stats = None if stats is None else (stats.pop(unit.site) if last_of_site else stats[unit.site])
            weighted = fisher is not None and spec.output_weighted
            decomposition = decompose_unit(spec, layer, unit, site_stats, device=workers.device,
                                           output_weights=unit_output_weights(fisher, prefix, unit.members) if weighted else None)
            del site_stats
            energies[i] = decomposition.energies.detach().to(torch.float64).clone()
            if fisher is not None and not weighted:
                # The method's own directions, each energy weighed by the loss along it
                channel_weights = unit_output_weights(fisher, prefix, unit.members, floor=0).to(decomposition.a.device)
                energies[i] = weighted_energies(energies[i], decomposition.output_directions().detach(), channel_weights).cpu()
            del decomposition
        del stats
        for position, i in enumerate(todo):
            shared = share_vector(workers, energies[i], workers.owner(position), torch.float64)
            energies[i] = shared.to("cpu")
        layer.to("meta")
        release_free_memory()
        progress(f"layer {index + 1}/{len(model.model.layers)} profiled in {time.perf_counter() - start:.1f} s")
    return energies


def allocate_by_error(units: list[Unit], energies: list[torch.Tensor | None], ratio: float,
                      scale: ErrorScale, multiple: int = 1) -> list[int | None]:
    """Ranks meeting the budget (1 - ratio) x dense within 1%, by greedy marginal error per parameter.

    Every compressible unit starts at rank ``multiple``; each step buys the next ``multiple`` ranks (or,
    where they would pass the break-even rank, the rest of the unit as dense) whose error removed per
    parameter is largest, while it fits. So every factored rank is a multiple of ``multiple``: with the
    int4 group (32), no rank is padded with zeros at export (each padded rank costs its 4-bit weights).
    A unit whose break-even rank is below ``multiple`` stays dense.
    """
    dense = sum(u.dense_params for u in units)
    target = (1 - ratio) * dense
    share = min((u.pair_share for u in units), default=1.0)
    capped = f" and pairs capped at {share:g} of their dense parameters (raise --max-pair-share)" if share < 1 else ""
    ranks: list[int | None] = [multiple if u.compressible and u.max_saving_rank >= multiple else None for u in units]
    kept = total_params(units, ranks)
    if kept > target:
        raise RankdownError(f"ratio {ratio} is out of reach: with the smallest ranks{capped}, at most "
                            f"{1 - kept / dense:.1%} of the decoder-linear parameters can be removed")
    profiles: dict[int, torch.Tensor] = {}
    for i, (unit, rank) in enumerate(zip(units, ranks)):
        if rank is None:
            continue
        profile = energies[i]
        if profile is None or profile.numel() < unit.max_saving_rank:
            raise ValueError(f"unit {i} ({unit.names()[0]}): no error profile up to rank {unit.max_saving_rank}")
        profile = profile.to(torch.float64).clamp_min(0)
        total = float(profile.sum())
        profiles[i] = profile / total if scale is ErrorScale.RELATIVE and total > 0 else profile

    heap: list[tuple[float, int, int]] = []

    def offer(i: int) -> None:
        rank = ranks[i]
        assert rank is not None
        unit = units[i]
        if rank + multiple <= unit.max_saving_rank:
            gain = float(profiles[i][rank:rank + multiple].sum())
            cost = unit.params(rank + multiple) - unit.params(rank)
        else:  # past break-even a factor pair costs more than the dense linear: the next step is dense
            gain, cost = float(profiles[i][rank:].sum()), unit.dense_params - unit.params(rank)
        heapq.heappush(heap, (-gain / cost, i, cost))

    for i in profiles:
        offer(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if kept + cost > target:
            continue  # this unit's next step does not fit, and its later steps cost as much or more
        kept += cost
        rank = ranks[i]
        assert rank is not None
        if rank + multiple <= units[i].max_saving_rank:
            ranks[i] = rank + multiple
            offer(i)
        else:
            ranks[i] = None
    if target - kept > TOLERANCE * target:
        raise RankdownError(f"ratio {ratio}: could only reach {1 - kept / dense:.4f} with ranks in steps of {multiple}{capped}")
    return ranks


def predicted_error(energies: list[torch.Tensor | None], ranks: list[int | None], scale: ErrorScale) -> float:
    """The summed truncation loss of ``ranks`` under ``scale`` (what the allocation minimizes)."""
    error = 0.0
    for profile, rank in zip(energies, ranks):
        if rank is None or profile is None:
            continue
        total = float(profile.sum())
        tail = float(profile[rank:].sum())
        error += tail / total if scale is ErrorScale.RELATIVE and total > 0 else tail
    return error


def keep_shares(units: list[Unit], ranks: list[int | None]) -> dict[str, float]:
    """Kept parameters per kind, as a share of the kind's dense parameters."""
    shares = {}
    for kind in sorted({u.kind for u in units if u.compressible}):
        members = [(u, r) for u, r in zip(units, ranks) if u.kind == kind]
        shares[kind] = round(sum(u.params(r) for u, r in members) / sum(u.dense_params for u, _ in members), 4)
    return shares


def choose(job: RankJob) -> RankOutcome:
    scale = error_scale(job.method)
    # At least a batch per worker (local_windows refuses fewer)
    least = BATCH * job.workers.world_size
    fisher = None
    if scale is ErrorScale.ABSOLUTE:
        fisher = output_fisher(job.ckpt, job.units, job.windows[:max(SENSITIVITY_WINDOWS, least)], job.cfg.calib_precision,
                               job.workers, job.progress)
    energies = dense_energies(job.ckpt, job.method, job.units, job.windows[:max(PROFILE_WINDOWS, least)], job.progress,
                              job.workers, job.bf16_forwards, fisher)
    ranks = allocate_by_error(job.units, energies, job.cfg.ratio, scale, job.cfg.rank_multiple)
    # The reference is plain uniform ranks: under --max-pair-share uniform ranks may have no way to meet
    # the budget (every unit capped, or dense), and a reference figure must not fail the run.
    uniform = allocate([dataclasses.replace(u, pair_share=1.0) for u in job.units], job.cfg.ratio)
    chosen, flat = (predicted_error(energies, r, scale) for r in (ranks, uniform))
    job.progress(f"error allocation ({scale.value} error): predicted truncation loss {chosen:.4g} "
                 f"(uniform ranks: {flat:.4g})")
    model, loss = compress_streaming(job.ckpt, job.method, job.units, ranks, job.windows, job.writer, job.progress, job.workers,
                                     correct_carried=job.cfg.correct_carried, bf16=job.bf16_forwards,
                                     fisher=fisher if job.method.output_weighted else None)
    check: dict[str, int | float | str] = {"error_scale": scale.value, "predicted_error": float(f"{chosen:.6g}"),
                                           "uniform_predicted_error": float(f"{flat:.6g}"),
                                           "loss_weighted_factors": int(fisher is not None and job.method.output_weighted),
                                           "rank_multiple": job.cfg.rank_multiple,
                                           "max_pair_share": job.cfg.max_pair_share}
    return RankOutcome(model, ranks, loss, keep_shares(job.units, ranks), check)
