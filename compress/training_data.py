"""What compression reads: windows of the task's calibration split (statistics) or training split
(the steps that train: tuned basis selection, healing), or of the --calib file when the user gave
one (never the evaluation split); and the whole model's mean next-token loss over windows.

A task mix (``--task compare+code``) gives every task an equal share of the windows, interleaved,
so any prefix (the held-back windows are the first ones) holds all of them alike."""

from __future__ import annotations

import torch

from rankdown.compress.calibration import calibration_windows
from rankdown.compress.config import CompressConfig
from rankdown.compress.units import BATCH
from rankdown.datafiles import load_data
from rankdown.tasks import Split, TaskData, load_task, task_names


def _texts(data: TaskData) -> tuple[str, ...]:
    return data.texts or tuple(q.prompt + q.answer for q in data.qa)


def data_windows(tokenizer, cfg: CompressConfig, split: Split, seq_len: int, tokens: int) -> torch.Tensor:
    """Up to ``tokens`` tokens of ``split`` (or of the --calib file) as windows of ``seq_len`` (fewer
    if the text is shorter; a mix takes as many from each task as its shortest gives)."""
    if cfg.calib is not None:
        return calibration_windows(tokenizer, _texts(load_data(cfg.calib)), seq_len, tokens, str(cfg.calib))
    return task_windows(tokenizer, task_names(cfg.task), split, seq_len, tokens)


def task_windows(tokenizer, tasks: tuple[str, ...], split: Split, seq_len: int, tokens: int) -> torch.Tensor:
    """Up to ``tokens`` tokens of the built-in ``tasks``' ``split`` as windows of ``seq_len``, the tasks
    taking turns window by window, as many from each as the shortest gives."""
    each = [calibration_windows(tokenizer, _texts(load_task(name, split)), seq_len, -(-tokens // len(tasks)),
                                f"task {name} ({split.value} split)") for name in tasks]
    count = min(w.shape[0] for w in each)
    return torch.stack([w[i] for i in range(count) for w in each])


def training_windows(tokenizer, cfg: CompressConfig, seq_len: int, tokens: int) -> torch.Tensor:
    """Up to ``tokens`` tokens of training text as windows of ``seq_len`` (fewer if the text is shorter)."""
    return data_windows(tokenizer, cfg, Split.TRAIN, seq_len, tokens)


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token loss of the whole model over ``windows``."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], BATCH):
        ids = windows[i : i + BATCH]
        loss = model(input_ids=ids, labels=ids).loss
        total += loss.item() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return total / count
