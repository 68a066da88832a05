"""``report.json`` (and report.md): what validate measured and whether the bundle passed.

The one place that writes the report; its schema is documented in the README.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rankdown.atomic import write_text_atomic
from rankdown.export.parity import top1_note

# 2: ``environment`` says where the runtimes ran (``device``) with the host beside it (``host``);
# in 1 it was one dict whose ``machine`` named the host wherever the runtimes ran.
# 3: ``comparisons`` (validate --compare); ``size_bytes`` counts the artifact's data files too (.ptd).
# 4: ``parity.reference`` (an ExecuTorch int4 artifact is held against its quantized PyTorch model)
# and ``parity.float_top1_agreement``.
# 5: ``parity.p95_abs_logit_diff``.
# 6: ``parity.float_prompt_tasks``: whose text ``float_top1_agreement`` was measured on (the tasks the
# checkpoint was compressed for, else math, code, prose).
# 7: ``parity.top1_tie`` and ``parity.strict_top1_agreement``: against a quantized reference, top-1 counts
# near-ties within top1_tie x logit_scale, and the same-token agreement is kept beside it.
# 8: ``thread_sweep`` per runtime (validate --sweep-threads): the bundle timed at each thread count.
# 9: ``quality.quantized_reference_exact_match``: the bundle's quantized weights in PyTorch (int4).
# 10: ``parity.float_top1_floor``: the least ``float_top1_agreement`` that passes.
# 11: ``quality.task`` (the built-in task judged) and ``quality.gptq_tasks`` (those whose text GPTQ chose the
# 4-bit codes on; empty where it chose none).
SCHEMA_VERSION = 11


@dataclass(frozen=True)
class DeviceEnvironment:
    """Where the runtimes ran, as the device half of the harness saw it."""

    name: str  # the device profile's name; "local" for this machine without a profile
    transport: str  # how the harness reached it: local, ssh, adb, arm64-emu
    machine: str  # the device's CPU architecture as its OS names it: x86_64, aarch64
    system: str  # Linux, Darwin, ...
    cores: int | None
    emulated: bool  # under emulation: parity holds, timings mean nothing


@dataclass(frozen=True)
class HostEnvironment:
    """Where the PyTorch reference and every comparison ran."""

    machine: str
    system: str
    cores: int | None
    versions: dict[str, str]


@dataclass(frozen=True)
class Environment:
    device: DeviceEnvironment
    host: HostEnvironment
    threads: int | None


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
    # what the figures above are against: the float model, or (ExecuTorch int4) PyTorch with the
    # artifact's quantized weights, and then the float model's top-1 agreement on the prompts
    reference: str = "float"
    float_top1_agreement: float | None = None
    p95_abs_logit_diff: float | None = None  # 95th percentile over positions of each one's max |logit diff|
    float_prompt_tasks: tuple[str, ...] = ()  # whose evaluation text float_top1_agreement is on; () without it
    top1_tie: float = 0.0  # top1_agreement counted near-ties within this x logit_scale; 0: the same token
    strict_top1_agreement: float | None = None  # with a tie: the agreement on the same token
    float_top1_floor: float | None = None  # the least float_top1_agreement that passes; None without it


@dataclass(frozen=True)
class QualityReport:
    exact_match: float | None
    examples: int
    perplexity: float | None
    tokens: int
    reference_exact_match: float | None  # PyTorch, same data
    reference_perplexity: float | None
    seconds: float
    # PyTorch with the bundle's quantized weights, the same problems: None where the runtime is held
    # to the float model (fp32, int8) or there are no problems
    quantized_reference_exact_match: float | None = None
    task: str | None = None  # the built-in task judged; None: an --eval file
    gptq_tasks: tuple[str, ...] = ()  # the tasks on whose text GPTQ chose the 4-bit codes; (): it chose none


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
    thread_sweep: list[LatencyReport] = field(default_factory=list)  # one per count, timed interleaved


@dataclass(frozen=True)
class Comparison:
    """Another bundle timed interleaved with this one in the same runtime, and its quality there."""

    other: str
    latency: LatencyReport  # the other bundle's
    exact_match: float | None  # the other bundle's, by the same runtime on the same data
    perplexity: float | None
    ratios: dict[str, float]  # this / other: decode_tokens_per_s, ttft_ms_<length>, size_bytes, peak_rss_mb
    exact_match_difference: float | None  # this - other
    perplexity_ratio: float | None  # this / other


@dataclass(frozen=True)
class Report:
    bundle: str
    reference: str
    data: str
    runtimes: dict[str, RuntimeReport]
    environment: Environment
    passed: bool
    failures: list[str] = field(default_factory=list)
    tokenizer_matches_reference: bool | None = None  # None: the reference folder has no tokenizer
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # runtime -> validate --compare
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def to_markdown(report: Report) -> str:
    device, host = report.environment.device, report.environment.host
    lines = [f"# rankdown validate: {'PASSED' if report.passed else 'FAILED'}", "",
             f"bundle `{report.bundle}`, reference `{report.reference}`, data {report.data}, "
             f"threads {report.environment.threads}", "",
             f"runtimes ran on {device.name} ({device.machine} {device.system}, {device.cores} cores) via "
             f"{device.transport}{' (emulated: timings are not meaningful)' if device.emulated else ''}; "
             f"host {host.machine} {host.system} ({host.cores} cores)", "",
             "| runtime | greedy | max abs logit diff | top-1 | exact match (ref; quantized ref) | perplexity (ref) | "
             "TTFT ms | decode tok/s | load s | peak RSS MB | size MiB | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report.runtimes.items():
        q, p, lat = r.quality, r.parity, r.latency
        em = "n/a" if q.exact_match is None else f"{q.exact_match:.1%} ({q.reference_exact_match:.1%}" + \
            ("" if q.quantized_reference_exact_match is None else f"; {q.quantized_reference_exact_match:.1%}") + ")"
        ppl = "n/a" if q.perplexity is None else f"{q.perplexity:.3f} ({q.reference_perplexity:.3f})"
        if lat is None:
            timing = "| - | - | - | - | - "
        else:
            ttft = ", ".join(f"{k}: {v.median:.1f}" for k, v in lat.ttft_ms.items())
            timing = (f"| {ttft} | {lat.decode_tokens_per_s.median:.1f} | {lat.load_s:.2f} | {lat.peak_rss_mb:.0f} "
                      f"| {lat.size_bytes / 2**20:.2f} ")
        lines.append(f"| {name} | {'identical' if p.greedy_match else 'differs'} ({p.greedy_tokens}) | "
                     f"{p.max_abs_logit_diff:.2e} | {p.top1_agreement:.1%}{top1_note(p.top1_tie)}{_against(p)} | "
                     f"{em} | {ppl} {timing}| "
                     f"{'yes' if r.passed else 'NO: ' + '; '.join(r.failures)} |")
    lines += ["", *(f"- {name} ran on {r.executed_on}" for name, r in report.runtimes.items() if r.executed_on)]
    lines += [f"- {note}" for name, r in report.runtimes.items() for note in runtime_notes(name, r)]
    swept = {name: r.thread_sweep for name, r in report.runtimes.items() if r.thread_sweep}
    if swept:
        lines += ["", "## Thread counts (the bundle timed at each, interleaved, same protocol)", "",
                  "| runtime | threads | decode tok/s | TTFT ms | peak RSS MB | |", "|---|---|---|---|---|---|"]
        for name, sweep in swept.items():
            best = fastest_threads(sweep)
            for lat in sweep:
                ttft = ", ".join(f"{k}: {v.median:.1f}" for k, v in lat.ttft_ms.items())
                lines.append(f"| {name} | {lat.threads} | {lat.decode_tokens_per_s.median:.1f} "
                             f"({lat.decode_tokens_per_s.min:.1f}-{lat.decode_tokens_per_s.max:.1f}) | {ttft} | "
                             f"{lat.peak_rss_mb:.0f} | {'fastest decode' if lat.threads == best else ''} |")
    if report.comparisons:
        other = next(iter(report.comparisons.values())).other
        lines += ["", f"## Compared with `{other}` (timed interleaved, same protocol)", "",
                  "| runtime | decode tok/s | TTFT ms | size MiB | peak RSS MB | exact match | perplexity |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in report.comparisons.items():
            this = report.runtimes[name]
            mine, theirs = this.latency, c.latency
            assert mine is not None
            ttft = "; ".join(f"{k}: {mine.ttft_ms[k].median:.1f} vs {theirs.ttft_ms[k].median:.1f} "
                             f"({c.ratios[f'ttft_ms_{k}']:.2f}x)" for k in mine.ttft_ms)
            em = ("n/a" if c.exact_match_difference is None else
                  f"{this.quality.exact_match:.1%} vs {c.exact_match:.1%} ({c.exact_match_difference:+.1%})")
            ppl = ("n/a" if c.perplexity_ratio is None else
                   f"{this.quality.perplexity:.3f} vs {c.perplexity:.3f} ({c.perplexity_ratio:.2f}x)")
            lines.append(f"| {name} | {mine.decode_tokens_per_s.median:.1f} vs {theirs.decode_tokens_per_s.median:.1f} "
                         f"({c.ratios['decode_tokens_per_s']:.2f}x) | {ttft} | {mine.size_bytes / 2**20:.1f} vs "
                         f"{theirs.size_bytes / 2**20:.1f} ({c.ratios['size_bytes']:.2f}x) | {mine.peak_rss_mb:.0f} vs "
                         f"{theirs.peak_rss_mb:.0f} ({c.ratios['peak_rss_mb']:.2f}x) | {em} | {ppl} |")
    return "\n".join(lines) + "\n"


def quantization_note(name: str, r: RuntimeReport) -> str | None:
    """Where a runtime failed exact match and its quantized weights score no better in PyTorch,
    the line that says the task was lost in quantizing, not by the runtime; else None."""
    q = r.quality
    if f"{name}.quality.exact_match" not in r.failures or q.quantized_reference_exact_match is None \
            or q.exact_match is None or q.exact_match < q.quantized_reference_exact_match:
        return None
    return (f"{name}: the task is lost in the quantized weights, not by the runtime: PyTorch scores "
            f"{q.quantized_reference_exact_match:.1%} with them and {q.reference_exact_match:.1%} with the float "
            f"checkpoint (heal through the 4-bit weights for more steps, e.g. compress --heal-quantize 8da4w "
            f"--heal-steps 512, or export --quantize int8)")


def calibration_note(name: str, r: RuntimeReport) -> str | None:
    """Where a runtime failed exact match on a task other than the ones GPTQ calibrated the bundle's
    4-bit codes on, the line naming the export that calibrates them on it; else None. (Measured on
    dense SmolLM2-135M in ExecuTorch int4, judged on compare: 52% exact match calibrated on math, code
    and prose, failing; 61% with export --task compare, passing: docs/measurements.md.)"""
    q = r.quality
    if f"{name}.quality.exact_match" not in r.failures or not q.gptq_tasks or q.task is None or q.task in q.gptq_tasks:
        return None
    return (f"{name}: GPTQ chose the 4-bit codes on {', '.join(q.gptq_tasks)} text, not {q.task}'s: "
            f"export with --task {q.task} to choose them on its text")


def runtime_notes(name: str, r: RuntimeReport) -> list[str]:
    """What a failed runtime's quality says about where the task went and what to run instead."""
    return [note for note in (quantization_note(name, r), calibration_note(name, r)) if note]


def fastest_threads(sweep: list[LatencyReport]) -> int | None:
    """The thread count of a sweep whose median decode is fastest."""
    return max(sweep, key=lambda lat: lat.decode_tokens_per_s.median).threads


def write_report(report: Report, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "report.json", report.to_json())
    write_text_atomic(folder / "report.md", to_markdown(report))
    _plot_latency(report, folder / "latency.png")
    if report.comparisons:
        _plot_comparison(report, folder / "comparison.png")
    else:  # an earlier run's, with --compare: it would sit beside a report that has no comparison
        (folder / "comparison.png").unlink(missing_ok=True)


def _plot_latency(report: Report, path: Path) -> None:
    timed = {n: r.latency for n, r in report.runtimes.items() if r.latency is not None}
    if not timed:  # --no-latency: an earlier run's plot would describe another run
        path.unlink(missing_ok=True)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(timed)
    rates = [timed[n].decode_tokens_per_s for n in names]
    left.bar(names, [r.median for r in rates],
             yerr=[[r.median - r.min for r in rates], [r.max - r.median for r in rates]], capsize=4)
    left.set_ylabel("decode tokens/s (median, min-max)")
    lengths = sorted({k for lat in timed.values() for k in lat.ttft_ms}, key=int)
    width = 0.8 / max(len(lengths), 1)
    for j, length in enumerate(lengths):
        right.bar([i + j * width for i in range(len(names))],
                  [timed[n].ttft_ms[length].median if length in timed[n].ttft_ms else 0 for n in names],
                  width, label=f"prompt {length}")
    right.set_xticks([i + width * (len(lengths) - 1) / 2 for i in range(len(names))], names)
    right.set_ylabel("time to first token, ms")
    right.legend()
    device = report.environment.device
    fig.suptitle(f"{Path(report.bundle).name}: {device.name} ({device.machine}"
                 f"{', emulated' if device.emulated else ''})")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_comparison(report: Report, path: Path) -> None:
    """Ratios this / other per runtime, with the quality difference in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.comparisons)
    metrics = list(next(iter(report.comparisons.values())).ratios)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        c = report.comparisons[name]
        quality = "" if c.exact_match_difference is None else f", exact match {c.exact_match_difference:+.1%}"
        if c.perplexity_ratio is not None:
            quality += f", perplexity {c.perplexity_ratio:.2f}x"
        ax.bar([i + j * width for i in range(len(metrics))], [c.ratios[m] for m in metrics], width,
               label=f"{name}{quality}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(metrics))], metrics, fontsize=8)
    ax.set_ylabel("this bundle / the other")
    ax.legend(fontsize=8)
    fig.suptitle(f"{Path(report.bundle).name} vs {Path(next(iter(report.comparisons.values())).other).name}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _against(parity: ParityReport) -> str:
    if parity.reference == "float" or parity.float_top1_agreement is None:
        return ""
    return f" (against the quantized PyTorch model; {float_floor_note(parity)})"


def float_floor_note(parity: ParityReport) -> str:
    """The float model's top-1 and the floor it is held to, for a runtime against a quantized reference."""
    floor = "" if parity.float_top1_floor is None else f", floor {parity.float_top1_floor:.1%}"
    return (f"float model {parity.float_top1_agreement:.1%} on {', '.join(parity.float_prompt_tasks)} "
            f"text{floor}")
