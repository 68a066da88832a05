"""Task-specific basis selection, tuned mode (seed 001, "Basel" as its authors run it).

Every decoder linear becomes W = U diag(c) V^T + B_new A_new: U, V are W's singular
vectors (frozen), the coefficients c (started at the singular values) and a few new bases
(LoRA-style, B_new = 0) are trained on the task's training split with next-token loss plus
distillation from the dense model, KL(dense || tuned), so that what the dense model does
well on the task (its answers, not only the text's statistics) is what the bases keep.
At evenly spaced steps the bases whose share of their linear's output energy on the task,
c_i^2 E[(v_i^T x)^2], is smallest are pruned for good: each linear keeps the same fraction
of its energy (the paper's "keep K^(1/T) of the coefficients' sum", with the fraction set
so that the parameter count reaches that step's target, geometric down to the budget).
Pruned bases never return; the last steps recover. Ranks per linear are an outcome.
The pool starts from the task's bases: those of the whitened SVD on the task's calibration
inputs, the strongest first, capped so that every linear ends as a factor pair that saves
parameters. (On the shipped model at ratio 0.4, pruning from these bases with no training at
all kept math exact match at 98.2%; plain SVD bases scored by s_i^2 v_i^T C v_i, as closed-form
mode selects them, ended at 87.5% after 120 steps of training.)
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from rankdown.checkpoint import load_model
from rankdown.compress.calibration import collect_layer_stats, layer_inputs
from rankdown.compress.config import BasisTuning
from rankdown.compress.decomposition import balanced_pair, balanced_svd
from rankdown.compress.rank_allocation import total_params
from rankdown.compress.rank_job import RankJob, RankOutcome
from rankdown.compress.training_data import mean_loss, training_windows
from rankdown.compress.units import BATCH, Unit, set_unit
from rankdown.compress.whitening import cholesky_factor
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear
from rankdown.memory import peak_rss_mb

NEW_BASES_SHARE = 1 / 32  # new bases per linear, of min(m, n) (the authors add 32 to 4096-wide Llama 2)


class TunableBasisLinear(nn.Module):
    """y = ((x V) * s * g) U^T + (x A_new^T) B_new^T + bias, tracking each basis's output energy.

    U has orthonormal columns; V need not (whitened bases), so energy is measured, not assumed."""

    u: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    bias: torch.Tensor | None
    energy: torch.Tensor

    def __init__(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, new_bases: int,
                 bias: torch.Tensor | None, generator: torch.Generator):
        super().__init__()
        m, n = u.shape[0], v.shape[0]
        self.register_buffer("u", u.float().contiguous())
        self.register_buffer("v", v.float().contiguous())
        self.register_buffer("s", s.float().clone())
        self.register_buffer("bias", None if bias is None else bias.float().clone())
        self.g = nn.Parameter(torch.ones_like(self.s))
        self.a_new = nn.Parameter(torch.randn(new_bases, n, generator=generator) / math.sqrt(n))
        self.b_new = nn.Parameter(torch.zeros(m, new_bases))
        self.register_buffer("energy", torch.zeros_like(self.s, dtype=torch.float64))
        self.tokens = 0

    @property
    def coefficients(self) -> torch.Tensor:
        return self.s * self.g

    @property
    def rank(self) -> int:
        return self.s.numel() + self.a_new.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.v
        if self.training:
            self.energy += z.detach().pow(2).reshape(-1, z.shape[-1]).sum(0, dtype=torch.float64)
            self.tokens += z.numel() // z.shape[-1]
        y = (z * self.coefficients) @ self.u.T + (x @ self.a_new.T) @ self.b_new.T
        return y if self.bias is None else y + self.bias

    def basis_energy(self) -> torch.Tensor:
        """c_i^2 E[(v_i^T x)^2]: basis i's output energy on the inputs seen since the last reset."""
        mean_square = self.energy / max(1, self.tokens)
        return self.coefficients.detach().double().pow(2) * mean_square

    def keep(self, index: torch.Tensor) -> None:
        """Drop every basis not in ``index`` (the new bases stay), and restart energy tracking."""
        with torch.no_grad():
            self.u = self.u[:, index].contiguous()
            self.v = self.v[:, index].contiguous()
            self.s = self.s[index].clone()
            self.g = nn.Parameter(self.g[index].clone())
            self.energy = torch.zeros_like(self.s, dtype=torch.float64)
        self.tokens = 0

    def factor_pair(self, dtype: torch.dtype) -> FactorizedLinear:
        """The trained linear as a balanced factor pair of rank (kept + new bases): QR, then a small SVD."""
        with torch.no_grad():
            c = self.coefficients.double()
            b = torch.cat([self.u.double() * c, self.b_new.double()], dim=1)  # m x r
            a = torch.cat([self.v.double().T, self.a_new.double()], dim=0)  # r x n
            up, down = balanced_pair(b, a)
            bias = None if self.bias is None else self.bias.to(dtype)
            return FactorizedLinear.from_factors(down.to(dtype), up.to(dtype), bias)


def _selected_pools(model, units: list[Unit], windows: torch.Tensor, new_bases: list[int],
                    generator: torch.Generator, progress) -> dict[int, TunableBasisLinear]:
    """For each unit: SVD of W, the pool of its task-selected bases (closed-form score), as a module."""
    layers = model.model.layers
    hidden = layer_inputs(model, windows)
    modules = {}
    for index, layer in enumerate(layers):
        stats, hidden = collect_layer_stats(model, layer, hidden, BATCH)
        for i, unit in enumerate(units):
            if unit.layer != index:
                continue
            (member,) = unit.members
            dense = layer.get_submodule(member)
            w = dense.weight.detach().double()
            # Bases of the whitened SVD (W L = U S V^T, C = L L^T): basis i reads x through
            # L^-T v_i, so on the task's inputs the bases' outputs are uncorrelated and basis i
            # carries output energy s_i^2 exactly: the task's own ordering of W's bases.
            chol = cholesky_factor(stats[unit.site].second_moment)
            u, s, vh = balanced_svd(w @ chol)
            v = torch.linalg.solve_triangular(chol.T, vh.T, upper=True)
            pool = max(1, unit.max_saving_rank - new_bases[i])
            chosen = torch.arange(min(pool, s.numel()))
            bias = None if dense.bias is None else dense.bias.detach()
            modules[i] = TunableBasisLinear(u[:, chosen], s[chosen], v[:, chosen], new_bases[i], bias, generator)
        del stats
        progress(f"layer {index + 1}/{len(layers)}: task-selected basis pools ready")
    return modules


def _prune_to(modules: dict[int, TunableBasisLinear], units: list[Unit], target: int) -> int:
    """Drop bases until the parameter count is at most ``target``; returns the count.

    Within a linear, bases are ranked by output energy; basis i's *position* is the share of
    its linear's energy held by the bases ranked above it. Dropping the highest positions
    first is "every linear keeps the same fraction of its energy", the fraction set by the budget.
    """
    ranks = {i: m.rank for i, m in modules.items()}
    candidates = []
    for i, module in modules.items():
        energy = module.basis_energy()
        order = torch.argsort(energy, descending=True)
        share = energy[order] / energy.sum().clamp_min(1e-30)
        before = torch.cumsum(share, 0) - share
        for position, basis in zip(before[1:].tolist(), order[1:].tolist()):  # the top basis always stays
            candidates.append((position, i, basis))
    candidates.sort(reverse=True)
    dropped: dict[int, set[int]] = {i: set() for i in modules}
    count = total_params(units, [ranks.get(i) for i in range(len(units))])
    for _position, i, basis in candidates:
        if count <= target:
            break
        dropped[i].add(basis)
        count -= units[i].in_features + sum(units[i].out_features)
    for i, module in modules.items():
        if dropped[i]:
            kept = [b for b in range(module.s.numel()) if b not in dropped[i]]
            module.keep(torch.tensor(kept, dtype=torch.long))
    return count


def _optimizer(modules: dict[int, TunableBasisLinear], tuning: BasisTuning) -> torch.optim.Optimizer:
    return torch.optim.Adam([
        {"params": [m.g for m in modules.values()], "lr": tuning.coefficient_lr},
        {"params": [p for m in modules.values() for p in (m.a_new, m.b_new)], "lr": tuning.new_bases_lr},
    ])


def tune_bases(model, units: list[Unit], calibration: torch.Tensor, training: torch.Tensor, ratio: float,
               tuning: BasisTuning, seed: int, progress) -> list[int | None]:
    """Train and prune the task-selected bases of every unit down to the budget; returns the ranks.

    The model's decoder linears are replaced by factor pairs in place.
    """
    if any(len(u.members) != 1 for u in units):
        raise ValueError("tuned basis selection factors single linears")
    generator = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(model) if tuning.distill > 0 else None
    new_bases = [max(1, round(NEW_BASES_SHARE * min(u.in_features, sum(u.out_features)))) for u in units]
    modules = _selected_pools(model, units, calibration, new_bases, generator, progress)
    for i, module in modules.items():
        set_unit(model.model.layers[units[i].layer], units[i], [module])
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules.values():
        for p in (module.g, module.a_new, module.b_new):
            p.requires_grad_(True)

    dense = sum(u.dense_params for u in units)
    target = math.floor((1 - ratio) * dense)
    start_count = total_params(units, [modules[i].rank for i in range(len(units))])
    if start_count <= target:
        raise RankdownError(f"ratio {ratio}: the task-selected pools already fit the budget; use a larger ratio")
    prune_span = max(tuning.prune_steps, round(tuning.steps * (1 - tuning.recover_share)))
    prune_at = {round(k * prune_span / tuning.prune_steps): k for k in range(1, tuning.prune_steps + 1)}
    optimizer = _optimizer(modules, tuning)
    report_every = max(1, tuning.steps // 12)
    clock = time.perf_counter()
    model.train()
    count, running = start_count, []
    for step in range(1, tuning.steps + 1):
        rows = torch.randint(0, training.shape[0], (tuning.batch,), generator=generator)
        ids = training[rows]
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                reference = F.log_softmax(teacher(input_ids=ids).logits, -1)
            log_probs = F.log_softmax(out.logits, -1)
            loss = loss + tuning.distill * F.kl_div(log_probs, reference, log_target=True, reduction="none").sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if step in prune_at:
            k = prune_at[step]
            step_target = target if k == tuning.prune_steps else round(start_count * (target / start_count) ** (k / tuning.prune_steps))
            count = _prune_to(modules, units, step_target)
            optimizer = _optimizer(modules, tuning)
        if step % report_every == 0 or step == tuning.steps:
            progress(f"tuning step {step}/{tuning.steps}: loss {sum(running) / len(running):.4f}, "
                     f"{count:,} decoder-linear parameters (budget {target:,}), "
                     f"{time.perf_counter() - clock:.0f} s, peak RSS {peak_rss_mb():.0f} MB")
            running = []
    model.eval()
    del teacher
    for i, module in modules.items():
        set_unit(model.model.layers[units[i].layer], units[i], [module.factor_pair(torch.float32)])
    return [modules[i].rank for i in range(len(units))]


def choose(job: RankJob) -> RankOutcome:
    """The rank strategy of --basis-mode tuned: ranks are what pruning leaves."""
    cfg = job.cfg
    # Training needs the whole model at once: this strategy does not stream.
    model = load_model(job.ckpt)
    training = training_windows(job.tokenizer, cfg, cfg.tuning.seq_len,
                                cfg.tuning.steps * cfg.tuning.batch * cfg.tuning.seq_len)
    job.progress(f"tuning bases on {training.shape[0]} training windows: {cfg.tuning.steps} steps of "
                 f"{cfg.tuning.batch}, {cfg.tuning.prune_steps} pruning steps")
    ranks = tune_bases(model, job.units, job.windows, training, cfg.ratio, cfg.tuning, cfg.seed, job.progress)
    loss = mean_loss(model, job.windows)
    job.writer.add({k: v for k, v in model.state_dict().items()
                    if not (model.config.tie_word_embeddings and k == "lm_head.weight")})
    return RankOutcome(model, ranks, loss)
