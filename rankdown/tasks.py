"""Built-in tasks (math, code, prose): deterministic corpora with disjoint splits.

Everything is generated or read from what every machine with this Python has: generated
arithmetic, the standard library's own sources and the English text of
``pydoc_data.topics``. A document's split is fixed by a hash of its identity, so the
training, calibration and evaluation splits never share a document, on any machine.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rankdown.errors import RankdownError


class Split(str, Enum):
    TRAIN = "train"
    CALIBRATION = "calibration"
    EVALUATION = "evaluation"


@dataclass(frozen=True)
class QAExample:
    """An exact-match example: the greedy continuation's first line must equal ``answer``."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskData:
    """Texts (for perplexity and calibration) and question/answer pairs (for exact match)."""

    name: str
    texts: tuple[str, ...] = ()
    qa: tuple[QAExample, ...] = field(default_factory=tuple)


TASKS = ("math", "code", "prose")

# Percent buckets of the identity hash: [0, 80) train, [80, 90) calibration, [90, 100) evaluation.
_SPLIT_BUCKETS = {Split.TRAIN: range(0, 80), Split.CALIBRATION: range(80, 90), Split.EVALUATION: range(90, 100)}
MATH_OPERAND_MAX = 99
MATH_EVAL_PROBLEMS = 400
MATH_LINES_PER_TEXT = 24
PROSE_CHUNK_CHARS = 1500
CODE_CHUNK_CHARS = 1500


def _bucket(identity: str) -> int:
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") % 100


def _in_split(identity: str, split: Split) -> bool:
    return _bucket(identity) in _SPLIT_BUCKETS[split]


def math_problems(split: Split) -> list[QAExample]:
    """Two-operand sums and differences (non-negative results) of numbers 0..99."""
    problems = []
    for a in range(MATH_OPERAND_MAX + 1):
        for b in range(MATH_OPERAND_MAX + 1):
            candidates = [(f"{a}+{b}=", str(a + b))]
            if a >= b:
                candidates.append((f"{a}-{b}=", str(a - b)))
            for prompt, answer in candidates:
                if _in_split(prompt, split):
                    problems.append(QAExample(prompt, answer))
    # A fixed, hash-ordered shuffle: deterministic and independent of the loop order.
    problems.sort(key=lambda ex: hashlib.sha256(ex.prompt.encode()).digest())
    return problems


def _math_texts(problems: list[QAExample]) -> list[str]:
    lines = [p.prompt + p.answer for p in problems]
    return ["\n".join(lines[i : i + MATH_LINES_PER_TEXT]) + "\n" for i in range(0, len(lines), MATH_LINES_PER_TEXT)]


def _chunks(text: str, size: int) -> list[str]:
    """Cut at line boundaries into pieces of about ``size`` characters."""
    pieces, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            pieces.append("".join(current))
            current, length = [], 0
    if current and length > size // 4:
        pieces.append("".join(current))
    return pieces


def code_documents(split: Split) -> list[str]:
    """The top-level standard-library modules of this Python, one document per file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if _in_split(p.name, split))
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def prose_documents(split: Split) -> list[str]:
    """The English help topics shipped in ``pydoc_data.topics``, one document per topic."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics) if _in_split(key, split)]


def load_task(name: str, split: Split) -> TaskData:
    """The texts (and, for math, the question/answer pairs) of one built-in task split."""
    if name == "math":
        problems = math_problems(split)
        qa = tuple(problems[:MATH_EVAL_PROBLEMS]) if split is Split.EVALUATION else ()
        return TaskData(name, tuple(_math_texts(problems)), qa)
    if name == "code":
        docs = code_documents(split)
        return TaskData(name, tuple(c for d in docs for c in _chunks(d, CODE_CHUNK_CHARS)))
    if name == "prose":
        docs = prose_documents(split)
        return TaskData(name, tuple(c for d in docs for c in _chunks(d, PROSE_CHUNK_CHARS)))
    raise RankdownError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
