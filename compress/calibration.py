"""Calibration windows and per-layer input statistics, streamed one decoder layer at a time.

Four input sites per Llama layer: the attention input (read by q, k, v), the o_proj input,
the MLP input (gate, up) and the down_proj input. Each group's products are taken in float32 and
summed in float64. The forward passes run under bfloat16 autocast where that is native
(``--calib-precision``), attention kept in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from rankdown.compress.config import Precision
from rankdown.compress.training_attention import float32_attention
from rankdown.compress.units import SITES
from rankdown.compress.whitening import cholesky_factor
from rankdown.compute_device import bf16_native
from rankdown.errors import RankdownError

# Relative to the mean diagonal of E[x x^T]: damps the carried-error correction along directions
# the calibration inputs barely visit (their regression coefficients are noise).
CORRECTION_RIDGE = 1e-3


def calibration_windows(tokenizer: PreTrainedTokenizerFast, texts: tuple[str, ...], seq_len: int,
                        max_tokens: int, where: str) -> torch.Tensor:
    """Full windows (N x seq_len) cut from the texts' concatenated tokens, each led by BOS."""
    stream: list[int] = []
    step = seq_len - 1
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(stream) >= max_tokens:
            break
    count = min(len(stream) // step, max(1, max_tokens // seq_len))
    if count < 1:
        raise RankdownError(f"{where}: calibration data has {len(stream)} tokens; need at least {step}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [[bos] + stream[i * step : (i + 1) * step] for i in range(count)]
    return torch.tensor(rows, dtype=torch.long)


def held_back(windows: torch.Tensor, minimum: int, purpose: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the other windows, the last quarter of them held back, at least two): the held-back windows
    judge what was fitted on the others, so they never saw it. ``purpose`` leads the error."""
    if windows.shape[0] < minimum:
        raise RankdownError(f"{purpose} needs at least {minimum} calibration windows of {windows.shape[1]} tokens "
                            "(give more text or --calib-tokens)")
    held = max(2, windows.shape[0] // 4)
    return windows[:-held], windows[-held:]


@dataclass
class InputStats:
    """Second moments of one site's inputs: E[x x^T], E[x], E[|x|], and (if asked) the pooled covariance.

    The n x n float64 sums dominate memory (512 MiB each at n = 8192), so the pooled covariance
    is kept only for the methods that read it, and E[x x^T] is normalized in place, once.
    """

    dim: int
    pooled: bool = False
    device: torch.device = torch.device("cpu")
    paired: bool = False  # also E[x_dense x^T], with the dense model's inputs at the same positions
    count: int = 0
    xxt: torch.Tensor | None = field(init=False)
    cross_sum: torch.Tensor | None = field(init=False)
    x_sum: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    pooled_cov_sum: torch.Tensor | None = field(init=False)
    groups: int = 0
    _second_moment: torch.Tensor | None = field(init=False, default=None, repr=False)
    _correction: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=self.device)

        self.xxt = zeros(self.dim, self.dim)
        self.x_sum = zeros(self.dim)
        self.abs_sum = zeros(self.dim)
        self.pooled_cov_sum = zeros(self.dim, self.dim) if self.pooled else None
        self.cross_sum = zeros(self.dim, self.dim) if self.paired else None

    def add_group(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """One group of sequences (seed 002 pools covariance over such groups with equal weight);
        ``dense``: the dense model's inputs at the same positions (``paired`` statistics only)."""
        if self.xxt is None:
            raise RuntimeError("statistics were already read; accumulate before reading")
        if (dense is None) != (self.cross_sum is None):
            raise RuntimeError("paired statistics take the dense inputs with every group, and only they do")
        # float32 products of one group (1,024 rows at the default batch), each stream centred on its
        # group mean first, so that the pooled covariance does not come from a float32 cancellation
        # (channels whose mean dwarfs their spread are common in LLMs); the mean's share is added back
        # in float64. Within about 2e-7 of float64's products (measured), at 2.8x their speed on a
        # 2-core CPU, where they were most of calibration's time. Autocast (the hooks run inside the
        # forward pass) must not take them to bfloat16.
        with torch.autocast(x.device.type, enabled=False):
            x = x.reshape(-1, self.dim).float()
            rows = x.shape[0]
            group_sum = x.sum(0, dtype=torch.float64)
            mean = group_sum / rows
            centred = x - mean.float()
            product = centred.T @ centred
            self.xxt += product
            self.xxt.add_(torch.outer(mean, mean), alpha=rows)
            if self.cross_sum is not None and dense is not None:
                # the same operations as xxt's, so identical streams give bit-identical sums
                dense = dense.reshape(-1, self.dim).float()
                dense_mean = dense.sum(0, dtype=torch.float64) / rows
                self.cross_sum += (dense - dense_mean.float()).T @ centred
                self.cross_sum.add_(torch.outer(dense_mean, mean), alpha=rows)
            self.abs_sum += x.abs().sum(0, dtype=torch.float64)
            self.x_sum += group_sum
            self.count += rows
            if self.pooled_cov_sum is not None:
                self.pooled_cov_sum.add_(product, alpha=1 / rows)
        self.groups += 1

    @property
    def second_moment(self) -> torch.Tensor:
        if self._second_moment is None:
            assert self.xxt is not None, "second_moment is read once the statistics are complete"
            self._second_moment = self.xxt.div_(self.count)
            self.xxt = None
        return self._second_moment

    @property
    def carried_correction(self) -> torch.Tensor:
        """M (n x n) such that W M is the best linear map from these inputs to the dense model's
        output W x_dense: min E||W x_dense - W' x||^2 over W' is W' = W E[x_dense x^T] E[x x^T]^-1.
        Written M = I + (E[x_dense x^T] - E[x x^T]) (E[x x^T] + ridge)^-1, so that the ridge only
        damps the correction (identical streams give M = I exactly)."""
        if self._correction is None:
            if self.cross_sum is None:
                raise RuntimeError("the dense inputs were not collected (InputStats(paired=True))")
            c = self.second_moment
            lower = cholesky_factor(c, CORRECTION_RIDGE)
            difference = self.cross_sum.div_(self.count).sub_(c)
            self.cross_sum = None
            # (C_dx - C) (C + ridge)^-1 = ((C + ridge)^-1 (C_dx - C)^T)^T, C symmetric
            self._correction = torch.cholesky_solve(difference.T.contiguous(), lower).T
            self._correction.diagonal().add_(1.0)
        return self._correction

    @property
    def mean(self) -> torch.Tensor:
        return self.x_sum / self.count

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    @property
    def pooled_covariance(self) -> torch.Tensor:
        if self.pooled_cov_sum is None:
            raise RuntimeError("pooled covariance was not collected (InputStats(pooled=True))")
        return self.pooled_cov_sum / self.groups


def _position_embeddings(model: LlamaForCausalLM, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    return model.model.rotary_emb(hidden, positions)


@torch.no_grad()
def layer_inputs(model: LlamaForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """Hidden states entering the first decoder layer."""
    return model.model.embed_tokens(windows)


def _site_hooks(layer: nn.Module, take) -> list:
    """A forward pre-hook on each site's first linear calling ``take(site, its input)``."""
    return [layer.get_submodule(members[0]).register_forward_pre_hook(lambda _m, args, s=site: take(s, args[0]))
            for site, members in SITES.items()]


def forward_bf16(precision: Precision, device: torch.device) -> bool:
    """Whether calibration's forward passes run under bfloat16 autocast (``auto``: where native).
    SmolLM2 compressed for code at 20% removed, 65,536 tokens: 8.9 -> 4 s a layer, held-back loss of
    the unhealed factors 3.6002 in float32 against 3.5998 (docs/measurements.md, "Calibration in bfloat16, 300 healing steps")."""
    return bf16_native(device) if precision is Precision.AUTO else precision is Precision.BF16


def _forward(model: LlamaForCausalLM, layer: nn.Module, chunk: torch.Tensor, bf16: bool) -> torch.Tensor:
    cos, sin = _position_embeddings(model, chunk[:1])
    # bf16 on a CPU: attention in float32, whose bfloat16 kernel is the slower one there (as in healing).
    # Set on the layer's own attention config: a layer deep-copied for --correct-carried has its own.
    with float32_attention(layer.self_attn, enabled=bf16 and chunk.device.type == "cpu"), \
            torch.autocast(chunk.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = layer(chunk, position_embeddings=(cos.expand(chunk.shape[0], -1, -1), sin.expand(chunk.shape[0], -1, -1)))
    out = out[0] if isinstance(out, tuple) else out
    return out.float()  # the residual stream: float32 as it is without autocast


@torch.no_grad()
def run_layer(model: LlamaForCausalLM, layer: nn.Module, hidden: torch.Tensor, batch: int,
              stats: dict[str, InputStats] | None = None, bf16: bool = False) -> torch.Tensor:
    """The layer's outputs for ``hidden``, in batches; each batch is one statistics group."""
    handles = [] if stats is None else _site_hooks(layer, lambda site, x: stats[site].add_group(x))
    try:
        return torch.cat([_forward(model, layer, hidden[i : i + batch], bf16) for i in range(0, hidden.shape[0], batch)])
    finally:
        for h in handles:
            h.remove()


class _SiteReached(Exception):
    """Stops a forward pass once the site's input is taken: nothing after it is needed."""


def _site_input(model: LlamaForCausalLM, layer: nn.Module, chunk: torch.Tensor, site: str, bf16: bool) -> torch.Tensor:
    taken: list[torch.Tensor] = []

    def take(_module, args):
        taken.append(args[0])
        raise _SiteReached

    handle = layer.get_submodule(SITES[site][0]).register_forward_pre_hook(take)
    try:
        _forward(model, layer, chunk, bf16)
    except _SiteReached:
        pass
    finally:
        handle.remove()
    return taken[0]


@torch.no_grad()
def collect_paired_stats(model: LlamaForCausalLM, layer: nn.Module, dense_layer: nn.Module, hidden: torch.Tensor,
                         dense_hidden: torch.Tensor, site: str, batch: int, pooled: bool = False,
                         bf16: bool = False) -> dict[str, InputStats]:
    """Statistics of one input site of ``layer`` (as it stands: the sites before it already
    factored) on ``hidden`` (the compressed model's stream), each batch paired with the same
    site's input in ``dense_layer`` on ``dense_hidden`` (the dense model's stream, same windows)."""
    stats = InputStats(_in_features(dense_layer, SITES[site][0]), pooled, hidden.device, paired=True)
    for i in range(0, hidden.shape[0], batch):
        dense = _site_input(model, dense_layer, dense_hidden[i : i + batch], site, bf16)
        stats.add_group(_site_input(model, layer, hidden[i : i + batch], site, bf16), dense)
    return {site: stats}


def _in_features(layer: nn.Module, member: str) -> int:
    linear = layer.get_submodule(member)
    assert isinstance(linear, nn.Linear), "statistics are collected on the dense layer"
    return linear.in_features


def collect_layer_stats(model: LlamaForCausalLM, layer: nn.Module, hidden: torch.Tensor,
                        batch: int, pooled: bool = False, bf16: bool = False) -> tuple[dict[str, InputStats], torch.Tensor]:
    """Statistics of the layer's four input sites, and its (dense) outputs, on ``hidden``'s device."""
    stats = {site: InputStats(_in_features(layer, members[0]), pooled, hidden.device) for site, members in SITES.items()}
    out = run_layer(model, layer, hidden, batch, stats, bf16)
    return stats, out
