"""What every rank strategy is given and returns (the registry is compress/strategies.py).

A strategy chooses each unit's rank, builds the factor pairs at those ranks and writes the
compressed weights into the job's writer; the pipeline writes the report around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from rankdown.checkpoint import Checkpoint
from rankdown.compress.calibration import forward_bf16
from rankdown.compress.config import CompressConfig, Strategy
from rankdown.compress.distributed import Workers
from rankdown.compress.methods import MethodSpec
from rankdown.compress.units import Unit

Progress = Callable[[str], None]


class WeightSink(Protocol):
    """Where a strategy puts the compressed checkpoint's tensors: a ShardedWriter (to disk, piece by
    piece), or compress/healing.py's HeldWeights (in memory, to be healed before they are written)."""

    def add(self, tensors: dict[str, torch.Tensor]) -> None: ...


class Discard:
    """The sink of every worker but the leader, which alone writes the checkpoint."""

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        del tensors


@dataclass(frozen=True)
class RankJob:
    ckpt: Checkpoint  # the dense source
    method: MethodSpec
    units: list[Unit]
    windows: torch.Tensor  # calibration windows, N x seq_len
    tokenizer: PreTrainedTokenizerFast
    cfg: CompressConfig
    writer: WeightSink  # receives every tensor of the compressed checkpoint
    progress: Progress
    workers: Workers  # this process among the workers (one, alone, by default) and its device

    @property
    def bf16_forwards(self) -> bool:
        """Whether calibration's forward passes run under bfloat16 autocast (calibration_bf16)."""
        return calibration_bf16(self.method, self.cfg, self.workers.device)


def calibration_bf16(spec: MethodSpec, cfg: CompressConfig, device: torch.device) -> bool:
    """Whether the streamed calibration passes run under bfloat16 autocast (``--calib-precision``):
    for the methods fitted on statistics only (the data-free ones' passes give just the loss), and not
    for tuned basis selection, whose own statistics pass and training stay float32."""
    return spec.needs_data and cfg.strategy is not Strategy.TUNED_BASIS and forward_bf16(cfg.calib_precision, device)


@dataclass
class RankOutcome:
    model: LlamaForCausalLM  # factor pairs in place; weights may be on meta once written
    ranks: list[int | None]  # per unit; None: left dense
    calibration_loss: float
    keep_ratios: dict[str, float] = field(default_factory=dict)
    allocation_check: dict[str, int | float | str] = field(default_factory=dict)
