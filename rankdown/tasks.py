"""Built-in tasks: deterministic corpora with disjoint splits.

Everything is generated or read from what every machine with this Python has: generated
arithmetic, the standard library's own sources and the English text of
``pydoc_data.topics``. A document's split is fixed by a hash of its identity, so the
training, calibration and evaluation splits never share a document, on any machine.

``math``, ``code`` and ``prose`` suit the shipped model, which was trained on them. A
pretrained model has never seen ``a+b=`` without context, so ``compare`` and
``identifiers`` are few-shot exact-match tasks (a math-flavoured and a code-flavoured one)
that a 135M-parameter pretrained Llama solves often but not always: their prompts are
four solved lines from the training split, then the question.
"""

from __future__ import annotations

import functools
import hashlib
import re
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


TASKS = ("math", "code", "prose", "compare", "identifiers")
MIX = "+"  # joins the tasks of a calibration and training mix (compress only)
EXACT_MATCH_TASKS = ("math", "compare", "identifiers")

# Percent buckets of the identity hash: [0, 80) train, [80, 90) calibration, [90, 100) evaluation.
_SPLIT_BUCKETS = {Split.TRAIN: range(0, 80), Split.CALIBRATION: range(80, 90), Split.EVALUATION: range(90, 100)}
MATH_OPERAND_MAX = 99
MATH_EVAL_PROBLEMS = 400
MATH_LINES_PER_TEXT = 24
PROSE_CHUNK_CHARS = 1500
CODE_CHUNK_CHARS = 1500
FEW_SHOT_EXAMPLES = 4
FEW_SHOT_EVAL_PROBLEMS = 400
# Function names of two or more lower-case words: the ones whose CamelCase form differs.
_SNAKE_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+([a-z][a-z0-9]*(?:_[a-z][a-z0-9]*)+)[ \t]*\(", re.MULTILINE)


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


def _hash_ordered(items: list[QAExample]) -> list[QAExample]:
    return sorted(items, key=lambda ex: hashlib.sha256(ex.prompt.encode()).digest())


def compare_problems(split: Split) -> list[QAExample]:
    """``max(a, b) =`` for distinct two-digit numbers; the answer is the larger one."""
    problems = [QAExample(f"max({a}, {b}) =", str(max(a, b))) for a in range(10, 100) for b in range(10, 100) if a != b]
    return _hash_ordered([p for p in problems if _in_split(p.prompt, split)])


@functools.cache
def _stdlib_function_names() -> tuple[str, ...]:
    """snake_case names of the functions defined in this Python's standard library (tests excluded)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names: set[str] = set()
    for path in stdlib.rglob("*.py"):
        parts = path.relative_to(stdlib).parts
        if "site-packages" in parts or any(part in ("test", "tests", "idle_test") for part in parts):
            continue
        names.update(_SNAKE_DEF.findall(path.read_text(encoding="utf-8", errors="replace")))
    return tuple(sorted(names))


def identifier_problems(split: Split) -> list[QAExample]:
    """``snake_case_name ->`` with its CamelCase form (each word capitalized, underscores dropped)."""
    problems = [QAExample(f"{name} ->", "".join(word.capitalize() for word in name.split("_")))
                for name in _stdlib_function_names()]
    return _hash_ordered([p for p in problems if _in_split(p.prompt, split)])


_FEW_SHOT_TASKS = {"compare": compare_problems, "identifiers": identifier_problems}


def _few_shot_task(name: str, split: Split) -> TaskData:
    """Texts are solved lines (perplexity, calibration); each question is led by the same four
    solved lines of the training split, so no evaluation problem is ever shown to the model."""
    problems = _FEW_SHOT_TASKS[name](split)
    lines = [f"{p.prompt} {p.answer}" for p in problems]
    texts = tuple("\n".join(lines[i : i + MATH_LINES_PER_TEXT]) + "\n" for i in range(0, len(lines), MATH_LINES_PER_TEXT))
    if split is not Split.EVALUATION:
        return TaskData(name, texts)
    shots = "".join(f"{p.prompt} {p.answer}\n" for p in _FEW_SHOT_TASKS[name](Split.TRAIN)[:FEW_SHOT_EXAMPLES])
    qa = tuple(QAExample(shots + p.prompt, p.answer) for p in problems[:FEW_SHOT_EVAL_PROBLEMS])
    return TaskData(name, texts, qa)


def task_names(name: str) -> tuple[str, ...]:
    """The tasks of ``name``: one built-in task, or a mix of several joined by ``+`` (``compare+code``)."""
    parts = tuple(name.split(MIX))
    if all(p in TASKS for p in parts) and len(set(parts)) < len(parts):
        raise RankdownError(f"task mix {name!r} names a task twice")
    if any(p not in TASKS for p in parts):
        raise RankdownError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}, or several joined by {MIX} "
                            f"(compare{MIX}code)")
    return parts


def load_task(name: str, split: Split) -> TaskData:
    """The texts (and, for exact-match tasks, the question/answer pairs) of one built-in task split."""
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
    if name in _FEW_SHOT_TASKS:
        return _few_shot_task(name, split)
    raise RankdownError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
