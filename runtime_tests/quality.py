"""Task quality computed by the runtime itself: exact match and perplexity from its own logits.

Needs the runtime, numpy and the ``tokenizers`` library only (no transformers, no PyTorch
model), so the same code judges an artifact on a host or on a device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from export.decoding import Decoder


@dataclass(frozen=True)
class QualityResult:
    exact_match: float | None  # None: the data has no question/answer pairs
    examples: int
    perplexity: float | None  # None: the data has no texts
    tokens: int
    seconds: float


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def exact_match(decoder: Decoder, tokenizer, qa, eos_ids: list[int], max_examples: int) -> tuple[float, int]:
    """Greedy decoding until a newline or EOS; the first line must equal the answer."""
    hits = 0
    examples = qa[:max_examples]
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt).ids
        budget = len(tokenizer.encode(ex.answer, add_special_tokens=False).ids) + 2
        logits = decoder.prefill(prompt)[-1]
        produced: list[int] = []
        for _ in range(budget):
            token = int(np.argmax(logits))
            if token in eos_ids:
                break
            produced.append(token)
            if "\n" in tokenizer.decode(produced, skip_special_tokens=True):
                break
            logits = decoder.step(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        hits += text.split("\n", 1)[0].strip() == ex.answer
    return hits / max(len(examples), 1), len(examples)


def perplexity(decoder: Decoder, windows: list[list[int]]) -> tuple[float, int]:
    """exp(mean next-token loss), each window one prefill call."""
    nll, count = 0.0, 0
    for window in windows:
        logp = _log_softmax(decoder.prefill(window).astype(np.float64))
        targets = np.asarray(window[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return math.exp(nll / count), count


def windows_of(tokenizer, texts, window: int, max_tokens: int) -> list[list[int]]:
    """Texts cut into windows of ``window`` tokens, each led by BOS (as ``rankdown eval`` does)."""
    bos = tokenizer.token_to_id("<s>")
    out, total = [], 0
    step = window - (bos is not None)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        for start in range(0, len(ids), step):
            piece = ([bos] if bos is not None else []) + ids[start : start + step]
            if len(piece) < 2:
                continue
            out.append(piece)
            total += len(piece) - 1
            if total >= max_tokens:
                return out
    return out


def measure_quality(decoder: Decoder, tokenizer, data, eos_ids: list[int], max_examples: int = 400,
                    window: int = 256, max_tokens: int = 32768) -> QualityResult:
    start = time.perf_counter()
    em, examples = (exact_match(decoder, tokenizer, data.qa, eos_ids, max_examples) if data.qa else (None, 0))
    if decoder.max_positions is not None:
        window = min(window, decoder.max_positions - 1)
    windows = windows_of(tokenizer, data.texts, window, max_tokens) if data.texts else []
    ppl, tokens = perplexity(decoder, windows) if windows else (None, 0)
    return QualityResult(em, examples, ppl, tokens, time.perf_counter() - start)
