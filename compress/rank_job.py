"""What every rank strategy is given and returns (the registry is compress/strategies.py).

A strategy chooses each unit's rank, builds the factor pairs at those ranks and writes the
compressed weights into the job's writer; the pipeline writes the report around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from rankdown.checkpoint import Checkpoint, ShardedWriter
from rankdown.compress.config import CompressConfig
from rankdown.compress.methods import MethodSpec
from rankdown.compress.units import Unit

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RankJob:
    ckpt: Checkpoint  # the dense source
    method: MethodSpec
    units: list[Unit]
    windows: torch.Tensor  # calibration windows, N x seq_len
    tokenizer: PreTrainedTokenizerFast
    cfg: CompressConfig
    writer: ShardedWriter  # receives every tensor of the compressed checkpoint
    progress: Progress


@dataclass
class RankOutcome:
    model: LlamaForCausalLM  # factor pairs in place; weights may be on meta once written
    ranks: list[int | None]  # per unit; None: left dense
    calibration_loss: float
    keep_ratios: dict[str, float] = field(default_factory=dict)
    allocation_check: dict[str, int | float | str] = field(default_factory=dict)
