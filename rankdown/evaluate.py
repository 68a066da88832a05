"""Task quality in PyTorch: perplexity on texts and exact match on question/answer pairs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rankdown.compute_device import Device, check_threads_here, resolve_device
from rankdown.errors import RankdownError
from rankdown.schema import coerce_enums
from rankdown.tasks import QAExample, TaskData

if TYPE_CHECKING:  # the CLI's parser reads EvalConfig's defaults without loading transformers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


@dataclass(frozen=True)
class EvalConfig:
    window: int = 256  # tokens per perplexity window, BOS included
    max_tokens: int = 32768  # perplexity budget per task: the first windows, in a fixed order
    max_examples: int = 400
    batch_size: int = 16
    threads: int | None = None
    device: Device = Device.AUTO

    def __post_init__(self):
        coerce_enums(self)
        if isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 1:
            raise RankdownError(f"--max-examples must be at least 1, got {self.max_examples!r}")
        if self.threads is not None:
            if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
                raise RankdownError(f"--threads must be at least 1, got {self.threads!r}")
            check_threads_here("--threads", self.threads)  # eval runs in this process


@dataclass(frozen=True)
class EvalResult:
    task: str
    exact_match: float | None
    perplexity: float | None
    examples: int
    tokens: int
    seconds: float


def token_windows(tokenizer: PreTrainedTokenizerFast, texts: tuple[str, ...], cfg: EvalConfig) -> list[list[int]]:
    """Each text cut into windows of ``cfg.window`` tokens, each led by BOS, up to the budget."""
    bos = tokenizer.bos_token_id
    windows, total = [], 0
    for text in texts:
        # verbose=False: long texts are cut into windows below, so the max-length warning is moot.
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        step = cfg.window - (1 if bos is not None else 0)
        for start in range(0, len(ids), step):
            piece = ([bos] if bos is not None else []) + ids[start : start + step]
            if len(piece) < 2:
                continue
            windows.append(piece)
            total += len(piece) - 1
            if total >= cfg.max_tokens:
                return windows
    return windows


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: tuple[str, ...],
               cfg: EvalConfig) -> tuple[float, int]:
    """exp(mean next-token loss) over the windows, and the number of predicted tokens."""
    windows = token_windows(tokenizer, texts, cfg)
    nll, count = 0.0, 0
    pad = tokenizer.pad_token_id
    for i in range(0, len(windows), cfg.batch_size):
        batch = windows[i : i + cfg.batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, piece in enumerate(batch):
            ids[row, : len(piece)] = torch.tensor(piece)
            mask[row, : len(piece)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view_as(targets)
        nll += losses[valid].double().sum().item()
        count += int(valid.sum())
    return math.exp(nll / count), count


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def greedy_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, qa: tuple[QAExample, ...],
                   batch_size: int) -> list[str]:
    """The first line of each prompt's greedy continuation (left-padded batches)."""
    answers = []
    tokenizer.padding_side = "left"
    for i in range(0, len(qa), batch_size):
        batch = qa[i : i + batch_size]
        enc = tokenizer([ex.prompt for ex in batch], return_tensors="pt", padding=True,
                        return_token_type_ids=False).to(model.device)
        budget = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in batch) + 2
        out = model.generate(
            **enc, max_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        answers += [first_line(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, data: TaskData,
             cfg: EvalConfig = EvalConfig()) -> EvalResult:
    """Exact match (if the data has question/answer pairs) and perplexity (if it has texts)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    torch.nn.Module.to(model, resolve_device(cfg.device))  # transformers' typing of .to() takes no device
    model.eval()
    em = None
    qa = data.qa[: cfg.max_examples]
    if qa:
        answers = greedy_answers(model, tokenizer, qa, batch_size=max(cfg.batch_size, 64))
        em = sum(a == ex.answer for a, ex in zip(answers, qa)) / len(qa)
    ppl, tokens = (perplexity(model, tokenizer, data.texts, cfg) if data.texts else (None, 0))
    return EvalResult(data.name, em, ppl, len(qa), tokens, time.perf_counter() - start)
