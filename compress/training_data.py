"""What the steps that train read (tuned basis selection, healing): windows of the task's training
split, or of the --calib file when the user gave one (never the evaluation split), and the
whole model's mean next-token loss over windows."""

from __future__ import annotations

import torch

from rankdown.compress.calibration import calibration_windows
from rankdown.compress.config import CompressConfig
from rankdown.compress.units import BATCH
from rankdown.datafiles import load_data
from rankdown.tasks import Split, load_task


def training_windows(tokenizer, cfg: CompressConfig, seq_len: int, tokens: int) -> torch.Tensor:
    """Up to ``tokens`` tokens of training text as windows of ``seq_len`` (fewer if the text is shorter)."""
    data = load_data(cfg.calib) if cfg.calib is not None else load_task(cfg.task, Split.TRAIN)
    where = str(cfg.calib) if cfg.calib is not None else f"task {cfg.task} (train split)"
    return calibration_windows(tokenizer, data.texts or tuple(q.prompt + q.answer for q in data.qa),
                               seq_len, tokens, where)


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
