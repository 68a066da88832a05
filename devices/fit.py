"""Budget-driven export: the compression ratio (and int8 or not) that fits a device's memory
budget with the best task score; exported, validated on the device, the choice reported.

Memory a candidate needs on the device = its weights as the runtime holds them (fp32, or int8
with a scale per output channel for every linear) + the KV cache at the export's
``max_seq_len``; the runtime's own code is not counted (the profile's ``memory_mb`` is the
budget for the model). Scores are PyTorch exact match on the task's evaluation split, one
compression per ratio; an int8 candidate carries its ratio's fp32 score until the device
validation measures it (validate fails a bundle whose exact match trails PyTorch by more
than ``Checks.max_exact_match_drop``), and then the next candidate is tried.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from rankdown.atomic import atomic_folder, check_output_path, write_text_atomic
from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.compress.config import CompressConfig, Healing
from rankdown.compress.pipeline import compress
from rankdown.devices.fit_config import FitConfig
from rankdown.devices.profile import DeviceProfile, ExecuTorchRunner
from rankdown.devices.runners import runner_for
from rankdown.errors import ParityError, RankdownError
from rankdown.evaluate import EvalConfig, evaluate
from rankdown.export.config import DEFAULT_GROUP, ExportConfig, Quantize
from rankdown.export.formats import by_runtime
from rankdown.export.manifest import MANIFEST_FILE, Manifest
from rankdown.export.pipeline import export
from rankdown.tasks import Split, load_task
from rankdown.validate.config import Runtime, ValidateConfig
from rankdown.validate.harness import validate
from rankdown.validate.report import write_report

FIT_FILE = "fit.json"
FIT_SCHEMA_VERSION = 1

@dataclass(frozen=True)
class Candidate:
    ratio: float
    quantize: str
    params: int  # every parameter of the model
    memory_mb: float  # weights as the runtime holds them + KV cache
    score: float | None  # exact match (PyTorch fp32)
    fits: bool
    meets_min_score: bool


@dataclass(frozen=True)
class FitReport:
    schema_version: int
    device: str
    budget_mb: float
    task: str
    method: str
    candidates: list[Candidate]
    chosen: Candidate | None
    bundle: str | None
    validation_passed: bool | None
    validation_failures: list[str]
    tried: list[str]  # candidates exported and validated (or refused by the export's self-check), in order

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


# 4-bit codes and a float scale per group of the export's default size (onnxruntime holds the file's
# fp16 block scales as fp32 once loaded; XNNPACK packs bf16 ones: the larger is budgeted)
INT4_BYTES_PER_WEIGHT = 0.5 + 4 / DEFAULT_GROUP


def memory_mb(model, quantize: Quantize, max_seq_len: int, packed_twice: bool = False) -> float:
    """Weights the runtime holds (int8: 1 byte a linear weight + a float scale per output
    channel; a tied head becomes its own int8 copy; int4: the decoder linears at
    ``INT4_BYTES_PER_WEIGHT``, the head and the token table 8-bit per row, a tied table once, as
    the ExecuTorch export stores them (ONNX's 4-bit table is smaller)) + an fp32 KV cache of
    ``max_seq_len``. ``packed_twice``: ExecuTorch's Python runtime packs the linears' weights once
    for each method, so a quantized .pte's ``decode_step`` (on by default) holds a second copy
    (rankdown-et-runner shares one through XNNPACK's weight cache)."""
    c = model.config
    weights = sum(p.numel() for p in model.parameters()) * 4  # tied and shared weights once
    embedding = getattr(model.get_input_embeddings(), "weight", None)  # None: a factored table
    linears = {id(m): m for m in model.modules() if isinstance(m, nn.Linear)}.values()
    linear_bytes = 0.0  # the linears' weights as the runtime holds them
    if quantize is Quantize.INT8:
        for linear in linears:
            w = linear.weight
            weights += w.shape[0] * 4 + (w.numel() if w is embedding else -3 * w.numel())
            linear_bytes += w.numel() + w.shape[0] * 4
    elif quantize is Quantize.INT4:
        head = model.get_output_embeddings()
        head_weights = {id(m.weight) for m in head.modules() if isinstance(m, nn.Linear)} if head is not None else set()
        for linear in linears:
            w = linear.weight
            held = w.numel() + w.shape[0] * 4 if id(w) in head_weights else INT4_BYTES_PER_WEIGHT * w.numel()
            weights -= 4 * w.numel() - held
            linear_bytes += held
        if embedding is not None and id(embedding) not in head_weights:  # an untied table, 8-bit
            weights -= 3 * embedding.numel() - embedding.shape[0] * 4
    else:
        linear_bytes = sum(4 * m.weight.numel() for m in linears)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * max_seq_len * 4
    return (weights + (linear_bytes if packed_twice else 0) + kv) / 2**20


def packs_twice(profile: DeviceProfile, quantize: Quantize) -> bool:
    """Whether the device's ExecuTorch runtime holds a second packed copy of the weights: the Python
    runtime, for a quantized .pte, which has ``decode_step`` by default (export's ``wants_decode_method``)."""
    return (Runtime("executorch") in profile.runtimes and profile.executorch_runner is ExecuTorchRunner.PYTHON
            and quantize is not Quantize.NONE)


PRECISION_ORDER = (Quantize.NONE.value, Quantize.INT8.value, Quantize.INT4.value)


def rank_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Best first: every fp32 and int8 candidate before any int4 one (int4 carries the float model's
    score, which 4-bit rounding moves more than validation's int8 bound would allow, so it is the
    fallback where nothing else fits); within each, highest score, then fp32 before int8, then smaller."""
    return sorted((c for c in candidates if c.fits and c.meets_min_score),
                  key=lambda c: (c.quantize == Quantize.INT4.value, -(c.score or 0.0),
                                 PRECISION_ORDER.index(c.quantize), c.memory_mb))


def fit(model_dir: Path | str, out: Path | str, profile: DeviceProfile, cfg: FitConfig = FitConfig(),
        progress: Callable[[str], None] = print) -> FitReport:
    """Search, export and validate; ``out`` gets ``bundle/``, ``checkpoint/`` (when compressed),
    ``validation/`` and ``fit.json``, or nothing on failure."""
    model_dir, out = Path(model_dir), Path(out)
    check_output_path(out, [model_dir], cfg.overwrite)
    open_checkpoint(model_dir)  # a missing or broken model is named before any work
    budget = cfg.max_memory_mb or float(profile.memory_mb)
    formats = tuple(by_runtime(r).name for r in profile.runtimes)
    data = load_task(cfg.task, Split.EVALUATION)
    if not data.qa:
        raise RankdownError(f"fit scores by exact match; task {cfg.task} has no question/answer pairs")
    tokenizer = load_tokenizer(model_dir)
    with atomic_folder(out, cfg.overwrite) as staged:
        work = staged / "candidates"
        work.mkdir()
        checkpoints, candidates = {}, []
        for ratio in sorted(set(cfg.ratios)):
            if ratio == 0:
                checkpoints[ratio] = model_dir
            else:
                progress(f"fit: compressing with {cfg.method.value} at ratio {ratio}")
                checkpoints[ratio] = work / f"ratio-{ratio}"
                compress(model_dir, checkpoints[ratio], CompressConfig(method=cfg.method, ratio=ratio, task=cfg.task,
                                                                  healing=Healing(steps=cfg.heal_steps)),
                         progress=lambda _m: None)
            model = load_model(open_checkpoint(checkpoints[ratio])).eval()
            score = evaluate(model, tokenizer, data, EvalConfig(max_examples=cfg.max_examples, max_tokens=0)).exact_match
            assert score is not None, "fit's tasks are exact-match tasks"
            for q in cfg.quantize:
                need = memory_mb(model, q, cfg.max_seq_len, packed_twice=packs_twice(profile, q))
                candidates.append(Candidate(ratio, q.value, sum(p.numel() for p in model.parameters()), round(need, 2),
                                            score, need <= budget, cfg.min_score is None or score >= cfg.min_score))
                progress(f"fit: ratio {ratio} {q.value:<4} needs {need:7.1f} MB of {budget:.0f}, exact match {score:.1%}")
            del model
        ranked = rank_candidates(candidates)
        if not ranked:
            best = max((c for c in candidates if c.fits), key=lambda c: c.score or 0, default=None)
            why = (f"nothing fits {budget:.0f} MB (the smallest candidate needs "
                   f"{min(c.memory_mb for c in candidates):.1f} MB)") if best is None else \
                  (f"the best that fits {budget:.0f} MB scores {best.score:.1%} (ratio {best.ratio}, {best.quantize}), "
                   f"below --min-score {cfg.min_score:.1%}")
            raise RankdownError(f"{model_dir}: no candidate for {profile.name}: {why}")
        tried = []
        kept = None  # the last candidate that exported: (choice, bundle, its validation)
        for choice in ranked:
            label = f"ratio {choice.ratio} {choice.quantize}"
            progress(f"fit: exporting {label} and validating it on {profile.name}")
            bundle = work / f"bundle-{choice.ratio}-{choice.quantize}"
            try:
                # int4's rounding is calibrated on the task it is judged on (a dense candidate has no task of its own)
                task = cfg.task if choice.quantize == Quantize.INT4.value else None
                export(checkpoints[choice.ratio], bundle, ExportConfig(formats=formats, quantize=choice.quantize,
                                                                       max_seq_len=cfg.max_seq_len, task=task),
                       progress=lambda _m: None)
            except ParityError as error:  # this candidate's artifact is refused (nothing written); try the next
                tried.append(f"{label}: FAILED the export's self-check: {error.reason}")
                progress(f"fit: {tried[-1]}")
                continue
            report = validate(bundle, ValidateConfig(runtimes=profile.runtimes, task=cfg.task,
                                                     max_examples=cfg.max_examples, threads=profile.threads,
                                                     latency=None),
                              progress=lambda _m: None, runner=runner_for(profile))
            kept = choice, bundle, report
            tried.append(f"{label}: {'passed' if report.passed else 'FAILED ' + ', '.join(report.failures)}")
            progress(f"fit: {tried[-1]}")
            if report.passed:
                break
        if kept is None:
            raise RankdownError(f"{model_dir}: no candidate for {profile.name} passed the export's self-check "
                                f"({len(tried)} tried; the first: {tried[0]})")
        choice, bundle, report = kept
        # The folder as it stays: the chosen bundle, its checkpoint (when compressed), the reports.
        source = model_dir
        if choice.ratio != 0:
            shutil.move(str(checkpoints[choice.ratio]), staged / "checkpoint")
            source = out / "checkpoint"
        shutil.move(str(bundle), staged / "bundle")
        manifest = Manifest.read(staged / "bundle")
        write_text_atomic(staged / "bundle" / MANIFEST_FILE, dataclasses.replace(
            manifest, source=dataclasses.replace(manifest.source, path=str(source.resolve()))).to_json())
        shutil.rmtree(work)
        write_report(dataclasses.replace(report, bundle=str(out / "bundle"), reference=str(source)),
                     staged / "validation")
        result = FitReport(FIT_SCHEMA_VERSION, profile.name, budget, cfg.task, cfg.method.value, candidates, choice,
                           str(out / "bundle"), report.passed, list(report.failures), tried)
        result.write(staged / FIT_FILE)
    return result
