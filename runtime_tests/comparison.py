"""``validate BUNDLE --compare OTHER``: the user's question, is this bundle worth shipping over that one.

Both bundles are timed with one protocol, interleaved (A, B, A, B, ...: one timed repeat per
child process after its warm-up), so a machine that drifts (heat, other load) drifts on both
alike; the other bundle's quality is computed by the same runtime on the same data.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from rankdown.validate.config import LatencyPlan
from rankdown.validate.report import Comparison, LatencyReport, QualityReport, Spread


def _spread(values: list[float]) -> Spread:
    return Spread(median=statistics.median(values), min=min(values), max=max(values), runs=len(values))


def interleaved_latency(run: Callable[[dict, Path], dict], jobs: list[tuple[dict, Path]], plan: LatencyPlan,
                        progress: Callable[[str], None]) -> list[list[dict]]:
    """Each (job, bundle)'s latency part ``plan.repeats`` times, alternating between them; each run
    is its own process (its warm-up, then one timed repeat). Returns the results per job."""
    results: list[list[dict]] = [[] for _ in jobs]
    for round_ in range(plan.repeats):
        for i, (job, bundle) in enumerate(jobs):
            results[i].append(run(dict(job, latency=dict(job["latency"], repeats=1)), bundle))
        progress(f"timing round {round_ + 1}/{plan.repeats} done")
    return results


def merged_latency(results: list[dict], size_bytes: int, threads: int | None, meaningful: bool) -> LatencyReport:
    """One LatencyReport from single-repeat runs: medians across runs, the largest peak memory."""
    lengths = results[0]["latency"]["ttft_ms"].keys()
    return LatencyReport(
        ttft_ms={k: _spread([r["latency"]["ttft_ms"][k]["median"] for r in results]) for k in lengths},
        decode_tokens_per_s=_spread([r["latency"]["decode_tokens_per_s"]["median"] for r in results]),
        load_s=statistics.median(r["load_s"] for r in results), peak_rss_mb=max(r["peak_rss_mb"] for r in results),
        size_bytes=size_bytes, threads=threads, meaningful=meaningful)


def compare(other: Path, this: LatencyReport, theirs: LatencyReport, ours: QualityReport,
            their_quality: QualityReport) -> Comparison:
    """Ratios this / other: above 1 is better for decode speed, below 1 for time, size and memory."""
    ratios = {"decode_tokens_per_s": this.decode_tokens_per_s.median / theirs.decode_tokens_per_s.median,
              **{f"ttft_ms_{k}": this.ttft_ms[k].median / theirs.ttft_ms[k].median for k in this.ttft_ms},
              "size_bytes": this.size_bytes / theirs.size_bytes, "peak_rss_mb": this.peak_rss_mb / theirs.peak_rss_mb}
    em_diff = (None if ours.exact_match is None or their_quality.exact_match is None
               else ours.exact_match - their_quality.exact_match)
    ppl_ratio = (None if ours.perplexity is None or their_quality.perplexity is None
                 else ours.perplexity / their_quality.perplexity)
    return Comparison(other=str(other), latency=theirs, exact_match=their_quality.exact_match,
                      perplexity=their_quality.perplexity, ratios=ratios, exact_match_difference=em_diff,
                      perplexity_ratio=ppl_ratio)
