"""How much the model's loss cares about each output channel of each linear: a diagonal Fisher.

A truncation that leaves error e on a linear's outputs raises the next-token loss by about
1/2 E[e^T F e] (second order around the dense model, with the Fisher F = E[g g^T] of the
gradient g of the loss with respect to that output). Output errors of different linears are
not in one currency without it: an error on q or k passes through a softmax, one on down_proj
lands on the residual stream, and one in an early layer travels through every layer after it.
Only the diagonal is kept (a vector per linear): one backward pass of the dense model per
calibration batch, gradients taken with respect to the activations, none to the weights.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from rankdown.checkpoint import Checkpoint, load_model
from rankdown.compress.calibration import forward_bf16
from rankdown.compress.config import Precision
from rankdown.compress.distributed import Workers
from rankdown.compress.healing import backward_memory
from rankdown.compress.rank_job import Progress
from rankdown.compress.training_attention import float32_attention
from rankdown.compress.units import Unit
from rankdown.memory import release_free_memory, rss_mb

# Each channel's weight lifted by this share of its unit's mean. Measured on SmolLM2, code, 20%
# removed, unhealed, loss on held-back training windows: 0.01 gives 3.2869, 1 gives 3.3005.
FLOOR = 0.01
MICRO_BATCH = 4  # windows per backward pass: its activations are the pass's memory (healing's micro-batch)


def output_fisher(ckpt: Checkpoint, units: list[Unit], windows: torch.Tensor, precision: Precision,
                  workers: Workers, progress: Progress) -> dict[str, torch.Tensor]:
    """Per compressible linear (full name), the mean over calibration tokens of the squared gradient
    of the summed next-token loss with respect to each of its outputs (float64, one per channel).
    The whole dense model is held, where the dense model's healing targets are computed (the CPU),
    under bf16 autocast where ``precision`` says so for that device. Several workers share the
    windows and sum what they measured, so every worker gets the same sensitivities."""
    start = time.perf_counter()
    model = load_model(ckpt)
    device = next(model.parameters()).device
    bf16 = forward_bf16(precision, device)
    windows = workers.local_windows(windows)
    model.requires_grad_(False)
    wanted = {f"model.layers.{u.layer}.{m}" for u in units if u.compressible for m in u.members}
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(module, inputs, output):
            def add(grad: torch.Tensor) -> None:
                squared = grad.float().pow(2).sum(dim=tuple(range(grad.dim() - 1))).double()
                sums[name] = squared if name not in sums else sums[name] + squared
            output.register_hook(add)
        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name in wanted]
    tokens = 0
    try:
        with float32_attention(model, enabled=bf16 and device.type == "cpu"):
            for chunk in windows.split(MICRO_BATCH):
                chunk = chunk.to(device)
                embeds = model.model.embed_tokens(chunk).detach().requires_grad_()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
                # Summed, not averaged: each token's gradient is then that of its own loss's share.
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                tokens += chunk[:, 1:].numel()  # the positions whose next token is scored
                del logits, loss, embeds
    finally:
        for handle in handles:
            handle.remove()
    widths = {name: module.out_features for name, module in model.named_modules() if name in wanted}
    del model
    release_free_memory()
    fisher = {}
    count = float(workers.sum_(torch.tensor([tokens], dtype=torch.float64, device=workers.device)).item())
    for name in sorted(wanted):  # every worker reduces the same tensors in the same order
        total = sums.get(name, torch.zeros(widths[name], dtype=torch.float64))
        fisher[name] = workers.sum_(total.to(workers.device)).cpu() / count
    progress(f"error allocation: output sensitivities of {len(fisher)} linears from {windows.shape[0]} windows "
             f"in {time.perf_counter() - start:.1f} s (RSS {rss_mb():.0f} MB)")
    return fisher


def unit_output_weights(fisher: dict[str, torch.Tensor], prefix: str, members: tuple[str, ...] | list[str],
                        floor: float = FLOOR) -> torch.Tensor:
    """The output weights of one unit (its members' Fisher, stacked) for a method that weighs its
    output error, each channel lifted by ``floor`` x the unit's mean: a channel whose gradient was
    zero on the calibration windows is not certain to be free, and a zero weight would leave its
    up factor unbounded (B = D^-1/2 P)."""
    stacked = torch.cat([fisher[f"{prefix}{member}"] for member in members]).to(torch.float64)
    return stacked + floor * stacked.mean().clamp_min(1e-30)


def sensitivity_memory(config, seq_len: int) -> int:
    """Bytes one backward pass keeps beyond the dense model."""
    return backward_memory(config, seq_len, MICRO_BATCH)


def weighted_energies(energies: torch.Tensor, directions: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """Each energy times the Fisher weight of the output direction its loss lies along:
    dropping direction i (unit column d_i of ``directions``, m x R) leaves error variance
    energies[i] along d_i, which costs energies[i] x d_i^T diag(F) d_i."""
    squared = directions[:, : energies.numel()].to(torch.float64).pow(2)
    weight = (fisher.to(torch.float64)[:, None] * squared).sum(0) / squared.sum(0).clamp_min(1e-30)
    return nonincreasing(energies.to(torch.float64) * weight)


def nonincreasing(profile: torch.Tensor) -> torch.Tensor:
    """The profile with each run that rises replaced by its mean (pool adjacent violators): the
    marginal gains of the error curve's convex hull, so that the greedy allocation stays exact at
    the hull's ranks. Weighting breaks the method's own descending order where a weak direction
    lies along outputs the loss cares more about."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in profile.tolist():
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return torch.cat([torch.full((int(count),), total / count, dtype=torch.float64) for total, count in blocks])
