"""Small helpers several test modules share (conftest holds the fixtures)."""

from __future__ import annotations

import torch

from rankdown.compress.calibration import InputStats


def quiet(_message: str) -> None:
    """A progress callback that prints nothing."""


def input_stats(x: torch.Tensor, group_rows: int = 64) -> InputStats:
    """Input statistics of rows ``x`` (float64), pooled in groups as calibration pools windows."""
    stats = InputStats(x.shape[1], pooled=True)
    for chunk in x.split(group_rows):
        stats.add_group(chunk)
    return stats
