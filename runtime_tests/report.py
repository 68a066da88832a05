"""``report.json`` (and report.md): what validate measured and whether the bundle passed.

The one place that writes the report; its schema is documented in the README.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ParityReport:
    greedy_match: bool
    greedy_tokens: int
    max_abs_logit_diff: float
    logit_scale: float
    top1_agreement: float
    positions: int
    max_diff_at: str = ""  # where the largest difference is: prompt, position and vocabulary entry
    # The runtime run without its cache (one prefill of prompt + generated tokens) against PyTorch's
    # cached decode, and whether its top-1 there equals the tokens it produced with its cache.
    cache_max_abs_logit_diff: float | None = None
    cache_consistent: bool | None = None


@dataclass(frozen=True)
class QualityReport:
    exact_match: float | None
    examples: int
    perplexity: float | None
    tokens: int
    reference_exact_match: float | None  # PyTorch, same data
    reference_perplexity: float | None
    seconds: float


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float
    runs: int


@dataclass(frozen=True)
class LatencyReport:
    ttft_ms: dict[str, Spread]  # prompt length -> time to first token
    decode_tokens_per_s: Spread
    load_s: float
    peak_rss_mb: float
    size_bytes: int
    threads: int | None
    meaningful: bool = True  # False under emulation


@dataclass(frozen=True)
class RuntimeReport:
    artifact: str
    parity: ParityReport
    quality: QualityReport
    latency: LatencyReport | None
    failures: list[str]  # named checks that failed; empty when passed
    passed: bool
    executed_on: str = ""  # the device's CPU and what ran the artifact, e.g. "aarch64, rankdown-et-runner"


@dataclass(frozen=True)
class Report:
    bundle: str
    reference: str
    data: str
    runtimes: dict[str, RuntimeReport]
    environment: dict
    passed: bool
    failures: list[str] = field(default_factory=list)
    tokenizer_matches_reference: bool | None = None  # None: the reference folder has no tokenizer
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def to_markdown(report: Report) -> str:
    lines = [f"# rankdown validate: {'PASSED' if report.passed else 'FAILED'}", "",
             f"bundle `{report.bundle}`, reference `{report.reference}`, data {report.data}, "
             f"host {report.environment.get('machine')}, run via {report.environment.get('runner')}"
             f"{' (emulated: timings are not meaningful)' if report.environment.get('emulated') else ''}, "
             f"threads {report.environment.get('threads')}", "",
             "| runtime | greedy | max abs logit diff | top-1 | exact match (ref) | perplexity (ref) | "
             "TTFT ms | decode tok/s | load s | peak RSS MB | size MiB | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report.runtimes.items():
        q, p, lat = r.quality, r.parity, r.latency
        em = "n/a" if q.exact_match is None else f"{q.exact_match:.1%} ({q.reference_exact_match:.1%})"
        ppl = "n/a" if q.perplexity is None else f"{q.perplexity:.3f} ({q.reference_perplexity:.3f})"
        if lat is None:
            timing = "| - | - | - | - | - "
        else:
            ttft = ", ".join(f"{k}: {v.median:.1f}" for k, v in lat.ttft_ms.items())
            timing = (f"| {ttft} | {lat.decode_tokens_per_s.median:.1f} | {lat.load_s:.2f} | {lat.peak_rss_mb:.0f} "
                      f"| {lat.size_bytes / 2**20:.2f} ")
        lines.append(f"| {name} | {'identical' if p.greedy_match else 'differs'} ({p.greedy_tokens}) | "
                     f"{p.max_abs_logit_diff:.2e} | {p.top1_agreement:.1%} | {em} | {ppl} {timing}| "
                     f"{'yes' if r.passed else 'NO: ' + '; '.join(r.failures)} |")
    lines += ["", *(f"- {name} ran on {r.executed_on}" for name, r in report.runtimes.items() if r.executed_on)]
    return "\n".join(lines) + "\n"
