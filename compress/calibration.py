"""Calibration windows and per-layer input statistics, streamed one decoder layer at a time.

Four input sites per Llama layer: the attention input (read by q, k, v), the o_proj input,
the MLP input (gate, up) and the down_proj input. Statistics accumulate in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from rankdown.compress.units import SITES
from rankdown.errors import RankdownError

ROW_SLICE = 256  # rows of a batch upcast to float64 at once


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
    count: int = 0
    xxt: torch.Tensor | None = field(init=False)
    x_sum: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    pooled_cov_sum: torch.Tensor | None = field(init=False)
    groups: int = 0
    _second_moment: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=self.device)

        self.xxt = zeros(self.dim, self.dim)
        self.x_sum = zeros(self.dim)
        self.abs_sum = zeros(self.dim)
        self.pooled_cov_sum = zeros(self.dim, self.dim) if self.pooled else None

    def add_group(self, x: torch.Tensor) -> None:
        """One group of sequences (seed 002 pools covariance over such groups with equal weight)."""
        if self.xxt is None:
            raise RuntimeError("statistics were already read; accumulate before reading")
        x = x.reshape(-1, self.dim)
        rows = x.shape[0]
        group_sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        # float64 in row slices: a whole batch upcast is 64 MiB at n = 8192.
        for part in x.split(ROW_SLICE):
            part = part.to(torch.float64)
            self.xxt.addmm_(part.T, part)
            if self.pooled_cov_sum is not None:
                self.pooled_cov_sum.addmm_(part.T, part, alpha=1 / rows)
            group_sum += part.sum(0)
            self.abs_sum += part.abs().sum(0)
        self.x_sum += group_sum
        self.count += rows
        if self.pooled_cov_sum is not None:
            mean = group_sum / rows
            self.pooled_cov_sum.sub_(torch.outer(mean, mean))
        self.groups += 1

    @property
    def second_moment(self) -> torch.Tensor:
        if self._second_moment is None:
            assert self.xxt is not None, "second_moment is read once the statistics are complete"
            self._second_moment = self.xxt.div_(self.count)
            self.xxt = None
        return self._second_moment

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


@torch.no_grad()
def run_layer(model: LlamaForCausalLM, layer: nn.Module, hidden: torch.Tensor, batch: int,
              stats: dict[str, InputStats] | None = None) -> torch.Tensor:
    """The layer's outputs for ``hidden``, in batches; each batch is one statistics group."""
    handles = []
    if stats is not None:
        for site, members in SITES.items():
            module = layer.get_submodule(members[0])
            handles.append(module.register_forward_pre_hook(lambda _m, args, s=site: stats[s].add_group(args[0])))
    try:
        outputs = []
        rope = _position_embeddings(model, hidden[:1])
        for i in range(0, hidden.shape[0], batch):
            chunk = hidden[i : i + batch]
            cos, sin = rope
            out = layer(chunk, position_embeddings=(cos.expand(chunk.shape[0], -1, -1), sin.expand(chunk.shape[0], -1, -1)))
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outputs)
    finally:
        for h in handles:
            h.remove()


def _in_features(layer: nn.Module, member: str) -> int:
    linear = layer.get_submodule(member)
    assert isinstance(linear, nn.Linear), "statistics are collected on the dense layer"
    return linear.in_features


def collect_layer_stats(model: LlamaForCausalLM, layer: nn.Module, hidden: torch.Tensor,
                        batch: int, pooled: bool = False) -> tuple[dict[str, InputStats], torch.Tensor]:
    """Statistics of the layer's four input sites, and its (dense) outputs, on ``hidden``'s device."""
    stats = {site: InputStats(_in_features(layer, members[0]), pooled, hidden.device) for site, members in SITES.items()}
    out = run_layer(model, layer, hidden, batch, stats)
    return stats, out
