"""``export(checkpoint, bundle, config)``: one bundle folder with every asked format, checked.

Bundle layout (its manifest is the authority on what is inside):
    manifest.json            written last; sizes and sha256 of every file below
    tokenizer.json, ...      the source's tokenizer files
    onnx/model.onnx          + config.json, generation_config.json (ORTModelForCausalLM loads onnx/),
                             genai_config.json + tokenizer copies (onnxruntime_genai.Model loads onnx/)
    executorch/model.pte     XNNPACK-lowered, static KV cache, LLM-runner metadata methods
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from pathlib import Path

from rankdown.atomic import (
    atomic_folder,
    check_free_space,
    check_output_path,
    write_text_atomic,
)
from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.errors import ParityError, RankdownError
from rankdown.export.bundle_tokenizer import TOKENIZER_FILE, check_texts, write_bundle_tokenizer
from rankdown.export.config import (
    DEFAULT_GROUP,
    GROUP_SIZES,
    ExportConfig,
    Format,
    Int4Rounding,
    Int4Scales,
    ParityThresholds,
    Quantize,
)
from rankdown.export.factor_balance import balance_factors, equalize_head
from rankdown.export.formats import FormatSpec, by_format
from rankdown.export.int4_gptq import KEEP_MARGIN, KEPT_FOLDER, GptqStatistics, gptq_memory, gptq_windows, kept_bytes
from rankdown.export.manifest import (
    MANIFEST_FILE,
    FormatEntry,
    Manifest,
    ModelSummary,
    Parity,
    SourceModel,
    file_entries,
    sha256_file,
)
from rankdown.export.parity import (
    GENERIC_TASKS,
    describe_failure,
    judge,
    parity_prompts,
    parity_tasks,
    run,
    top1_note,
    torch_greedy,
)
from rankdown.export.tied_embeddings import check_stored_once, tied_table
from rankdown.factor_record import HEAD, RECORD_FILE
from rankdown.info import model_info
from rankdown.int4_numerics import group_label, group_option
from rankdown.memory import peak_rss_mb, require_memory
from rankdown.output_lock import exclusive_output
from rankdown.schema import read_json_file
from rankdown.versions import package_versions

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_VERSIONED = ("rankdown", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-genai",
              "executorch", "torchao")


def _versions() -> dict[str, str]:
    return package_versions(_VERSIONED)


def _source(ckpt, compression: dict | None) -> SourceModel:
    import hashlib

    names = [p for p in ckpt.weight_files] + [ckpt.folder / "config.json"]
    if (ckpt.folder / RECORD_FILE).exists():
        names.append(ckpt.folder / RECORD_FILE)
    files = {p.name: sha256_file(p) for p in sorted(names)}
    combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    return SourceModel(path=str(ckpt.folder.resolve()), sha256=combined, files=files,
                       factorized=bool(ckpt.record.modules), compression=compression)


def _compression(folder: Path) -> dict | None:
    """The checkpoint's compression.json as read, or None for a dense (or hand-made) checkpoint."""
    report = folder / "compression.json"
    raw = read_json_file(report, "compression report") if report.is_file() else None
    return raw if isinstance(raw, dict) else None


def healed_for_int4(compression: Path | dict | None) -> bool:
    """Whether ``compress --heal-quantize int4`` (or ``8da4w``) trained this checkpoint (its folder, or its
    compression.json as read): its factors were balanced and then trained through the 4-bit weights
    of their current scales, which balancing again would move (a dense or older checkpoint was not)."""
    if isinstance(compression, Path):
        compression = _compression(compression)
    healing = (compression or {}).get("healing")
    return isinstance(healing, dict) and healing.get("quantize") in ("int4", "8da4w")


def healed_group(compression: dict | None) -> int | None:
    """The int4 group a checkpoint was healed through (compression.json), None if not recorded."""
    group = ((compression or {}).get("healing") or {}).get("group_size")
    return group if isinstance(group, int) and group in GROUP_SIZES else None


def resolve_quantize(cfg: ExportConfig, compression: dict | None, progress: Callable[[str], None]) -> ExportConfig:
    """``cfg`` with ``quantize`` set: the user's, else int4 for a checkpoint healed through the 4-bit
    weights (``compression``: its compression.json as read), which its float model no longer matches
    (SmolLM2 for compare: 95% exact match as int4, 82% in float), or compressed for a 4-bit bundle
    (``compress --weights int4``, healed or not), else none."""
    if cfg.quantize is not None:
        return cfg
    if healed_for_int4(compression):
        progress("int4: the checkpoint was healed through the 4-bit weights (--quantize none exports it in float)")
        return dataclasses.replace(cfg, quantize=Quantize.INT4)
    if (compression or {}).get("weights") == "int4":
        progress("int4: the checkpoint was compressed with --weights int4 (--quantize none exports it in float)")
        return dataclasses.replace(cfg, quantize=Quantize.INT4)
    if cfg.min_top1 is not None:
        raise RankdownError("--min-top1 applies to a quantized export (this checkpoint exports in float unless "
                            "--quantize int8 or int4 is given)")
    given = {"--head-bits": cfg.head_bits not in (None, 8), "--group-size": cfg.group_size is not None,
             "--int4-scales": cfg.int4_scales is not None, "--int4-rounding": cfg.int4_rounding is not None,
             "--task": cfg.task is not None,
             "--no-balance": not cfg.balance}
    int4_only = [flag for flag, was_given in given.items() if was_given]
    if int4_only:
        verb = "applies" if len(int4_only) == 1 else "apply"
        raise RankdownError(f"{' and '.join(int4_only)} {verb} to --quantize int4 only (this checkpoint exports in "
                            "float unless --quantize int4 is given)")
    return dataclasses.replace(cfg, quantize=Quantize.NONE)


def _resolve_group(cfg: ExportConfig, healed: dict | None, progress: Callable[[str], None]) -> ExportConfig:
    """``cfg`` with its int4 group set: the user's, else the group ``healed`` (the compression report
    of a checkpoint healed through the 4-bit weights, or None) was trained in, else DEFAULT_GROUP."""
    if cfg.quantize is not Quantize.INT4:
        return cfg
    trained = healed_group(healed)
    if cfg.group_size is None:
        if trained is not None and trained != DEFAULT_GROUP:
            progress(f"int4 scales {group_label(trained)}: as the checkpoint was healed")
        return dataclasses.replace(cfg, group_size=DEFAULT_GROUP if trained is None else trained)
    if trained is not None and cfg.group_size != trained:
        progress(f"note: this checkpoint was healed through 4-bit scales {group_label(trained)}; "
                 f"--group-size {group_option(cfg.group_size)} rounds its weights differently (leave --group-size "
                 "out to keep them)")
    return cfg


def _summary(ckpt) -> ModelSummary:
    info = model_info(ckpt)
    config = ckpt.config
    eos = config.eos_token_id
    return ModelSummary(
        total_params=info.total_params, decoder_linear_params=info.decoder_linear_params,
        dense_decoder_linear_params=info.dense_decoder_linear_params, vocab_size=config.vocab_size,
        layers=config.num_hidden_layers, bos_token_id=config.bos_token_id,
        eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        ranks={name: spec.rank for name, spec in ckpt.record.modules.items()},
        tied_embeddings=bool(config.tie_word_embeddings),
    )


def _resolve_scales(cfg: ExportConfig, healed_int4: bool, progress: Callable[[str], None]) -> ExportConfig:
    """``int4_scales`` made explicit: unset, absmax for a checkpoint healed through the 4-bit weights
    (compress/fake_quant.py trains for max |w| / 7.5; other scales undo that), else hqq; an explicit
    choice is kept, with a warning where it is not the one the checkpoint was healed through."""
    if cfg.int4_scales is None:
        if healed_int4:
            progress("int4 scales: absmax, the ones the checkpoint was healed through")
        return dataclasses.replace(cfg, int4_scales=Int4Scales.ABSMAX if healed_int4 else Int4Scales.HQQ)
    if healed_int4 and cfg.int4_scales is not Int4Scales.ABSMAX:
        progress(f"warning: --int4-scales {cfg.int4_scales.value} on a checkpoint healed through absmax scales; "
                 "it will keep less of the task than the default (absmax)")
    return cfg


def default_rounding(healed_int4: bool) -> Int4Rounding:
    """Nearest for a checkpoint healed through int4 (the codes it was trained for), else GPTQ."""
    return Int4Rounding.NEAREST if healed_int4 else Int4Rounding.GPTQ


def _resolve_rounding(cfg: ExportConfig, healed_int4: bool, progress: Callable[[str], None]) -> ExportConfig:
    """``int4_rounding`` made explicit for an int4 export (both formats): unset, nearest for a checkpoint
    healed through the 4-bit weights (it was trained for those codes), else gptq; an explicit gptq on
    such a checkpoint is kept, with a warning. A 4-bit head's rounding is settled from what was given
    (``ExportConfig.head_rounds_by``: healing never rounds the head, so GPTQ unless --int4-rounding
    nearest was given), then the head's bits from the decoder's rounding (``ExportConfig.head``): a
    healed checkpoint keeps its 8-bit head (SmolLM2 for compare, 40%: a 4-bit head by GPTQ took
    perplexity 2.186 -> 2.429 in ONNX)."""
    cfg = dataclasses.replace(cfg, head_rounding=cfg.head_rounds_by)
    if cfg.int4_rounding is None:
        cfg = dataclasses.replace(cfg, int4_rounding=default_rounding(healed_int4))
    elif healed_int4 and cfg.int4_rounding is Int4Rounding.GPTQ:
        progress("warning: --int4-rounding gptq on a checkpoint healed through the 4-bit weights: it was trained "
                 "for nearest rounding's codes, which GPTQ moves")
    return dataclasses.replace(cfg, head_bits=cfg.head)


def _options(cfg: ExportConfig, balanced: bool, head_equalized: bool) -> dict:
    # what was done, not the switch
    raw = dataclasses.asdict(cfg) | {"balance": balanced, "head_equalized": head_equalized,
                                     "decode_method": cfg.wants_decode_method() and Format.EXECUTORCH in cfg.formats}
    return {k: ([f.value for f in v] if k == "formats" else getattr(v, "value", v)) for k, v in raw.items()}


def export(model_dir: Path | str, bundle: Path | str, cfg: ExportConfig = ExportConfig(),
           progress: Callable[[str], None] = print) -> Manifest:
    """Export a checkpoint (dense or compressed) to ``bundle``; nothing is left at ``bundle`` unless
    every format was written, counted and (with ``cfg.check``) matched PyTorch."""
    model_dir, bundle = Path(model_dir), Path(bundle)
    ckpt = open_checkpoint(model_dir)
    cfg = resolve_quantize(cfg, _compression(ckpt.folder), progress)
    if HEAD in ckpt.record.modules and cfg.quantize is Quantize.INT8:
        # The int8 paths quantize the head (and a tied table) as one dense matrix.
        raise RankdownError(f"{ckpt.folder}: --quantize int8 does not take a factored head (compress --head-rank) "
                            "yet; export it in fp32 or int4")
    check_output_path(bundle, [model_dir], cfg.overwrite)
    for fmt in cfg.formats:
        by_format(fmt).module().preflight(cfg)
    if not (ckpt.folder / "tokenizer.json").is_file():
        raise RankdownError(f"{ckpt.folder}: no tokenizer.json; a bundle needs the model's tokenizer")
    with exclusive_output(bundle, "exporting"):
        return _export(ckpt, bundle, cfg, progress)


def memory_estimate(ckpt, cfg: ExportConfig) -> int:
    """The model's fp32 weights + the hungriest format's export (formats run one at a time), + GPTQ
    rounding's buffers where int4 will round with it (ONNX holds them beside its graph, ExecuTorch
    before lowering: the hungriest format's figure covers either)."""
    weights = 4 * model_info(ckpt).total_params
    gptq = 0
    if cfg.quantize is Quantize.INT4:
        resolved = _resolve_rounding(cfg, healed_for_int4(_compression(ckpt.folder)), lambda _: None)
        gptq = gptq_memory(ckpt.config) if any(resolved.gptq_parts) else 0
    return weights + gptq + max(by_format(f).memory.bytes_for(weights) for f in cfg.formats)


def disk_estimate(ckpt, cfg: ExportConfig) -> int:
    fp32 = 4 * model_info(ckpt).total_params
    per_format = fp32 // {Quantize.INT8: 4, Quantize.INT4: 6}.get(cfg.quantize, 1)
    # A quantized ONNX export first writes the fp32 graph beside the bundle's files, then removes it.
    staged = fp32 if cfg.quantize is not Quantize.NONE and Format("onnx") in cfg.formats else 0
    return len(cfg.formats) * per_format + staged + ckpt.size_bytes // 8 + (8 << 20)


def _export(ckpt, bundle: Path, cfg: ExportConfig, progress: Callable[[str], None]) -> Manifest:
    require_memory(memory_estimate(ckpt, cfg), "export", ckpt.folder)
    check_free_space(bundle, disk_estimate(ckpt, cfg), "the bundle")
    model = load_model(ckpt).eval()
    peaks = {"load": round(peak_rss_mb(), 1)}
    tokenizer = load_tokenizer(ckpt.folder)
    thresholds = cfg.thresholds
    prompts, reference = [], []
    compression = _compression(ckpt.folder)
    # int4's float floor (beside its lowering check) is judged on the text of the tasks the checkpoint was
    # compressed for; the kernel checks keep the same generic text for every model.
    floor_tasks = parity_tasks(compression, cfg.task) if cfg.quantize is Quantize.INT4 else GENERIC_TASKS
    floor_prompts, floor_reference = [], []
    if cfg.check:
        room = cfg.max_seq_len - cfg.parity_new_tokens - 1
        prompts = parity_prompts(tokenizer, room=room)
        reference = [torch_greedy(model, p, cfg.parity_new_tokens) for p in prompts]
        floor_prompts, floor_reference = prompts, reference
        if floor_tasks != GENERIC_TASKS:
            progress(f"the float model's top-1 floor: judged on {', '.join(floor_tasks)} text "
                     f"({'--task' if cfg.task else 'the tasks the checkpoint was compressed for'})")
            floor_prompts = parity_prompts(tokenizer, room=room, tasks=floor_tasks)
            # only the prompt logits are judged there (top-1), so one new token is enough
            floor_reference = [torch_greedy(model, p, 1) for p in floor_prompts]
    healed_int4 = healed_for_int4(compression)
    if (cfg.quantize is Quantize.INT4 and Format("executorch") in cfg.formats and not healed_int4
            and isinstance(compression, dict) and compression.get("healing")):
        # measured: SmolLM2 compare+code 40%, ExecuTorch int4: compare 92.0% and perplexity +22% (fails
        # validate) when healed in float, 100.0% and -5% when healed through the 4-bit weights
        progress("note: this checkpoint was healed with float weights; for ExecuTorch int4, healing through "
                 "the 4-bit weights (`rankdown compress ... --heal-quantize int4`) keeps more of the task")
    balanced = cfg.balances and not healed_int4
    if balanced:
        # After the reference: it is the model as compressed; balancing leaves its fp32 function as it is.
        pairs = balance_factors(model)
        if pairs:  # a dense model has none to balance
            progress(f"balanced {pairs} factor pair(s) for {cfg.quantize.value} weights")
    elif cfg.balances:
        progress("not balanced: the checkpoint was healed through int4 weights at the scales it has")
    # Healing never rounds the head's weights, so its rank axis is free to rescale even when the
    # decoder's factors must keep the scales they were healed at.
    head_equalized = cfg.balances and equalize_head(model)
    if head_equalized:
        progress("head: rank axis rescaled to equal column peaks for its quantized rows (function unchanged)")
    windows = None
    if cfg.quantize is Quantize.INT4:
        cfg = _resolve_rounding(_resolve_scales(cfg, healed_int4, progress), healed_int4, progress)
        if any(cfg.gptq_parts):
            # the calibration split of the floor's tasks; the floor is judged on their evaluation split
            windows = gptq_windows(tokenizer, floor_tasks)
    cfg = _resolve_group(cfg, compression if healed_int4 else None, progress)

    entries: dict[str, FormatEntry] = {}
    with atomic_folder(bundle, cfg.overwrite) as tmp:
        calibration = None if windows is None else _gptq_statistics(model, windows, tmp, len(cfg.formats),
                                                                    disk_estimate(ckpt, cfg), progress)
        # First: a tokenizer the app runtimes cannot read fails the export before minutes of lowering.
        for change in write_bundle_tokenizer(ckpt.folder, tmp, tokenizer, check_texts()):
            progress(f"tokenizer.json: {change}")
        copied = [tmp / TOKENIZER_FILE]  # before the formats: a format may ship copies (onnxruntime-genai's folder)
        for name in TOKENIZER_FILES:
            if name != TOKENIZER_FILE and (ckpt.folder / name).is_file():
                shutil.copy2(ckpt.folder / name, tmp / name)
                copied.append(tmp / name)
        for fmt in sorted(cfg.formats, key=list(Format).index):
            progress(f"{fmt.value}: exporting{'' if cfg.quantize is Quantize.NONE else f' ({cfg.quantize.value})'}")
            spec = by_format(fmt)
            module = spec.module()
            # A format that quantizes the PyTorch model before lowering it hands that model over, so
            # the self-check can tell what the lowering changed from what quantizing changed.
            quantize = getattr(module, "quantize", None)
            quantized = None if quantize is None else quantize(model, ckpt.record, cfg, progress, calibration=calibration)
            lowered_reference = ([torch_greedy(quantized.model, p, cfg.parity_new_tokens) for p in prompts]
                                 if cfg.check and quantized is not None else None)
            # a format quantized on its graph (ONNX) rounds there, with the same calibration
            seconds, nodes, delegation, quantization = module.export(
                model, ckpt.record, tmp, cfg, progress,
                **({"calibration": calibration} if quantize is None else {"quantized": quantized}))
            del quantized
            spec.module().check_file(tmp / spec.artifact, tmp)
            read_back = getattr(module, "lowered_model", None)
            if cfg.check and lowered_reference is None and read_back is not None:
                # A format quantized on its graph: the model with the graph's own weights, read back.
                lowered = read_back(model, tmp / spec.artifact, cfg.quantize)
                if getattr(lowered, "note", None):
                    progress(f"{fmt.value}: the check's reference: {lowered.note}")
                if lowered is not None:
                    lowered_reference = [torch_greedy(lowered, p, cfg.parity_new_tokens) for p in prompts]
                    del lowered
            files = _format_files(tmp, spec)
            tables = check_stored_once(files, tied_table(model), tmp / spec.folder)
            peaks[fmt.value] = round(peak_rss_mb(), 1)
            progress(f"{fmt.value}: {seconds:.1f} s; factor nodes {nodes.found}/{nodes.expected} "
                     f"({nodes.pairs} pairs, {nodes.shared_groups} shared-down groups), "
                     f"{nodes.dense_linears} dense linears")
            results: dict[str, Parity] = {}
            if cfg.check:
                decoder = spec.open_decoder(tmp / spec.artifact)
                runs = run(decoder, prompts, cfg.parity_new_tokens)
                # The lowering first: a runtime that disagrees with the quantized PyTorch model is a
                # broken export, whatever quantizing cost.
                checks: list[tuple[str, list, list, ParityThresholds, tuple[str, ...]]] = []
                if lowered_reference is None:
                    checks.append(("parity", reference, runs, thresholds, GENERIC_TASKS))
                else:
                    floor_runs = runs if floor_prompts is prompts else run(decoder, floor_prompts, 1)
                    checks += [("lowering", lowered_reference, runs, ParityThresholds.lowering(spec.lowering_p95),
                                GENERIC_TASKS),
                               ("parity", floor_reference, floor_runs, cfg.floor_thresholds,
                                floor_tasks)]
                del decoder
                for name, ref, got, bounds, tasks in checks:
                    result = dataclasses.replace(judge(ref, got, bounds), tasks=tasks)
                    against = ("the float model" + ("" if tasks == GENERIC_TASKS else f" on {', '.join(tasks)} text")
                               if name == "parity" else f"PyTorch with its {cfg.quantize.value} weights")
                    progress(f"{fmt.value}: against {against}: max |logit diff| {result.max_abs_logit_diff:.2e} "
                             f"(95th-percentile position {result.p95_abs_logit_diff:.2e}; "
                             f"logit scale {result.logit_scale:.1f}), top-1 {result.top1_agreement:.1%}"
                             f"{top1_note(result.top1_tie)}, greedy "
                             f"{'identical' if result.greedy_match else 'differs'} over {result.new_tokens} tokens")
                    if not result.passed:
                        failure = describe_failure(result, bounds)
                        hint = _floor_hint(result, results.get("lowering"), cfg, healed_int4) if name == "parity" else ""
                        raise ParityError(f"{bundle}: {fmt.value} export failed its parity self-check against "
                                          f"{against}: {failure}{hint}", reason=f"{fmt.value} against {against}: {failure}")
                    results[name] = result
            entries[fmt.value] = FormatEntry(
                files=file_entries(tmp, files), export_seconds=round(seconds, 2), quantize=cfg.quantize.value,
                backend=cfg.backend.value if spec.takes_backend else None, factor_nodes=nodes,
                delegation=delegation, parity=results.get("parity"), embedding_tables=tables,
                quantization=quantization, lowering=results.get("lowering"))
        if calibration is not None:
            calibration.discard()  # the staging folder becomes the bundle
        manifest = Manifest(source=_source(ckpt, compression), model=_summary(ckpt), options=_options(cfg, balanced, head_equalized),
                            tokenizer_files=file_entries(tmp, copied), formats=entries, versions=_versions(),
                            peak_rss_mb=peaks)
        write_text_atomic(tmp / MANIFEST_FILE, manifest.to_json())
    return manifest


def _gptq_statistics(model, windows, stage: Path, readers: int, bundle_bytes: int,
                     progress: Callable[[str], None]) -> GptqStatistics:
    """The float model's statistics for GPTQ; with more than one format to round, kept on disk in the
    staging folder by the first format's walk for the next to read, where the disk holds them beside
    the bundle (``bundle_bytes``)."""
    if readers < 2:
        return GptqStatistics(model, windows)
    needed = kept_bytes(model)
    free = shutil.disk_usage(stage).free
    if needed + bundle_bytes + KEEP_MARGIN > free:
        progress(f"GPTQ: each format walks the calibration text itself: keeping its statistics for the next "
                 f"needs about {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free on {stage.parent}")
        return GptqStatistics(model, windows)
    return GptqStatistics(model, windows, keep=stage / KEPT_FOLDER)


def _floor_hint(parity: Parity, lowering: Parity | None, cfg: ExportConfig, healed_int4: bool) -> str:
    """What to do when a quantized artifact misses only the float model's top-1 floor: its runtime
    matched the quantized PyTorch model (``lowering``), so the loss is the rounding's, not the runtime's."""
    if lowering is None or parity.top1_agreement >= cfg.floor_thresholds.min_top1_agreement:
        return ""
    # the next 0.05 below what this format kept (another format may keep less)
    accept = max(math.floor(parity.top1_agreement * 20) / 20, 0.05)
    heal = "" if healed_int4 else "`rankdown compress MODEL --weights int4` heals a model through them, "
    # a 4-bit head moves the top token more than an 8-bit one (dense SmolLM2 in ExecuTorch: 63.8% against
    # 71.0%) while keeping perplexity; the user may prefer the 8-bit head to a lower floor
    head = "`--head-bits 8` keeps an 8-bit head, " if cfg.precision is Quantize.INT4 and cfg.head == 4 else ""
    return (f" (its runtime matches the {cfg.precision.value} PyTorch model: top-1 {lowering.top1_agreement:.1%}, so "
            f"this is what {cfg.precision.value} weights cost this model; {heal}{head}`--min-top1 {accept:g}` accepts "
            "this format's loss)")


def _format_files(bundle: Path, spec: FormatSpec) -> list[Path]:
    return sorted(p for p in (bundle / spec.folder).rglob("*") if p.is_file())


def format_manifest(manifest: Manifest) -> str:
    """A few lines a person reads after an export."""
    m = manifest.model
    src = manifest.source
    method = (src.compression or {}).get("method", "dense")
    lines = [f"source: {src.path} ({method}; sha256 {src.sha256[:12]}…)",
             f"params: {m.total_params:,} total; decoder linears {m.decoder_linear_params:,} of "
             f"{m.dense_decoder_linear_params:,} dense ({1 - m.decoder_linear_params / m.dense_decoder_linear_params:.1%} "
             f"removed), {len(m.ranks)} factor pairs"
             + (", tied embeddings (one table, counted once)" if m.tied_embeddings else "")]
    for name, entry in manifest.formats.items():
        size = sum(f.bytes for f in entry.files.values())
        parity = entry.parity
        lowering = entry.lowering
        if parity is None:
            check = "not checked"
        elif lowering is None:
            check = (f"parity {'passed' if parity.passed else 'FAILED'}: max |Δlogit| {parity.max_abs_logit_diff:.1e}, "
                     f"top-1 {parity.top1_agreement:.1%}, greedy {'identical' if parity.greedy_match else 'differs'}")
        else:
            floor = manifest.options.get("min_top1")
            check = (f"parity {'passed' if parity.passed and lowering.passed else 'FAILED'}: against its "
                     f"{entry.quantize} PyTorch model max |Δlogit| {lowering.max_abs_logit_diff:.1e}, top-1 "
                     f"{lowering.top1_agreement:.1%}{top1_note(lowering.top1_tie)}; float model top-1 "
                     f"{parity.top1_agreement:.1%}" + ("" if floor is None else f" (floor {floor:.0%}, --min-top1)"))
        nodes = entry.factor_nodes
        lines.append(f"{name:<10} {size / 2**20:7.2f} MiB  {entry.quantize:<4}  {entry.export_seconds:6.1f} s  "
                     f"factor nodes {nodes.found}/{nodes.expected}  {check}")
    return "\n".join(lines)
