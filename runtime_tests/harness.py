"""``validate(bundle, config)``: load each artifact in its real runtime and judge it.

Parity against PyTorch, task quality computed by the runtime, latency and memory. The
runtime half runs through a runner (this machine by default; devices/ brings others) and
needs only numpy and the runtime; references, tokenizers and comparisons stay here.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import importlib.util
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rankdown.atomic import check_report_folder
from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.compute_device import check_threads_here
from rankdown.datafiles import load_data
from rankdown.errors import RankdownError
from rankdown.evaluate import EvalConfig, first_line, greedy_answers, perplexity, token_windows
from rankdown.export.config import ExportConfig, Int4Rounding, Int4Scales, ParityThresholds, Quantize, is_share
from rankdown.export.factor_balance import balance_factors, equalize_head
from rankdown.export.formats import by_runtime, default_runtime_names
from rankdown.export.int4_gptq import GptqStatistics, gptq_windows
from rankdown.export.manifest import MANIFEST_FILE, Manifest, verify_files
from rankdown.export.parity import (
    GENERIC_TASKS,
    TorchDecoder,
    largest_difference,
    logit_agreement,
    parity_prompts,
    parity_tasks,
    position_percentile,
    torch_greedy,
    within,
)
from rankdown.int4_numerics import PER_CHANNEL
from rankdown.tasks import MIX, TASKS, Split, load_task
from rankdown.validate.comparison import compare, interleaved_latency, merged_latency
from rankdown.validate.config import LatencyPlan, QualityBounds, Runtime, ValidateConfig
from rankdown.validate.environment import environment
from rankdown.validate.local_runner import LocalRunner
from rankdown.validate.on_device import JOB_SCHEMA, task_answers
from rankdown.validate.report import (
    Comparison,
    LatencyReport,
    ParityReport,
    QualityReport,
    Report,
    RuntimeReport,
    Spread,
    fastest_threads,
    write_report,
)


def _runtimes(bundle: Path, manifest: Manifest, cfg: ValidateConfig) -> tuple[Runtime, ...]:
    held = [r for r in Runtime if r.value in default_runtime_names() and by_runtime(r).name in manifest.formats]
    chosen = cfg.runtimes or tuple(held)
    for runtime in chosen:
        if by_runtime(runtime).name not in manifest.formats:
            raise RankdownError(f"{bundle}: holds no {by_runtime(runtime).name} artifact for {runtime.value} "
                                f"(it has {', '.join(manifest.formats) or 'none'})")
        for need in by_runtime(runtime).needs:
            if need not in manifest.formats[by_runtime(runtime).name].files:
                raise RankdownError(f"{bundle}: {runtime.value} needs {need}, which this bundle does not have "
                                    f"(exported before rankdown wrote it; export again)")
    return chosen


def _check_artifacts(bundle: Path, manifest: Manifest, runtimes: tuple[Runtime, ...]) -> None:
    """Before any runtime opens an artifact: it is one the manifest hashed, it passes its format's
    file check (an ONNX model reads no byte outside the bundle, a .pte has a header this runtime
    reads), and every other file it reads is one the manifest hashed."""
    listed = set(manifest.all_files())
    root = bundle.resolve()
    for runtime in runtimes:
        spec = by_runtime(runtime)
        path = bundle / spec.artifact
        if spec.artifact not in listed:
            raise RankdownError(f"{path}: not listed in the manifest, so its bytes are unverified")
        for data in spec.module().check_file(path, bundle):
            rel = data.resolve().relative_to(root).as_posix()
            if rel not in listed:
                raise RankdownError(f"{path}: data it reads, {rel}, is not listed in the manifest, so its bytes "
                                    "are unverified")


def _check_report_dir(report_dir: Path | None, bundle: Path) -> None:
    if report_dir is None:
        return
    target, source = Path(report_dir).resolve(), bundle.resolve()
    if target == source or target.is_relative_to(source) or source.is_relative_to(target):
        raise RankdownError(f"{report_dir}: the report must not be written into, or around, the bundle {bundle}")
    check_report_folder(report_dir)


def _positions(bundle: Path, manifest: Manifest, runtimes: tuple[Runtime, ...]) -> int:
    """The positions every chosen artifact can hold (its format's ``positions``: the .pte's static
    cache, the ONNX model's trained context; None for no limit)."""
    limits = []
    for runtime in runtimes:
        spec = by_runtime(runtime)
        limits.append(spec.module().positions(bundle / spec.artifact, manifest.options) or 1 << 30)
    return min(limits)


def _format_bytes(manifest: Manifest, runtime: Runtime) -> int:
    """What a runtime's artifact weighs on disk: every file of its format (a .pte with its .ptd)."""
    return sum(f.bytes for f in manifest.formats[by_runtime(runtime).name].files.values())


def _other_bundle(other: Path, bundle: Path, runtimes: tuple[Runtime, ...], tokenizer,
                  cfg: ValidateConfig) -> Manifest:
    """The --compare bundle, checked as strictly as the bundle itself, before any work."""
    if cfg.latency is None:
        raise RankdownError("--compare times both bundles; leave out --no-latency")
    if other.resolve() == bundle.resolve():
        raise RankdownError(f"{other}: --compare needs another bundle than the one validated")
    manifest = Manifest.read(other)
    verify_files(other, manifest)
    for runtime in runtimes:
        if by_runtime(runtime).name not in manifest.formats:
            raise RankdownError(f"{other}: holds no {by_runtime(runtime).name} artifact to compare in {runtime.value}")
    _check_artifacts(other, manifest, runtimes)
    if load_tokenizer(other).get_vocab() != tokenizer.get_vocab():
        raise RankdownError(f"{other}: its tokenizer is not {bundle}'s, so the two cannot run the same prompts")
    return manifest


def _tokenizer_matches(tokenizer, reference_dir: Path, texts: list[str]) -> bool | None:
    """The bundle ships the tokenizer the reference was trained with: same vocabulary, same ids."""
    if not (reference_dir / "tokenizer.json").is_file():
        return None
    theirs = load_tokenizer(reference_dir)
    if tokenizer.get_vocab() != theirs.get_vocab():
        return False
    return all(tokenizer(t)["input_ids"] == theirs(t)["input_ids"] for t in texts)


def _check_installed(runtime: Runtime) -> None:
    module = by_runtime(runtime).runtime_module
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise RankdownError(f"runtime {runtime.value} is not installed here (no module {module})")


def _device_rounding(runner, artifact: Path):
    """Whether the device's onnxruntime rounds each kind of the graph's int4 nodes' input to int8,
    asked of the device in one run (its CPU, not this machine's, decides: MLAS has those kernels
    for AVX2, AVX512 and Arm's dot product only). None when the graph has no such node."""
    from rankdown.export.onnx_int4_reference import int8_input_kinds, rounding_probe

    probes = [rounding_probe(*kind) for kind in sorted(int8_input_kinds(artifact))]
    if not probes:
        return None
    job = {"schema_version": JOB_SCHEMA, "runtime": "onnxruntime", "artifact": artifact.name,
           "rounding_probes": [{"model": base64.b64encode(p.model).decode(), "x": p.x.tolist()} for p in probes]}
    with tempfile.TemporaryDirectory(prefix="rankdown-probe-") as empty:  # the probes need no bundle
        try:
            _, arrays = runner.run(job, Path(empty))
        except RankdownError as e:
            raise RankdownError(f"{artifact}: asking {getattr(runner, 'device', runner.name)} how its onnxruntime "
                                f"rounds int4 inputs failed: {e}") from None
    answers = {p.kind: p.rounds(arrays[f"probe_{i}"]) for i, p in enumerate(probes)}

    def rounds(bits: int, block: int, zero_points: bool) -> bool:
        if (bits, block, zero_points) not in answers:  # the nodes and the weights read differently
            raise RankdownError(f"{artifact}: a {bits}-bit node with blocks of {block} was not asked of the device")
        return answers[(bits, block, zero_points)]
    return rounds


def _lowered_model(model, record, manifest: Manifest, runtime: Runtime, bundle: Path, runner=None, tokenizer=None,
                   progress: Callable[[str], None] = lambda _: None):
    """The quantized PyTorch model ``runtime``'s artifact computes: for a format that quantizes the
    PyTorch model (ExecuTorch int4), rebuilt from the source as the export built it (balanced first
    if it was); for one that quantizes its graph (ONNX int4), the source with the graph's own
    weights read back, its int8 input rounding as the device's runtime does it (``runner``'s; None:
    this machine); None for fp32 and int8. ``tokenizer``: the bundle's, for the calibration text of
    GPTQ rounding (rerun as the export ran it, on the same text)."""
    spec = by_runtime(runtime)
    options = manifest.options
    read_back = getattr(spec.module(), "lowered_model", None)
    if read_back is not None:
        quantize = Quantize(options["quantize"])
        # this machine answers for itself inside the read-back; a device is asked here, in one run
        rounds = _device_rounding(runner, bundle / spec.artifact) \
            if runner is not None and runner.name != "local" and quantize is Quantize.INT4 else None
        return read_back(model, bundle / spec.artifact, quantize, rounds=rounds)
    quantize = getattr(spec.module(), "quantize", None)
    if quantize is None or Quantize(options["quantize"]) is not Quantize.INT4:  # int8 is quantized on the graph
        return None
    cfg = _int4_config(options, spec.name)
    source = model  # the quantizer works on its own copy; only rescaling needs one first
    if options.get("balance") or options.get("head_equalized"):
        source = copy.deepcopy(model)
    if options.get("balance"):
        balance_factors(source)
    if options.get("head_equalized"):
        equalize_head(source)
    calibration = None
    if any(cfg.gptq_parts):
        if tokenizer is None:
            raise ValueError("rebuilding GPTQ-rounded weights needs the bundle's tokenizer")
        tasks = _gptq_tasks(manifest)
        progress(f"reference for {runtime.value}: GPTQ rounding again on {', '.join(tasks)} calibration text, "
                 "as the export did")
        calibration = GptqStatistics(source, gptq_windows(tokenizer, tasks))
    quantized = quantize(source, record, cfg, progress=lambda _: None, calibration=calibration)
    if quantized is None:
        return None
    exported_summary = manifest.formats[spec.name].quantization or {}  # what the export recorded it did
    if misread := _odd_qc4w_ranks(exported_summary, quantized.summary, cfg.group):
        progress(f"warning: {bundle / spec.artifact}: {misread} factor rank(s) 4-bit per channel at an odd width, "
                 "which XNNPACK's qc4w kernels misread (exported before rankdown padded them to even, 2026-12-07): "
                 "export the checkpoint again")
    if calibration is not None:
        exported = (exported_summary.get("gptq") or {}).get("codes_sha256")
        if exported is not None:  # None: a bundle made before the digest
            same = quantized.summary["gptq"]["codes_sha256"] == exported
            # GPTQ's solves are float arithmetic: another CPU's BLAS may round a code the other way
            quantized.model.note = ("its GPTQ codes rebuilt identical to the export's" if same else
                                    "warning: its GPTQ codes rebuilt here differ from the export's (this machine's "
                                    "arithmetic, or an earlier rankdown's export: a 4-bit head is GPTQ-rounded, and an "
                                    "odd per-channel rank padded, since 2026-12-07), so the runtime is held to a near "
                                    "neighbour of the model it lowered")
    return quantized.model


def _odd_qc4w_ranks(exported: dict, rebuilt: dict, group: int) -> int:
    """How many factor ranks the export left at an odd width per channel, which today's export pads
    (int4_numerics.py ``QC4W_STEP``): the rebuild's padded ranks beyond the manifest's."""
    if group != PER_CHANNEL or "padded_ranks" not in exported:
        return 0
    return max(0, int(rebuilt.get("padded_ranks", 0)) - int(exported["padded_ranks"]))


def _int4_config(options: dict, fmt: str) -> ExportConfig:
    """The int4 export's recipe as the bundle's manifest recorded it (``options``), for format ``fmt``."""
    rounding = options.get("int4_rounding") or Int4Rounding.NEAREST  # nearest: bundles made before GPTQ rounding
    return ExportConfig(formats=fmt, quantize=options["quantize"], group_size=options["group_size"],
                        head_bits=options.get("head_bits") or 8,
                        int4_scales=options.get("int4_scales", Int4Scales.ABSMAX),  # absmax: bundles made before HQQ
                        int4_rounding=rounding,
                        # the decoder's: bundles made before the head had its own
                        head_rounding=options.get("head_rounding") or rounding)


def _gptq_tasks(manifest: Manifest) -> tuple[str, ...]:
    """The tasks on whose calibration text GPTQ chose the bundle's 4-bit codes (the float floor's:
    export --task, else the tasks the checkpoint was compressed for); () where GPTQ chose none."""
    options = manifest.options
    if options.get("quantize") != Quantize.INT4.value or not any(_int4_config(options, next(iter(manifest.formats))).gptq_parts):
        return ()
    return parity_tasks(manifest.source.compression, options.get("task"))


def _data(manifest: Manifest, cfg: ValidateConfig):
    if cfg.eval_file is not None:
        return load_data(cfg.eval_file), str(cfg.eval_file), None
    # the user's, else the one the bundle was exported for (export --task), else the one it was compressed for
    task = cfg.task or manifest.options.get("task") or (manifest.source.compression or {}).get("task") or "math"
    known = all(part in TASKS for part in task.split(MIX))
    if cfg.task is None and not known:
        raise RankdownError(f"{manifest.source.path} was compressed for {task}, not a built-in task (a calibration "
                            f"file, or a task this version does not know): give --task or --eval to say what to judge it on")
    if known:
        task = task.split(MIX)[0]  # compressed for a mix: its first task is the one judged
    return load_task(task, Split.EVALUATION), f"task {task} (evaluation split)", task


def _stop_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: EOS and any token whose text holds a newline."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token, index in tokenizer.get_vocab().items():
        if "\n" in tokenizer.convert_tokens_to_string([token]):
            stops.add(index)
    return sorted(stops)


def latency_job(tokenizer, plan: LatencyPlan, positions: int) -> dict:
    """The timing part of a job: real prose tokens as prompts, lengths that fit the artifact."""
    stream = [t for w in token_windows(tokenizer, load_task("prose", Split.EVALUATION).texts,
                                       EvalConfig(window=256, max_tokens=4096)) for t in w]
    lengths = [n for n in plan.prompt_lengths if n + 1 <= positions - 1] or [min(plan.prompt_lengths)]
    return {"prompt_tokens": stream[: max(lengths)], "prompt_lengths": lengths,
            "decode_tokens": min(plan.decode_tokens, positions - plan.decode_prompt_length - 2),
            "decode_prompt_length": plan.decode_prompt_length, "warmup": plan.warmup, "repeats": plan.repeats}


def _exported_thresholds(bundle: Path, manifest: Manifest) -> ParityThresholds:
    """The bundle's precision's bounds against the float model, with the top-1 floor it was exported
    with (``export --min-top1``, recorded in its options) if any."""
    floor = manifest.options.get("min_top1")
    if floor is not None and not is_share(floor):
        raise RankdownError(f"{bundle / MANIFEST_FILE}: options.min_top1 must be a share in (0, 1], got {floor!r}")
    return ParityThresholds.for_quantize(Quantize(manifest.options["quantize"])).with_floor(floor)


def validate(bundle: Path | str, cfg: ValidateConfig = ValidateConfig(), progress: Callable[[str], None] = print,
             runner=None) -> Report:
    bundle = Path(bundle)
    runner = runner or LocalRunner()
    manifest = Manifest.read(bundle)
    verify_files(bundle, manifest)  # refuse a bundle whose files are not the ones exported
    base = _exported_thresholds(bundle, manifest)
    runtimes = _runtimes(bundle, manifest, cfg)
    _check_artifacts(bundle, manifest, runtimes)
    _check_report_dir(cfg.report_dir, bundle)
    if runner.name == "local":  # a remote runner checks its own device
        for runtime in runtimes:
            _check_installed(runtime)
        check_threads_here("--threads", cfg.threads)
        check_threads_here("--sweep-threads", max(cfg.sweep_threads, default=None))
    reference_dir = Path(cfg.reference or manifest.source.path)
    if not reference_dir.is_dir():
        raise RankdownError(f"{bundle}: its source checkpoint {reference_dir} is gone; pass --reference MODEL")
    tokenizer = load_tokenizer(bundle)
    # A bad --compare bundle is refused before the reference model is loaded.
    other = Path(cfg.compare) if cfg.compare is not None else None
    other_manifest = None if other is None else _other_bundle(other, bundle, runtimes, tokenizer, cfg)
    data, data_name, task = _data(manifest, cfg)  # a missing task is a user mistake: before the model loads
    ckpt = open_checkpoint(reference_dir)
    model = load_model(ckpt).eval()

    max_rel = cfg.checks.max_rel_logit_diff if cfg.checks.max_rel_logit_diff is not None else base.max_rel_logit_diff
    min_top1 = cfg.checks.min_top1_agreement if cfg.checks.min_top1_agreement is not None else base.min_top1_agreement
    default_bounds = QualityBounds.for_quantize(Quantize(manifest.options["quantize"]))
    bounds = QualityBounds(
        default_bounds.max_exact_match_drop if cfg.checks.max_exact_match_drop is None
        else cfg.checks.max_exact_match_drop,
        default_bounds.max_perplexity_increase if cfg.checks.max_perplexity_increase is None
        else cfg.checks.max_perplexity_increase)
    positions = _positions(bundle, manifest, runtimes)
    greedy_tokens = min(cfg.checks.greedy_tokens, positions // 2)

    progress(f"reference: PyTorch {reference_dir}")
    room = positions - greedy_tokens - 1
    prompts = parity_prompts(tokenizer, room=room)
    reference = [torch_greedy(model, p, greedy_tokens) for p in prompts]
    # A runtime whose artifact was lowered from a quantized PyTorch model (ExecuTorch int4) is held
    # against that model; the float model then sets only a top-1 floor, and quality judges the rest.
    references = {runtime: reference for runtime in runtimes}
    # That floor is judged on the text of the bundle's task (export --task, else the tasks the checkpoint was
    # compressed for), as the export judged it.
    floor_tasks = parity_tasks(manifest.source.compression, manifest.options.get("task"))
    floor_prompts, floor_reference = prompts, reference
    qa = data.qa[: cfg.max_examples]
    # What every runtime (and a quantized PyTorch reference) answers: the same prompts, budgets, stops.
    quality_job = {"prompts": [tokenizer(ex.prompt)["input_ids"] for ex in qa],
                   "budgets": [len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + 2 for ex in qa],
                   "stop_ids": _stop_ids(tokenizer)}
    # The task's exact match with the bundle's quantized weights in PyTorch: what quantizing cost,
    # told apart from what the runtime adds. The bound still holds the runtime to the float model.
    quantized_em: dict[Runtime, float] = {}
    for runtime in runtimes:
        lowered = _lowered_model(model, ckpt.record, manifest, runtime, bundle, runner, tokenizer, progress)
        if lowered is not None:
            note = getattr(lowered, "note", None)
            rounded = getattr(lowered, "rounded_inputs", None)
            where = "this machine's" if runner.name == "local" else f"{getattr(runner, 'device', runner.name)}'s"
            progress(f"reference for {runtime.value}: PyTorch with the bundle's {manifest.options['quantize']} weights"
                     + ("" if rounded is None else f", {rounded} linear input(s) rounded to int8 as {where} "
                        "onnxruntime does") + (f"; {note}" if note else ""))
            references[runtime] = [torch_greedy(lowered, p, greedy_tokens) for p in prompts]
            answers = task_answers(TorchDecoder(lowered), quality_job["prompts"], quality_job["budgets"],
                                   set(quality_job["stop_ids"]))
            em = _exact_match(tokenizer, answers, qa)  # None without problems
            if em is not None:
                quantized_em[runtime] = em
                progress(f"reference for {runtime.value}: exact match {em:.1%} with those weights")
            del lowered
            if floor_tasks != GENERIC_TASKS and floor_prompts is prompts:
                floor_prompts = parity_prompts(tokenizer, room=room, tasks=floor_tasks)
                # only their prompt logits are judged (top-1), as in export
                floor_reference = [torch_greedy(model, p, 1) for p in floor_prompts]
    tokenizer_ok = _tokenizer_matches(tokenizer, reference_dir, [tokenizer.decode(p) for p in prompts])
    eval_cfg = EvalConfig(window=min(256, positions - 1), max_tokens=cfg.max_tokens, max_examples=cfg.max_examples)
    windows = token_windows(tokenizer, data.texts, eval_cfg) if data.texts else []
    ref_em = None
    if qa:
        answers = greedy_answers(model, tokenizer, qa, batch_size=64)
        ref_em = sum(a == ex.answer for a, ex in zip(answers, qa)) / len(qa)
    ref_ppl = perplexity(model, tokenizer, data.texts, eval_cfg)[0] if windows else None
    progress(f"reference: exact match {'n/a' if ref_em is None else f'{ref_em:.1%}'}, perplexity "
             f"{'n/a' if ref_ppl is None else f'{ref_ppl:.3f}'} on {data_name}")

    job_base = {"schema_version": JOB_SCHEMA, "threads": cfg.threads,
                "quality": dict(quality_job, windows=windows)}
    timing = None
    if cfg.latency is not None:
        # Both bundles run the same timed prompts, so they must fit the smaller of the two.
        room_both = positions if other is None or other_manifest is None else \
            min(positions, _positions(other, other_manifest, runtimes))
        timing = latency_job(tokenizer, cfg.latency, room_both)
        if other is None:  # with --compare, both bundles are timed afterwards, interleaved
            job_base["latency"] = timing

    reports: dict[str, RuntimeReport] = {}
    comparisons: dict[str, Comparison] = {}
    results = []
    for runtime in runtimes:
        artifact = by_runtime(runtime).artifact
        progress(f"{runtime.value}: running {artifact} via {runner.name}")
        ref = references[runtime]
        # The same sequences again as one prompt each (prompt + the reference's greedy tokens): the
        # runtime's logits without its cache, to hold against its cached decode.
        uncached = [(p + list(r.tokens[:-1]))[:room] for p, r in zip(prompts, ref)]
        # then, against a lowering reference, the float floor's own prompts when they are other text
        floor = [] if ref is reference or floor_prompts is prompts else floor_prompts
        # Only the first prompts' continuations are judged; the rest give their prompt logits.
        parity_job = {"prompts": prompts + uncached + floor,
                      "new_tokens": [greedy_tokens] * len(prompts) + [1] * (len(uncached) + len(floor))}
        result, arrays = runner.run(dict(job_base, runtime=runtime.value, artifact=artifact, parity=parity_job), bundle)
        results.append(result)
        checks: ParityChecks
        if ref is reference:
            checks = ParityChecks(dataclasses.replace(base, max_rel_logit_diff=max_rel, min_top1_agreement=min_top1), None)
        else:
            lowering = ParityThresholds.lowering(by_runtime(runtime).lowering_p95)
            if cfg.checks.max_rel_logit_diff is not None:  # the user's bound replaces both logit bounds
                lowering = dataclasses.replace(lowering, max_rel_logit_diff=max_rel, max_rel_p95_logit_diff=math.inf)
            if cfg.checks.min_top1_agreement is not None:
                lowering = dataclasses.replace(lowering, min_top1_agreement=min_top1)
            checks = ParityChecks(lowering, FloatFloor(
                floor_reference, base.min_top1_agreement if cfg.checks.min_top1_agreement is None
                else min(base.min_top1_agreement, cfg.checks.min_top1_agreement),
                2 * len(prompts) if floor else 0, floor_tasks if floor else GENERIC_TASKS))
        reports[runtime.value] = _judge(runtime, result, arrays, ref, [len(p) for p in prompts], tokenizer,
                                        qa, (ref_em, quantized_em.get(runtime), ref_ppl), checks, bounds, cfg, runner,
                                        _format_bytes(manifest, runtime), task=task, gptq_tasks=_gptq_tasks(manifest))
        if other is not None and other_manifest is not None and timing is not None and cfg.latency is not None:
            reports[runtime.value], comparisons[runtime.value] = _compare(
                runtime, reports[runtime.value], (bundle, manifest), (other, other_manifest), job_base, timing,
                tokenizer, qa, cfg, runner, progress)
        if cfg.sweep_threads and timing is not None and cfg.latency is not None:
            reports[runtime.value] = _sweep_threads(runtime, reports[runtime.value], bundle, manifest, timing, cfg,
                                                    runner, progress)
        r = reports[runtime.value]
        progress(f"{runtime.value}: " + ("passed" if r.passed else
                                         f"FAILED {', '.join(r.failures)}; largest |logit diff| "
                                         f"{r.parity.max_abs_logit_diff:.3g} at {r.parity.max_diff_at}"))
    failures = [f for r in reports.values() for f in r.failures]
    if tokenizer_ok is False:
        failures.append("tokenizer.matches_reference")
    report = Report(bundle=str(bundle), reference=str(reference_dir), data=data_name, runtimes=reports,
                    environment=environment(runner, results, cfg.threads), passed=not failures, failures=failures,
                    tokenizer_matches_reference=tokenizer_ok, comparisons=comparisons)
    if cfg.report_dir is not None:
        write_report(report, cfg.report_dir)
    return report


def _compare(runtime: Runtime, this: RuntimeReport, mine: tuple[Path, Manifest], theirs: tuple[Path, Manifest],
             job_base: dict, timing: dict, tokenizer, qa, cfg: ValidateConfig, runner,
             progress: Callable[[str], None]) -> tuple[RuntimeReport, Comparison]:
    """The other bundle's quality in this runtime on the same data, then both timed interleaved."""
    assert cfg.latency is not None
    artifact = by_runtime(runtime).artifact
    base = {"schema_version": JOB_SCHEMA, "threads": cfg.threads, "runtime": runtime.value, "artifact": artifact}
    progress(f"{runtime.value}: quality of {theirs[0] / artifact} on the same data")
    result, _ = runner.run(dict(base, quality=job_base["quality"]), theirs[0])
    quality = QualityReport(exact_match=_exact_match(tokenizer, result["answers"], qa), examples=len(qa),
                            perplexity=result.get("perplexity"), tokens=result.get("perplexity_tokens", 0),
                            reference_exact_match=None, reference_perplexity=None, seconds=result.get("quality_s", 0.0))
    progress(f"{runtime.value}: timing {mine[0]} and {theirs[0]} interleaved, {cfg.latency.repeats} rounds")
    timed = interleaved_latency(lambda job, folder: runner.run(job, folder)[0],
                                [(dict(base, latency=timing), mine[0]), (dict(base, latency=timing), theirs[0])],
                                cfg.latency, progress)
    ours, other = (merged_latency(runs, _format_bytes(manifest, runtime), cfg.threads, not runner.emulated)
                   for runs, (_, manifest) in zip(timed, (mine, theirs)))
    return dataclasses.replace(this, latency=ours), compare(theirs[0], ours, other, this.quality, quality)


def _sweep_threads(runtime: Runtime, this: RuntimeReport, bundle: Path, manifest: Manifest, timing: dict,
                   cfg: ValidateConfig, runner, progress: Callable[[str], None]) -> RuntimeReport:
    """The bundle timed at each of ``cfg.sweep_threads``, interleaved (one timed repeat per process,
    the counts alternating), as --compare times two bundles."""
    assert cfg.latency is not None
    base = {"schema_version": JOB_SCHEMA, "runtime": runtime.value, "artifact": by_runtime(runtime).artifact,
            "latency": timing}
    counts = cfg.sweep_threads
    progress(f"{runtime.value}: timing at {', '.join(map(str, counts))} threads interleaved, {cfg.latency.repeats} rounds")
    timed = interleaved_latency(lambda job, folder: runner.run(job, folder)[0],
                                [(dict(base, threads=n), bundle) for n in counts], cfg.latency, progress)
    sweep = [merged_latency(runs, _format_bytes(manifest, runtime), n, not runner.emulated)
             for runs, n in zip(timed, counts, strict=True)]
    progress(f"{runtime.value}: decode " + ", ".join(f"{lat.decode_tokens_per_s.median:.1f} tok/s at {lat.threads}"
                                                     for lat in sweep)
             + f" threads; fastest at {fastest_threads(sweep)}")
    return dataclasses.replace(this, thread_sweep=sweep)


def _exact_match(tokenizer, answers: list[list[int]], qa) -> float | None:
    if not qa:
        return None
    texts = [first_line(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in answers]
    return sum(t == ex.answer for t, ex in zip(texts, qa)) / len(qa)


def _continuations(arrays, reference, prompt_lengths) -> list[tuple[np.ndarray, np.ndarray]]:
    """(runtime without its cache, PyTorch with its cache) logits over each greedy continuation: the
    runtime ran prompt + PyTorch's greedy tokens as one prompt, so position length - 1 + k holds
    the logits token k was chosen from."""
    n = len(reference)
    pairs = []
    for i, (ref, length) in enumerate(zip(reference, prompt_lengths)):
        got = arrays[f"prompt_{n + i}"][length - 1:][: len(ref.step_logits)]
        pairs.append((got, ref.step_logits[: len(got)]))
    return pairs


class FloatFloor(NamedTuple):
    """The float model's top-1 floor for a runtime held against a quantized reference."""

    reference: list  # the float model's generations on the floor's prompts
    min_top1: float
    first: int  # the index in the runtime's job of the first of those prompts
    tasks: tuple[str, ...]  # whose text the prompts are


class ParityChecks(NamedTuple):
    """What a runtime's logits are held to: the export's bounds (``--max-rel-logit-diff`` and
    ``--min-top1`` applied), and the float model's top-1 floor when the reference is quantized."""

    bounds: ParityThresholds
    float_floor: FloatFloor | None  # None when the reference is the float model itself


def float_top1(arrays: dict, floor: FloatFloor) -> float:
    """The runtime's top-1 agreement with the float model on the floor's prompts (its job's
    ``prompt_{first + i}`` logits)."""
    return logit_agreement([(arrays[f"prompt_{floor.first + i}"], ref.prompt_logits)
                            for i, ref in enumerate(floor.reference)])[2]


def _judge(runtime, result, arrays, reference, prompt_lengths, tokenizer, qa,
           pytorch: tuple[float | None, float | None, float | None], checks: ParityChecks,
           bounds: QualityBounds, cfg: ValidateConfig, runner, size_bytes: int, task: str | None = None,
           gptq_tasks: tuple[str, ...] = ()) -> RuntimeReport:
    """``pytorch``: the float model's exact match, the quantized reference's (None without one) and
    the float model's perplexity, on the same data; ``task``: the built-in task judged (None: a file);
    ``gptq_tasks``: those the 4-bit codes were calibrated on."""
    ref_em, quantized_em, ref_ppl = pytorch
    float_check, b = checks.float_floor, checks.bounds
    name = runtime.value
    n = len(reference)
    continuations = _continuations(arrays, reference, prompt_lengths)
    # Prompt positions and continuation positions alike: a small error anywhere counts.
    pairs = [(arrays[f"prompt_{i}"], ref.prompt_logits) for i, ref in enumerate(reference)] + continuations
    max_diff, scale, top1, count = logit_agreement(pairs, b.top1_tie)
    strict = logit_agreement(pairs)[2] if b.top1_tie else None
    p95 = position_percentile(pairs)
    at_pair, at_position, at_token, _ = largest_difference(pairs)
    if at_pair >= n:
        at_pair, at_position = at_pair - n, at_position + prompt_lengths[at_pair - n] - 1
    where = (f"prompt {at_pair} position {at_position} token {at_token} "
             f"({tokenizer.convert_ids_to_tokens(at_token)!r})")
    cache_diff = max(float(np.abs(got - want).max()) for got, want in continuations)
    # The runtime's own top-1 without its cache must be the tokens it produced with its cache.
    cache_ok = all([int(t) for t in got.argmax(-1)] == list(cached[: len(got)])
                   for (got, _), cached in zip(continuations, result["parity_tokens"]))
    greedy_ok = all(list(ref.tokens) == got for ref, got in zip(reference, result["parity_tokens"]))
    floor_top1 = None if float_check is None else float_top1(arrays, float_check)
    parity = ParityReport(greedy_match=greedy_ok, greedy_tokens=len(reference[0].tokens), max_abs_logit_diff=max_diff,
                          logit_scale=scale, top1_agreement=top1, positions=count, max_diff_at=where,
                          cache_max_abs_logit_diff=cache_diff, cache_consistent=cache_ok,
                          reference="float" if float_check is None else "quantized", float_top1_agreement=floor_top1,
                          p95_abs_logit_diff=p95, float_prompt_tasks=() if float_check is None else float_check.tasks,
                          top1_tie=b.top1_tie, strict_top1_agreement=strict,
                          float_top1_floor=None if float_check is None else float_check.min_top1)
    em = _exact_match(tokenizer, result["answers"], qa)
    quality = QualityReport(exact_match=em, examples=len(qa), perplexity=result.get("perplexity"),
                            tokens=result.get("perplexity_tokens", 0), reference_exact_match=ref_em,
                            reference_perplexity=ref_ppl, seconds=result.get("quality_s", 0.0),
                            quantized_reference_exact_match=quantized_em, task=task, gptq_tasks=gptq_tasks)
    latency = None
    if "latency" in result:
        lat = result["latency"]
        latency = LatencyReport(ttft_ms={k: Spread(**v) for k, v in lat["ttft_ms"].items()},
                                decode_tokens_per_s=Spread(**lat["decode_tokens_per_s"]), load_s=result["load_s"],
                                peak_rss_mb=result["peak_rss_mb"], size_bytes=size_bytes,
                                threads=cfg.threads, meaningful=not runner.emulated)
    failures = []
    if b.greedy_must_match and not greedy_ok:
        failures.append(f"{name}.parity.greedy_match")
    if not within(max_diff, b.max_rel_logit_diff, scale):
        failures.append(f"{name}.parity.max_abs_logit_diff")
    if not within(p95, b.max_rel_p95_logit_diff, scale):
        failures.append(f"{name}.parity.p95_abs_logit_diff")
    if parity.top1_agreement < b.min_top1_agreement:
        failures.append(f"{name}.parity.top1_agreement")
    if strict is not None and strict < b.min_strict_top1:
        failures.append(f"{name}.parity.strict_top1_agreement")
    if float_check is not None and floor_top1 is not None and floor_top1 < float_check.min_top1:
        failures.append(f"{name}.parity.float_top1_agreement")
    # int8 quantizes activations per call, so a prompt and a token-by-token decode may round to
    # different top-1s; there the logit bound above is the cache check.
    if b.greedy_must_match and not cache_ok:
        failures.append(f"{name}.parity.cache_consistency")
    if em is not None and ref_em is not None and em < ref_em - bounds.max_exact_match_drop:
        failures.append(f"{name}.quality.exact_match")
    if quality.perplexity is not None and ref_ppl is not None and \
            quality.perplexity > ref_ppl * (1 + bounds.max_perplexity_increase):
        failures.append(f"{name}.quality.perplexity")
    runner = {"native": "rankdown-et-runner (C++)", "python": f"Python {runtime.value}"}.get(result.get("runner"), "")
    return RuntimeReport(artifact=by_runtime(runtime).artifact, parity=parity, quality=quality, latency=latency,
                         failures=failures, passed=not failures,
                         executed_on=", ".join(x for x in (result.get("machine"), runner) if x))
