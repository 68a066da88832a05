"""The streaming pass: a decoder layer at a time from the checkpoint, through the compressed layers.

Only one layer's weights, activations and statistics are held at once; the dense model and its
compressed copy are never in memory together.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from rankdown.checkpoint import read_tensors, skeleton_model
from rankdown.compress.calibration import collect_layer_stats, collect_paired_stats, run_layer
from rankdown.compress.decomposition import Factors
from rankdown.compress.distributed import Workers, share_factors
from rankdown.compress.methods import MethodSpec
from rankdown.compress.rank_job import Progress, WeightSink
from rankdown.compress.sensitivity import unit_output_weights
from rankdown.compress.units import BATCH, SITES, Unit, decompose_unit, modules_from_factors, set_unit, unit_factors
from rankdown.memory import peak_rss_mb, release_free_memory, rss_mb

HEAD_SLICE = 16384  # vocabulary rows of the head upcast at once for the calibration loss
TOKEN_CHUNK = 1024  # tokens whose logits over one slice are held at once


def streamed_loss_sum(hidden: torch.Tensor, windows: torch.Tensor, norm: nn.Module, head: torch.Tensor) -> tuple[float, int]:
    """Summed next-token loss and the number of tokens, from the last layer's outputs with the
    head's vocabulary in slices (log-sum-exp accumulated per token), so that neither the full
    logits nor an fp32 copy of the head are ever held: at a 128k vocabulary either would be
    gigabytes. Sums, so that workers holding different windows add theirs up exactly."""
    device = hidden.device
    with torch.no_grad():
        h = torch.cat([norm(hidden[i : i + BATCH, :-1]).reshape(-1, hidden.shape[-1])
                       for i in range(0, hidden.shape[0], BATCH)])
        targets = windows[:, 1:].reshape(-1).to(device)
        log_sum = torch.full((h.shape[0],), -torch.inf, dtype=torch.float64, device=device)
        picked = torch.zeros(h.shape[0], dtype=torch.float64, device=device)
        for first in range(0, head.shape[0], HEAD_SLICE):
            rows = head[first : first + HEAD_SLICE].to(device=device, dtype=torch.float32)
            for t in range(0, h.shape[0], TOKEN_CHUNK):
                logits = h[t : t + TOKEN_CHUNK] @ rows.T
                chunk = slice(t, t + TOKEN_CHUNK)
                log_sum[chunk] = torch.logaddexp(log_sum[chunk], torch.logsumexp(logits, -1).double())
                local = targets[chunk] - first
                inside = (local >= 0) & (local < rows.shape[0])
                picked[chunk][inside] = logits[inside, local[inside]].double()
    return (log_sum - picked).sum().item(), h.shape[0]


def streamed_loss(hidden: torch.Tensor, windows: torch.Tensor, norm: nn.Module, head: torch.Tensor) -> float:
    """Mean next-token loss (``streamed_loss_sum`` over its token count)."""
    total, tokens = streamed_loss_sum(hidden, windows, norm, head)
    return total / tokens


def _factor_units(spec: MethodSpec, ckpt, layer: nn.Module, index: int, units: list[tuple[Unit, int]],
                  stats: dict | None, workers: Workers, device: torch.device,
                  fisher: dict[str, torch.Tensor] | None = None) -> None:
    """Factor ``units`` (of decoder layer ``index``) from ``stats`` and put their pairs in ``layer``;
    with several workers each factors its share and the factors are broadcast. ``fisher``: each
    linear's output sensitivities, weighing the error the method minimizes."""
    prefix = f"model.layers.{index}."
    # Widest input first: its n x n statistics (512 MiB at n = 8192) are freed before the
    # other units' decompositions allocate their own working memory.
    todo = sorted(units, key=lambda pair: -pair[0].in_features)
    # No forward pass runs until these units are factored, so the dense weights to be replaced
    # are dropped now and each unit re-reads its own from the checkpoint when its turn comes.
    for unit, _ in todo:
        for member in unit.members:
            layer.get_submodule(member).to("meta")
    release_free_memory()  # the forward pass's activations and those weights
    mine = [(position, unit, rank) for position, (unit, rank) in enumerate(todo)
            if workers.owner(position) == workers.rank]
    built: dict[int, Factors] = {}
    for i, (position, unit, rank) in enumerate(mine):
        last_of_site = all(u.site != unit.site for _, u, _ in mine[i + 1 :])
        stored: dict[str, torch.Tensor] = {}
        for member in unit.members:
            stored |= {k.removeprefix(prefix): v for k, v in read_tensors(ckpt, f"{prefix}{member}.").items()}
        # The site's last unit takes its statistics along (no name here holds them), so a
        # method can free them mid-way: C (512 MiB at n = 8192) before the SVD of W L.
        decomposition = decompose_unit(spec, layer, unit, None if stats is None else
                                       (stats.pop(unit.site) if last_of_site else stats[unit.site]),
                                       stored, device,
                                       None if fisher is None else unit_output_weights(fisher, prefix, unit.members))
        del stored
        built[position] = unit_factors(decomposition, unit, rank, torch.float32)
        del decomposition
    del stats
    for position, (unit, _) in enumerate(todo):
        factors = share_factors(workers, built.pop(position, None), unit, workers.owner(position), torch.float32)
        set_unit(layer, unit, modules_from_factors(unit, factors))


def compress_streaming(ckpt, spec: MethodSpec, units: list[Unit], ranks: list[int | None], windows: torch.Tensor,
                        writer: WeightSink | None, progress: Progress, workers: Workers,
                        scored: torch.Tensor | None = None, correct_carried: bool = False,
                        bf16: bool = False, fisher: dict[str, torch.Tensor] | None = None) -> tuple[LlamaForCausalLM, float]:
    """Layer by layer from the checkpoint: read one layer's weights, collect its statistics from the
    compressed layers' outputs, factor it, write it (unless ``writer`` is None), free it. Returns the
    model's skeleton (factor pairs in place, weights on meta) and the next-token loss on ``scored``
    windows (default: the calibration windows themselves).

    With several workers each pushes its own share of the windows, the statistics are summed over
    the workers before any is read, each unit is factored by one worker and its factors broadcast,
    and the loss is summed over every worker's tokens (compress/distributed.py).

    ``correct_carried``: the dense model's hidden states are carried beside the compressed ones
    (one more activation stream, and a dense copy of the one layer in hand), and each site's statistics
    pair its compressed inputs with its dense ones, so that each unit is fitted to the dense
    outputs (calibration.InputStats.carried_correction).

    ``bf16``: the layers' forward passes under bfloat16 autocast (calibration.forward_bf16).

    ``fisher``: per linear (full name), the loss's sensitivity to each output channel
    (compress/sensitivity.py); the method then minimizes the output error weighted by it."""
    device = workers.device
    model = skeleton_model(ckpt)
    model.model.rotary_emb.to(device)
    layers = model.model.layers
    windows = workers.local_windows(windows).to(device)
    scored = None if scored is None else workers.local_windows(scored).to(device)
    embed = read_tensors(ckpt, "model.embed_tokens.weight")["model.embed_tokens.weight"].to(device)
    hidden = F.embedding(windows, embed).float()
    scored_hidden = None if scored is None else F.embedding(scored, embed).float()
    dense_hidden = hidden.clone() if correct_carried and spec.needs_data else None
    del embed
    release_free_memory()
    for index, layer in enumerate(layers):
        start, reduced, broadcast = time.perf_counter(), workers.reduced_bytes, workers.broadcast_bytes
        prefix = f"model.layers.{index}."
        weights = read_tensors(ckpt, prefix, torch.float32)
        layer.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items()}, assign=True)
        layer.to(device)
        del weights
        todo = [(unit, rank) for unit, rank in zip(units, ranks) if unit.layer == index and rank is not None]
        if dense_hidden is None:
            stats = None
            if spec.needs_data:
                stats = collect_layer_stats(model, layer, hidden, BATCH, spec.pooled_stats, bf16)[0]
                workers.sum_stats(stats)
            _factor_units(spec, ckpt, layer, index, todo, stats, workers, device, fisher)
        else:
            # Site by site in forward order, each fitted to the inputs the sites before it (already
            # factored) give it; the dense copy of this one layer computes the dense stream.
            dense_layer = copy.deepcopy(layer)
            for site in SITES:
                site_todo = [(unit, rank) for unit, rank in todo if unit.site == site]
                if site_todo:
                    stats = collect_paired_stats(model, layer, dense_layer, hidden, dense_hidden, site, BATCH,
                                                 spec.pooled_stats, bf16)
                    workers.sum_stats(stats)
                    _factor_units(spec, ckpt, layer, index, site_todo, stats, workers, device, fisher)
            dense_hidden = run_layer(model, dense_layer, dense_hidden, BATCH, bf16=bf16)
            del dense_layer
        hidden = run_layer(model, layer, hidden, BATCH, bf16=bf16)
        if scored_hidden is not None:
            scored_hidden = run_layer(model, layer, scored_hidden, BATCH, bf16=bf16)
        if writer is not None:
            writer.add({prefix + k: v.to("cpu") for k, v in layer.state_dict().items()})
        layer.to("meta")
        release_free_memory()
        shared = "" if workers.world_size == 1 else (
            f"; {(workers.reduced_bytes - reduced) / 2**20:.1f} MiB all-reduced, "
            f"{(workers.broadcast_bytes - broadcast) / 2**20:.1f} MiB broadcast by worker 0")
        progress(f"layer {index + 1}/{len(layers)} compressed in {time.perf_counter() - start:.1f} s "
                 f"(RSS {rss_mb():.0f} MB, peak {peak_rss_mb():.0f} MB{shared})")
    rest = read_tensors(ckpt, "model.norm.") | read_tensors(ckpt, "model.embed_tokens.") | read_tensors(ckpt, "lm_head.")
    head = rest.get("lm_head.weight", rest["model.embed_tokens.weight"])
    norm = model.model.norm
    norm.load_state_dict({"weight": rest["model.norm.weight"].float()}, assign=True)
    norm.to(device)
    if scored is None or scored_hidden is None:
        total, tokens = streamed_loss_sum(hidden, windows, norm, head)
    else:
        total, tokens = streamed_loss_sum(scored_hidden, scored, norm, head)
    summed = workers.sum_(torch.tensor([total, tokens], dtype=torch.float64, device=device))
    if writer is not None:
        writer.add(rest)
    del rest, head
    return model, float(summed[0] / summed[1])
