"""``rankdown fit``'s options (devices/fit.py runs them): apart from the pipeline, so that a bad
option is refused before compress, export and validate import transformers and the runtimes."""

from __future__ import annotations

from dataclasses import dataclass, field

from rankdown.compress.config import Healing, Method
from rankdown.errors import RankdownError
from rankdown.evaluate import EvalConfig
from rankdown.export.config import Quantize
from rankdown.schema import coerce_enums


@dataclass(frozen=True)
class FitConfig:
    task: str = "math"
    method: Method = Method.FEATURE
    ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)  # 0.0: the dense model
    # int4 last: it ranks after every fp32 and int8 candidate that fits (rank_candidates), the fallback
    quantize: tuple[Quantize, ...] = field(default=(Quantize.NONE, Quantize.INT8, Quantize.INT4),
                                           metadata={"option": "--quantize"})
    max_memory_mb: float | None = None  # None: the profile's memory_mb
    min_score: float | None = None  # exact match, 0..1
    max_examples: int = 200
    max_seq_len: int = 256
    heal_steps: int = Healing.steps  # each compressed candidate is healed as `compress` heals by default
    overwrite: bool = False

    def __post_init__(self):
        Healing(steps=self.heal_steps)  # a bad count is refused here, before any work
        EvalConfig(max_examples=self.max_examples)  # as is a bad --max-examples, not after the first candidate
        if not self.ratios or any(not 0 <= r < 1 for r in self.ratios):
            raise RankdownError(f"--ratios must be numbers in [0, 1), got {self.ratios!r}")
        coerce_enums(self)
        if self.max_memory_mb is not None and self.max_memory_mb <= 0:
            raise RankdownError(f"--max-memory must be positive, got {self.max_memory_mb}")
        if self.min_score is not None and not 0 <= self.min_score <= 1:
            raise RankdownError(f"--min-score is an exact-match fraction in 0..1, got {self.min_score}")
