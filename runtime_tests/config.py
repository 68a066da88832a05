"""The validate stage's recipe: which runtimes, against what, how strict, how much timing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from rankdown.errors import RankdownError
from rankdown.export.config import Quantize
from rankdown.export.formats import runtime_names
from rankdown.schema import coerce_enums, name_enum

# What runs each registered format (export/formats.py: by_runtime gives its artifact and format).
if TYPE_CHECKING:  # the members come from the registry at run time; a type checker sees a text enum
    class Runtime(str, Enum):
        pass
else:
    Runtime = name_enum("Runtime", runtime_names(), __name__)


@dataclass(frozen=True)
class Checks:
    """Pass/fail thresholds. ``None`` means: the export's own thresholds for its precision."""

    max_rel_logit_diff: float | None = None  # max |logit diff| / largest |reference logit|
    min_top1_agreement: float | None = None
    greedy_tokens: int = 64  # greedy continuation that must be identical (fp32 bundles)
    max_exact_match_drop: float | None = None  # runtime EM may trail the PyTorch reference by this much
    max_perplexity_increase: float | None = None  # relative

    def __post_init__(self):
        # refused before the bundle runs: an impossible bound would fail it after minutes of work
        if isinstance(self.greedy_tokens, bool) or not isinstance(self.greedy_tokens, int) or self.greedy_tokens < 1:
            raise RankdownError(f"--greedy-tokens must be at least 1, got {self.greedy_tokens!r}")
        # a negative drop or increase asks for a gain over PyTorch, which can be met; past these it cannot
        for flag, value, low, high, span in (
                ("--min-top1", self.min_top1_agreement, 0.0, 1.0, "from 0 to 1"),
                ("--max-em-drop", self.max_exact_match_drop, -1.0, 1.0, "from -1 to 1"),
                ("--max-rel-logit-diff", self.max_rel_logit_diff, 0.0, math.inf, "at least 0"),
                ("--max-ppl-increase", self.max_perplexity_increase, math.nextafter(-1.0, 0.0), math.inf, "above -1")):
            if value is not None and not low <= value <= high:
                raise RankdownError(f"{flag} must be {span}, got {value!r}")


@dataclass(frozen=True)
class QualityBounds:
    """How far a runtime's task quality may trail the (unquantized) PyTorch reference, by precision.
    fp32 and int8 must keep the task; int4 is a different model on purpose, so its bound is wider and
    its quality is what the report is read for."""

    max_exact_match_drop: float = 0.02
    max_perplexity_increase: float = 0.02

    @classmethod
    def for_quantize(cls, quantize: Quantize) -> QualityBounds:
        # int4 on the shipped model (feature 0.4): EM 98.5% -> 97.0% (ONNX) / 91.0% (ExecuTorch),
        # perplexity 5.13 -> 5.31 / 5.32 (+3.5%); docs/measurements.md, the int4 table.
        if quantize is Quantize.INT4:
            return cls(max_exact_match_drop=0.10, max_perplexity_increase=0.10)
        return cls()


@dataclass(frozen=True)
class LatencyPlan:
    prompt_lengths: tuple[int, ...] = (32, 128)
    decode_tokens: int = 128
    decode_prompt_length: int = 32
    warmup: int = 1
    repeats: int = 5

    def __post_init__(self):
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise RankdownError(f"--repeats must be at least 1, got {self.repeats!r}")
        if self.warmup < 0 or self.decode_tokens < 1 or min(self.prompt_lengths, default=0) < 1:
            raise RankdownError("latency: warm-up runs must be at least 0, decode tokens and prompt lengths at least 1")


@dataclass(frozen=True)
class ValidateConfig:
    # None: every format the bundle holds
    runtimes: tuple[Runtime, ...] | None = field(default=None, metadata={"option": "--runtime"})
    reference: Path | None = None  # None: the checkpoint the bundle was exported from
    task: str | None = None  # None with no eval file: the bundle's compression task, else math
    eval_file: Path | None = None
    max_examples: int = 200
    max_tokens: int = 8192  # perplexity budget
    threads: int | None = None
    checks: Checks = Checks()
    latency: LatencyPlan | None = LatencyPlan()  # None: skip timing
    report_dir: Path | None = None
    compare: Path | None = None  # another bundle, timed interleaved with this one (validate --compare)
    # the bundle timed again at each of these thread counts, interleaved (validate --sweep-threads):
    # which count a device decodes fastest at is the device's, not the bundle's
    sweep_threads: tuple[int, ...] = ()

    def __post_init__(self):
        coerce_enums(self)
        if self.task is not None and self.eval_file is not None:
            raise RankdownError("give --task or --eval, not both")
        if self.threads is not None and self.threads < 1:
            raise RankdownError(f"--threads must be at least 1, got {self.threads}")
        if self.sweep_threads:
            if len(self.sweep_threads) < 2 or min(self.sweep_threads) < 1 \
                    or len(set(self.sweep_threads)) != len(self.sweep_threads):
                raise RankdownError(f"--sweep-threads takes two or more distinct counts of at least 1, "
                                    f"got {','.join(map(str, self.sweep_threads))}")
            if self.latency is None:
                raise RankdownError("--sweep-threads times the bundle; leave out --no-latency")
            if self.compare is not None:
                raise RankdownError("give --compare or --sweep-threads, not both")
        if self.max_examples < 1:
            raise RankdownError(f"--max-examples must be at least 1, got {self.max_examples}")
