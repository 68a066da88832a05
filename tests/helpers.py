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


def cli_in_process(capsys, *args) -> tuple[int, str]:
    """``rankdown *args`` run by ``rankdown.cli.main`` in this process: (exit status, its stderr). For a
    user mistake's status and line, without a second interpreter's start (3-9 s each under the suite's
    load); what only a real process shows (exit code at the shell, nothing else on stderr) stays on
    ``python -m rankdown.cli`` in the tests that claim it."""
    from rankdown.cli import main

    capsys.readouterr()
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err
