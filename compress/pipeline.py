"""``compress(model_dir, out, config)``: the one public call of the compress stage.

Uniform ranks stream: calibration activations flow through the already-compressed layers,
and only one layer's activations and statistics are held at once. Bayesian ranks (seed 002)
first decompose every layer once from the dense model's activations, then each trial only
re-truncates the cached factors.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM

from compress.calibration import calibration_windows, collect_layer_stats, layer_inputs, run_layer
from compress.config import REPORT_FILE, Allocation, BasisMode, CompressConfig, CompressionReport, ModuleReport
from compress.decomposition import Decomposition, UnitWeights
from compress.methods import METHODS, MethodSpec
from compress.rank_allocation import Unit, allocate, plan_units
from rankdown.atomic import check_output_path
from rankdown.checkpoint import DTYPES, load_model, load_tokenizer, open_checkpoint, save_checkpoint
from rankdown.datafiles import load_data
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear, linear_params, shared_down_group
from rankdown.tasks import Split, TaskData, load_task

Progress = Callable[[str], None]
BATCH = 8


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_data(cfg: CompressConfig) -> TaskData:
    return load_data(cfg.calib) if cfg.calib is not None else load_task(cfg.task, Split.CALIBRATION)


def training_windows(tokenizer, cfg: CompressConfig) -> torch.Tensor:
    """Tuned mode's training data: the task's training split, or the calibration file itself."""
    data = load_data(cfg.calib) if cfg.calib is not None else load_task(cfg.task, Split.TRAIN)
    where = str(cfg.calib) if cfg.calib is not None else f"task {cfg.task} (train split)"
    tokens = cfg.tuning.steps * cfg.tuning.batch * cfg.seq_len
    return calibration_windows(tokenizer, data.texts or tuple(q.prompt + q.answer for q in data.qa),
                               cfg.seq_len, tokens, where)


def layer_shapes(model: LlamaForCausalLM) -> list[dict[str, tuple[int, int, bool]]]:
    shapes = []
    for layer in model.model.layers:
        entry = {}
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            module = layer.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise RankdownError(f"model.layers: {name} is already factorized; compress a dense checkpoint")
            entry[name] = (module.out_features, module.in_features, module.bias is not None)
        shapes.append(entry)
    return shapes


def unit_weights(layer: nn.Module, unit: Unit, stats) -> UnitWeights:
    modules = [layer.get_submodule(m) for m in unit.members]
    return UnitWeights(
        names=list(unit.members),
        weights=[m.weight.detach().to(torch.float64) for m in modules],
        biases=[None if m.bias is None else m.bias.detach().to(torch.float64) for m in modules],
        stats=None if stats is None else stats[unit.site],
    )


def decompose_unit(spec: MethodSpec, layer: nn.Module, unit: Unit, stats, prefix: str) -> Decomposition:
    try:
        return spec.decompose(unit_weights(layer, unit, stats))
    except ValueError as e:
        raise RankdownError(f"{prefix}.{unit.members[0]}: decomposition failed: {e}") from None


def factor_modules(decomposition: Decomposition, unit: Unit, rank: int, dtype: torch.dtype) -> list[nn.Module]:
    """Factor pairs for one unit at ``rank`` (a shared-``down`` group for joint units)."""
    a, bs, biases = decomposition.factors(rank)
    cast = [None if b is None else b.to(dtype) for b in biases]
    if len(unit.members) == 1:
        return [FactorizedLinear.from_factors(a.to(dtype), bs[0].to(dtype), cast[0])]
    return shared_down_group(a.to(dtype), [b.to(dtype) for b in bs], cast)


def set_unit(layer: nn.Module, unit: Unit, modules: list[nn.Module]) -> None:
    for member, module in zip(unit.members, modules):
        parent, _, child = member.rpartition(".")
        setattr(layer.get_submodule(parent), child, module)


@torch.no_grad()
def calibration_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], BATCH):
        ids = windows[i : i + BATCH]
        loss = model(input_ids=ids, labels=ids).loss
        total += loss.item() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return total / count


def _compress_streaming(model, spec, units, ranks, windows, progress: Progress) -> None:
    """Uniform ranks: decompose layer by layer, feeding each layer the compressed layers' outputs."""
    hidden = layer_inputs(model, windows) if spec.needs_data else None
    for index, layer in enumerate(model.model.layers):
        start = time.perf_counter()
        stats = None
        if spec.needs_data:
            stats, _ = collect_layer_stats(model, layer, hidden, BATCH)
        for unit, rank in zip(units, ranks):
            if unit.layer != index or rank is None:
                continue
            decomposition = decompose_unit(spec, layer, unit, stats, f"model.layers.{index}")
            set_unit(layer, unit, factor_modules(decomposition, unit, rank, torch.float32))
        del stats
        if spec.needs_data:
            hidden = run_layer(model, layer, hidden, BATCH)
        progress(f"layer {index + 1}/{len(model.model.layers)} compressed in {time.perf_counter() - start:.1f} s "
                 f"(peak RSS {peak_rss_mb():.0f} MB)")


def compress(model_dir: Path | str, out: Path | str, cfg: CompressConfig, progress: Progress = _stderr) -> CompressionReport:
    """Compress a dense checkpoint into ``out`` (a checkpoint folder plus compression.json)."""
    start = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    check_output_path(out, [model_dir], cfg.overwrite)
    ckpt = open_checkpoint(model_dir)
    if ckpt.record.modules:
        raise RankdownError(f"{model_dir}: already compressed; compress the dense model instead")
    torch.manual_seed(cfg.seed)
    model = load_model(ckpt)
    tokenizer = load_tokenizer(model_dir)
    spec = METHODS[cfg.method]
    data = calibration_data(cfg)
    where = str(cfg.calib) if cfg.calib is not None else f"task {cfg.task}"
    windows = calibration_windows(tokenizer, data.texts or tuple(q.prompt + q.answer for q in data.qa),
                                  cfg.seq_len, cfg.calib_tokens, where)
    units = plan_units(layer_shapes(model), spec.joint_groups, spec.dense_kinds, spec.factor_bias)
    before = sum(u.dense_params for u in units)
    progress(f"compressing {model_dir} with {cfg.method.value} ({cfg.allocate.value} ranks) to ratio {cfg.ratio}: "
             f"{len(units)} units, {windows.shape[0]} calibration windows of {cfg.seq_len} tokens")
    keep_ratios: dict[str, float] = {}
    if cfg.basis_mode is BasisMode.TUNED:
        from compress.basis_tuning import tune_bases

        training = training_windows(tokenizer, cfg)
        progress(f"tuning bases on {training.shape[0]} training windows: {cfg.tuning.steps} steps of "
                 f"{cfg.tuning.batch}, {cfg.tuning.prune_steps} pruning steps")
        ranks = tune_bases(model, units, windows, training, cfg.ratio, cfg.tuning, cfg.seed, progress)
    elif cfg.allocate is Allocation.UNIFORM:
        ranks = allocate(units, cfg.ratio)
        _compress_streaming(model, spec, units, ranks, windows, progress)
    else:
        from compress.bayesian_ranks import compress_with_bayes

        ranks, keep_ratios = compress_with_bayes(model, spec, units, windows, cfg, progress)
        _compress_streaming(model, spec, units, ranks, windows, progress)
    loss = calibration_loss(model, windows)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else ckpt.stored_dtype
    modules = {}
    for unit, rank in zip(units, ranks):
        for name, member, m_out in zip(unit.names(), unit.members, unit.out_features):
            module = model.get_submodule(name)
            note = "" if rank is not None else ("left dense by the method" if not unit.compressible
                                                 else "kept dense: no rank would save parameters")
            modules[name] = ModuleReport(rank, m_out, unit.in_features, linear_params(module), note)
    report = CompressionReport(
        method=cfg.method.value, task=cfg.task or str(cfg.calib), ratio=cfg.ratio, allocate=cfg.allocate.value,
        params_before=before, params_after=sum(m.params for m in modules.values()), modules=modules,
        calibration_loss=loss, wall_seconds=round(time.perf_counter() - start, 2), peak_memory_mb=round(peak_rss_mb(), 1),
        keep_ratios=keep_ratios, basis_mode=cfg.basis_mode.value if cfg.method.value == "basis" else None, seed=cfg.seed,
    )
    save_checkpoint(model, model_dir, out, dtype, extra_files={REPORT_FILE: report.to_json()}, overwrite=cfg.overwrite)
    progress(f"wrote {out}: {report.params_after:,} of {report.params_before:,} decoder-linear parameters "
             f"({report.achieved_ratio:.2%} removed), calibration loss {loss:.4f}, {report.wall_seconds:.1f} s")
    return report
