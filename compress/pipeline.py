"""``compress(model_dir, out, config)``: the one public call of the compress stage.

It orchestrates: checks, calibration windows, units, then the rank strategy that the config
picks from compress/strategies.py (which builds and writes the factors), then the report.
Uniform ranks stream: calibration activations flow through the already-compressed layers,
and only one layer's activations and statistics are held at once. Bayesian ranks (seed 002)
first decompose every layer once from the dense model's activations, then each trial only
re-truncates the cached factors. With --heal-steps, the dense model's targets are computed
first, the strategy's factors are held in memory, healed (compress/healing.py), then written.
With ``workers`` > 1 (or under torchrun) the same code runs in every worker on its share of the
calibration windows (compress/distributed.py); worker 0 alone writes the checkpoint (with healing:
an unhealed one beside the output, which worker 0 then heals alone and writes as the output).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch

from rankdown.atomic import atomic_folder, check_free_space, check_output_path, remove_stale_temporaries
from rankdown.checkpoint import DTYPES, ShardedWriter, load_model, load_tokenizer, open_checkpoint, skeleton_model, write_into
from rankdown.compress import distributed
from rankdown.compress.config import (
    REPORT_FILE,
    Allocation,
    CompressConfig,
    CompressionReport,
    Healing,
    ModuleReport,
    recorded_config,
)
from rankdown.compress.head import HEAD_WINDOWS, MIN_WINDOWS, check_head_rank, factor_head, head_memory
from rankdown.compress.healing import Healer, heal_written, healing_memory
from rankdown.compress.launch import launch
from rankdown.compress.methods import METHODS
from rankdown.compress.rank_job import Discard, Progress, RankJob, calibration_bf16
from rankdown.compress.sensitivity import sensitivity_memory
from rankdown.compress.strategies import STRATEGIES
from rankdown.compress.training_data import data_windows
from rankdown.compress.units import BATCH, layer_shapes, plan_units
from rankdown.compute_device import resolve_device
from rankdown.errors import RankdownError
from rankdown.factor import linear_params
from rankdown.info import model_info
from rankdown.memory import peak_rss_mb, require_memory, require_shared_memory, rss_mb
from rankdown.output_lock import exclusive_output
from rankdown.tasks import Split


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(_message: str) -> None:
    pass


def compress(model_dir: Path | str, out: Path | str, cfg: CompressConfig, progress: Progress = _stderr) -> CompressionReport:
    """Compress a dense checkpoint into ``out`` (a checkpoint folder plus compression.json).

    ``cfg.workers`` > 1 starts that many worker processes and waits for them; under torchrun
    this process is one of the workers already."""
    model_dir, out = Path(model_dir), Path(out)
    size = distributed.world_size(cfg.workers)
    if cfg.head_rank is not None:  # before any worker starts
        check_head_rank(open_checkpoint(model_dir).config, cfg.head_rank)
    resolve_device(cfg.device)  # --device cuda without a GPU is refused here, before any work
    if size > 1 and not STRATEGIES[cfg.strategy].distributed:
        raise RankdownError(f"--workers {size}: {cfg.strategy.value} ranks run in one process only "
                            f"(distributed: {', '.join(s.value for s, spec in STRATEGIES.items() if spec.distributed)})")
    if size > 1 and cfg.healing.steps > 0:
        return _factor_then_heal(model_dir, out, cfg, progress)
    if size > 1 and not distributed.launched():
        check_output_path(out, [model_dir], cfg.overwrite)
        # Workers started here share this machine's memory; each one checks only its own share.
        require_shared_memory(memory_estimate(open_checkpoint(model_dir), cfg), size, "compress", model_dir)
        with exclusive_output(out, "compressing"):
            try:
                launch(compress_worker, (model_dir, out, cfg, False), size)
            finally:
                remove_stale_temporaries(out)  # worker 0's, if it was killed while writing
        return CompressionReport.read(out)  # worker 0 reported its progress
    return compress_worker(model_dir, out, cfg, True, progress)


def _factor_then_heal(model_dir: Path, out: Path, cfg: CompressConfig, progress: Progress) -> CompressionReport:
    """Several workers: they factor the model into a staging folder beside ``out``, then worker 0
    (or this process, which started them) heals it alone, since healing trains the whole model."""
    # A name the output's stale-temporary sweep matches: a run killed mid-way leaves nothing for long.
    staging = out.with_name(f".{out.name}.tmp-unhealed")
    # float32 factors, so healing starts from what a one-process run heals; the output takes the dtype.
    # The head (--head-rank) is factored after healing, from the healed model, as in one process.
    factor_cfg = dataclasses.replace(cfg, healing=Healing(steps=0), head_rank=None, overwrite=True, dtype="float32")
    if distributed.launched() and not distributed.leads_output():
        return compress(model_dir, staging, factor_cfg, progress)
    check_output_path(out, [model_dir], cfg.overwrite)  # before the factorization, not after it
    dense = open_checkpoint(model_dir)
    trainable = (1 - cfg.ratio) * model_info(dense).dense_decoder_linear_params
    head = head_memory(dense.config) if cfg.head_rank is not None else 0
    require_memory(4 * model_info(dense).total_params + healing_memory(dense, cfg, trainable) + head,
                   f"healing after the workers ({cfg.healing.steps} steps; --heal-steps 0 skips it)", model_dir)
    then = None
    if cfg.head_rank is not None:
        windows = data_windows(load_tokenizer(model_dir), cfg, Split.CALIBRATION, cfg.seq_len, cfg.calib_tokens)
        _check_head_windows(windows, cfg)  # now, not after the workers' minutes
        dtype = DTYPES[cfg.dtype] if cfg.dtype else dense.stored_dtype
        rank = cfg.head_rank

        def then(folder: Path, model, report: CompressionReport) -> CompressionReport:
            return _factor_head(folder, model_dir, windows, rank, report, dtype, progress, model)
    with exclusive_output(out, "compressing"):
        try:
            compress(model_dir, staging, factor_cfg, progress)
            report = heal_written(model_dir, staging, out, cfg, progress, then)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    progress(f"wrote {out}: healed {report.healing.steps} steps, held-back loss {report.healing.loss_before:.4f} -> "
             f"{report.healing.loss_after:.4f}, {report.wall_seconds:.1f} s, peak RSS {report.peak_memory_mb:.0f} MB")
    return report


def compress_worker(model_dir: Path, out: Path, cfg: CompressConfig, hold_output: bool,
                    progress: Progress = _stderr) -> CompressionReport:
    """One worker's part (all of it, alone): worker 0 writes ``out``, taking its lock when
    ``hold_output`` (the launcher holds it otherwise); the others only compute."""
    workers = distributed.join(cfg.device)
    try:
        if not workers.leader:
            return _compress(model_dir, out, cfg, _quiet, workers)
        if not hold_output:
            return _compress(model_dir, out, cfg, progress, workers)
        check_output_path(out, [model_dir], cfg.overwrite)
        with exclusive_output(out, "compressing"):
            return _compress(model_dir, out, cfg, progress, workers)
    finally:
        workers.close()


def memory_estimate(ckpt, cfg: CompressConfig) -> int:
    """Bytes a compression allocates beyond the libraries: the fp32 model, one unit's float64
    decomposition, the calibration activations, one batch's logits, statistics and the save, and
    healing's training state. An upper bound: the streaming path holds one layer's weights, not the
    model twice; healing holds the compressed model (smaller than the dense one) after the dense
    model is freed."""
    c = ckpt.config
    model = 4 * model_info(ckpt).total_params
    widest_unit = 2 * c.intermediate_size * c.hidden_size
    decomposition = 8 * 4 * widest_unit
    activations = 4 * 3 * cfg.calib_tokens * c.hidden_size if METHODS[cfg.method].needs_data else 0
    batch = 4 * BATCH * cfg.seq_len * (3 * c.intermediate_size + 4 * c.vocab_size)
    # two n x n sums per site, and the group buffers (product and paired cross sum) of the widest
    stats = 8 * (2 * (3 * c.hidden_size**2 + c.intermediate_size**2) + 2 * max(c.hidden_size, c.intermediate_size)**2)
    trainable = (1 - cfg.ratio) * model_info(ckpt).dense_decoder_linear_params
    # --allocate error's sensitivities: the whole dense model (one of the two counted) and a backward pass
    sensitivity = sensitivity_memory(c, cfg.seq_len) if cfg.allocation is Allocation.ERROR and METHODS[cfg.method].needs_data else 0
    head = head_memory(c) if cfg.head_rank is not None else 0
    return (2 * model + decomposition + activations + batch + stats + sensitivity + healing_memory(ckpt, cfg, trainable)
            + head)


def _check_head_windows(windows: torch.Tensor, cfg: CompressConfig) -> None:
    if cfg.head_rank is not None and windows.shape[0] < MIN_WINDOWS:
        raise RankdownError(f"{cfg.source}: --head-rank needs at least {MIN_WINDOWS} calibration windows of "
                            f"{cfg.seq_len} tokens, got {windows.shape[0]} (give more text or --calib-tokens, or --head-rank dense)")


def _factor_head(folder: Path, model_dir: Path, windows: torch.Tensor, rank: int, report: CompressionReport,
                 dtype: torch.dtype, progress: Progress, model=None) -> CompressionReport:
    """The head (a tied table: lookup and head) of the checkpoint just written into ``folder`` factored
    to ``rank`` (compress/head.py), the folder rewritten with it and the report. ``model``: the model
    written there, else read back from the folder (the streaming strategies leave no model in
    memory: their ``model`` is on meta)."""
    model = load_model(open_checkpoint(folder)) if model is None else model
    progress(f"factoring the head to rank {rank} on {min(len(windows), HEAD_WINDOWS)} calibration windows")
    head = factor_head(model, windows[:HEAD_WINDOWS], rank)
    report = dataclasses.replace(report, head=head, peak_memory_mb=round(max(report.peak_memory_mb, peak_rss_mb()), 1),
                                 wall_seconds=round(report.wall_seconds + head.seconds, 2))
    write_into(folder, model, model_dir, dtype, extra_files={REPORT_FILE: report.to_json()})
    progress(f"head at rank {rank}: {head.params_before:,} -> {head.params_after:,} parameters, held-back "
             f"loss {head.loss_before:.4f} -> {head.loss_after:.4f} in {head.seconds:.1f} s")
    return report


def _disk_estimate(ckpt, cfg: CompressConfig, dtype: torch.dtype) -> int:
    info = model_info(ckpt)
    kept = info.total_params - cfg.ratio * info.dense_decoder_linear_params
    return int(kept * torch.empty(0, dtype=dtype).element_size()) + (1 << 20)


def _compress(model_dir: Path, out: Path, cfg: CompressConfig, progress: Progress,
              workers: distributed.Workers) -> CompressionReport:
    start = time.perf_counter()
    ckpt = open_checkpoint(model_dir)
    if ckpt.record.modules:
        raise RankdownError(f"{model_dir}: already compressed; compress the dense model instead")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else ckpt.stored_dtype
    stage = "compress" if cfg.healing.steps == 0 else f"compress with {cfg.healing.steps} healing steps (--heal-steps 0 skips healing)"
    require_memory(memory_estimate(ckpt, cfg), stage, model_dir)
    check_free_space(out, _disk_estimate(ckpt, cfg, dtype), "the compressed checkpoint")
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    spec = METHODS[cfg.method]
    windows = data_windows(tokenizer, cfg, Split.CALIBRATION, cfg.seq_len, cfg.calib_tokens)
    _check_head_windows(windows, cfg)  # now, not after the decoder's minutes
    units = plan_units(layer_shapes(skeleton_model(ckpt)), spec.joint_groups, spec.dense_kinds, spec.factor_bias,
                       cfg.max_pair_share)
    before = sum(u.dense_params for u in units)
    where = "" if workers.world_size == 1 else f" over {workers.world_size} workers"
    bf16 = calibration_bf16(spec, cfg, workers.device)
    progress(f"compressing {model_dir} with {cfg.method.value} ({cfg.allocation.value} ranks) to ratio {cfg.ratio}: "
             f"{len(units)} units, {windows.shape[0]} calibration windows of {cfg.seq_len} tokens{where} "
             f"on {workers.device}{', forward passes in bf16' if bf16 else ''} (RSS {rss_mb():.0f} MB)")
    healer = Healer(ckpt, tokenizer, cfg, progress) if cfg.healing.steps > 0 else None
    with atomic_folder(out, overwrite=cfg.overwrite) if workers.leader else contextlib.nullcontext(out) as tmp:
        writer = ShardedWriter(tmp, dtype) if workers.leader else None
        sink = Discard() if writer is None else writer if healer is None else healer.weights
        job = RankJob(ckpt, spec, units, windows, tokenizer, cfg, sink, progress, workers)
        outcome = STRATEGIES[cfg.strategy].choose(job)
        model, ranks, loss = outcome.model, outcome.ranks, outcome.calibration_loss
        healing = None if healer is None else healer.heal_into(model, writer)
        modules = {}
        for unit, rank in zip(units, ranks):
            for name, m_out in zip(unit.names(), unit.out_features):
                note = "" if rank is not None else ("left dense by the method" if not unit.compressible
                                                     else "kept dense: no rank would save parameters")
                modules[name] = ModuleReport(rank, m_out, unit.in_features, linear_params(model.get_submodule(name)),
                                             note)
        report = CompressionReport(
            method=cfg.method.value, task=cfg.recorded_task, ratio=cfg.ratio, allocate=cfg.allocation.value,
            params_before=before, params_after=sum(m.params for m in modules.values()), modules=modules,
            calibration_loss=loss, wall_seconds=round(time.perf_counter() - start, 2),
            peak_memory_mb=round(workers.max(peak_rss_mb()), 1), keep_ratios=outcome.keep_ratios,
            allocation_check=outcome.allocation_check,
            basis_mode=cfg.basis_mode.value if spec.basis_modes else None, healing=healing, seed=cfg.seed,
            workers=workers.world_size, device=str(workers.device),
            correct_carried=cfg.correct_carried,
            calib_precision="bf16" if bf16 else "fp32", weights=cfg.weights.value,
            config=recorded_config(cfg) | {"workers": workers.world_size},  # torchrun's count, where it started them
        )
        if writer is not None:
            writer.finish(model, model_dir, extra_files={REPORT_FILE: report.to_json()})
            if cfg.head_rank is not None:
                del model, outcome  # the written checkpoint is read back instead: one copy of the model held
                report = _factor_head(tmp, model_dir, windows, cfg.head_rank, report, dtype, progress)
    progress(f"wrote {out}: {report.params_after:,} of {report.params_before:,} decoder-linear parameters "
             f"({report.achieved_ratio:.2%} removed), calibration loss {loss:.4f}, {report.wall_seconds:.1f} s, "
             f"peak RSS {report.peak_memory_mb:.0f} MB")
    return report
