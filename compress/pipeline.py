"""``compress(model_dir, out, config)``: the one public call of the compress stage.

Uniform ranks stream: calibration activations flow through the already-compressed layers,
and only one layer's activations and statistics are held at once. Bayesian ranks (seed 002)
first decompose every layer once from the dense model's activations, then each trial only
re-truncates the cached factors.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from rankdown.atomic import atomic_folder, check_free_space, check_output_path
from rankdown.checkpoint import DTYPES, ShardedWriter, load_model, load_tokenizer, open_checkpoint, read_tensors, skeleton_model
from rankdown.compress.calibration import calibration_windows, collect_layer_stats, run_layer
from rankdown.compress.config import REPORT_FILE, Allocation, BasisMode, CompressConfig, CompressionReport, ModuleReport
from rankdown.compress.decomposition import Decomposition, UnitWeights
from rankdown.compress.methods import METHODS, MethodSpec
from rankdown.compress.rank_allocation import Unit, allocate, plan_units
from rankdown.datafiles import load_data
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear, linear_params, shared_down_group
from rankdown.info import model_info
from rankdown.memory import peak_rss_mb, release_free_memory, require_memory, rss_mb
from rankdown.output_lock import exclusive_output
from rankdown.tasks import Split, TaskData, load_task

Progress = Callable[[str], None]
BATCH = 8
HEAD_SLICE = 16384  # vocabulary rows of the head upcast at once for the calibration loss
TOKEN_CHUNK = 1024  # tokens whose logits over one slice are held at once


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def calibration_data(cfg: CompressConfig) -> TaskData:
    return load_data(cfg.calib) if cfg.calib is not None else load_task(cfg.task, Split.CALIBRATION)


def training_windows(tokenizer, cfg: CompressConfig) -> torch.Tensor:
    """Tuned mode's training data: the task's training split, or the calibration file itself."""
    data = load_data(cfg.calib) if cfg.calib is not None else load_task(cfg.task, Split.TRAIN)
    where = str(cfg.calib) if cfg.calib is not None else f"task {cfg.task} (train split)"
    tokens = cfg.tuning.steps * cfg.tuning.batch * cfg.tuning.seq_len
    return calibration_windows(tokenizer, data.texts or tuple(q.prompt + q.answer for q in data.qa),
                               cfg.tuning.seq_len, tokens, where)


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


def unit_weights(layer: nn.Module, unit: Unit, site_stats, stored: dict[str, torch.Tensor] | None = None) -> UnitWeights:
    """The unit's dense weights in float64: from the layer's modules, or from ``stored`` tensors
    (layer-relative names, e.g. "mlp.down_proj.weight") when the modules were already freed."""
    def tensor(member: str, kind: str) -> torch.Tensor | None:
        if stored is not None:
            found = stored.get(f"{member}.{kind}")
        else:
            found = getattr(layer.get_submodule(member), kind)
        return None if found is None else found.detach().to(torch.float64)

    return UnitWeights(
        names=list(unit.members),
        weights=[tensor(m, "weight") for m in unit.members],
        biases=[tensor(m, "bias") for m in unit.members],
        stats=site_stats,
    )


def decompose_unit(spec: MethodSpec, layer: nn.Module, unit: Unit, site_stats, prefix: str,
                   stored: dict[str, torch.Tensor] | None = None) -> Decomposition:
    """One unit's decomposition; ``site_stats`` is the InputStats of the unit's input site (None if
    data-free); ``stored`` as for ``unit_weights``."""
    weights = unit_weights(layer, unit, site_stats, stored)
    del site_stats, stored  # only ``weights`` holds them now, so the method may release them
    try:
        return spec.decompose(weights)
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


def _streamed_loss(hidden: torch.Tensor, windows: torch.Tensor, norm: nn.Module, head: torch.Tensor) -> float:
    """Mean next-token loss from the last layer's outputs with the head's vocabulary in slices
    (log-sum-exp accumulated per token), so that neither the full logits nor an fp32 copy of the
    head are ever held: at a 128k vocabulary either would be gigabytes."""
    with torch.no_grad():
        h = torch.cat([norm(hidden[i : i + BATCH, :-1]).reshape(-1, hidden.shape[-1])
                       for i in range(0, hidden.shape[0], BATCH)])
        targets = windows[:, 1:].reshape(-1)
        log_sum = torch.full((h.shape[0],), -torch.inf, dtype=torch.float64)
        picked = torch.zeros(h.shape[0], dtype=torch.float64)
        for first in range(0, head.shape[0], HEAD_SLICE):
            rows = head[first : first + HEAD_SLICE].float()
            for t in range(0, h.shape[0], TOKEN_CHUNK):
                logits = h[t : t + TOKEN_CHUNK] @ rows.T
                chunk = slice(t, t + TOKEN_CHUNK)
                log_sum[chunk] = torch.logaddexp(log_sum[chunk], torch.logsumexp(logits, -1).double())
                local = targets[chunk] - first
                inside = (local >= 0) & (local < rows.shape[0])
                picked[chunk][inside] = logits[inside, local[inside]].double()
    return (log_sum - picked).mean().item()


def _compress_streaming(ckpt, spec: MethodSpec, units: list[Unit], ranks: list[int | None], windows: torch.Tensor,
                        writer: ShardedWriter | None, progress: Progress,
                        scored: torch.Tensor | None = None) -> tuple[LlamaForCausalLM, float]:
    """Layer by layer from the checkpoint: read one layer's weights, collect its statistics from the
    compressed layers' outputs, factor it, write it (unless ``writer`` is None), free it. Returns the
    model's skeleton (factor pairs in place, weights on meta) and the next-token loss on ``scored``
    windows (default: the calibration windows themselves)."""
    model = skeleton_model(ckpt)
    layers = model.model.layers
    embed = read_tensors(ckpt, "model.embed_tokens.weight")["model.embed_tokens.weight"]
    hidden = F.embedding(windows, embed).float()
    scored_hidden = None if scored is None else F.embedding(scored, embed).float()
    del embed
    release_free_memory()
    for index, layer in enumerate(layers):
        start = time.perf_counter()
        prefix = f"model.layers.{index}."
        weights = read_tensors(ckpt, prefix, torch.float32)
        layer.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items()}, assign=True)
        del weights
        stats = collect_layer_stats(model, layer, hidden, BATCH, spec.pooled_stats)[0] if spec.needs_data else None
        # Widest input first: its n x n statistics (512 MiB at n = 8192) are freed before the
        # other units' decompositions allocate their own working memory.
        todo = sorted(((unit, rank) for unit, rank in zip(units, ranks) if unit.layer == index and rank is not None),
                      key=lambda pair: -pair[0].in_features)
        # No forward pass runs until every unit is factored, so the dense weights to be replaced
        # are dropped now and each unit re-reads its own from the checkpoint when its turn comes.
        for unit, _ in todo:
            for member in unit.members:
                layer.get_submodule(member).to("meta")
        release_free_memory()  # the forward pass's activations and those weights
        for position, (unit, rank) in enumerate(todo):
            last_of_site = all(u.site != unit.site for u, _ in todo[position + 1 :])
            stored = {}
            for member in unit.members:
                stored |= {k.removeprefix(prefix): v for k, v in read_tensors(ckpt, f"{prefix}{member}.").items()}
            # The site's last unit takes its statistics along (no name here holds them), so a
            # method can free them mid-way: C (512 MiB at n = 8192) before the SVD of W L.
            decomposition = decompose_unit(spec, layer, unit, None if stats is None else
                                           (stats.pop(unit.site) if last_of_site else stats[unit.site]),
                                           f"model.layers.{index}", stored)
            del stored
            set_unit(layer, unit, factor_modules(decomposition, unit, rank, torch.float32))
            del decomposition
        del stats
        hidden = run_layer(model, layer, hidden, BATCH)
        if scored_hidden is not None:
            scored_hidden = run_layer(model, layer, scored_hidden, BATCH)
        if writer is not None:
            writer.add({prefix + k: v for k, v in layer.state_dict().items()})
        layer.to("meta")
        release_free_memory()
        progress(f"layer {index + 1}/{len(layers)} compressed in {time.perf_counter() - start:.1f} s "
                 f"(RSS {rss_mb():.0f} MB, peak {peak_rss_mb():.0f} MB)")
    rest = read_tensors(ckpt, "model.norm.") | read_tensors(ckpt, "model.embed_tokens.") | read_tensors(ckpt, "lm_head.")
    head = rest.get("lm_head.weight", rest["model.embed_tokens.weight"])
    norm = model.model.norm
    norm.load_state_dict({"weight": rest["model.norm.weight"].float()}, assign=True)
    if scored is None:
        loss = _streamed_loss(hidden, windows, norm, head)
    else:
        loss = _streamed_loss(scored_hidden, scored, norm, head)
    if writer is not None:
        writer.add(rest)
    del rest, head
    return model, loss


def check_windows(cfg: CompressConfig, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split off the windows that judge bayes against uniform: the last quarter of the calibration
    windows, which neither the search's decompositions nor its trials see (else the check would
    favour the search's own pick). Not the task's training split: the shipped model was trained
    on it, and its loss there ranked the candidates the other way round from held-out text
    (whiten at 0.6: bayes lower on training windows, higher perplexity on evaluation).
    Returns (windows for the search, windows for the check)."""
    held = max(2, windows.shape[0] // 4)
    if windows.shape[0] - held < 4:
        where = cfg.calib if cfg.calib is not None else f"task {cfg.task}"
        raise RankdownError(f"{where}: bayes allocation needs at least 6 calibration windows of {cfg.seq_len} "
                            "tokens (give more text or --calib-tokens)")
    return windows[:-held], windows[-held:]


def _check_against_uniform(ckpt, spec: MethodSpec, units: list[Unit], ranks: list[int | None], windows: torch.Tensor,
                           check: torch.Tensor, cfg: CompressConfig,
                           progress: Progress) -> tuple[list[int | None], dict[str, float | str]]:
    """Bayesian trials score cached factors from dense activations; the final factors are streamed.

    So the winner is re-judged as it will be built: both it and the uniform ranks are built by
    the streaming pass from the search's windows and scored on ``check`` windows, which the
    search never saw (and never the evaluation split); the uniform ranks are kept if they score
    at least as well.
    """
    uniform = allocate(units, cfg.ratio)
    if ranks == uniform:
        return ranks, {"kept": "uniform", "note": "the search chose the uniform ranks"}
    def quiet(_message: str) -> None:
        pass
    losses = {name: _compress_streaming(ckpt, spec, units, r, windows, None, quiet, scored=check)[1]
              for name, r in (("bayes", ranks), ("uniform", uniform))}
    kept = "bayes" if losses["bayes"] < losses["uniform"] else "uniform"
    progress(f"check of the final factors on {check.shape[0]} unseen windows: loss bayes {losses['bayes']:.4f}, "
             f"uniform {losses['uniform']:.4f}: keeping the {kept} ranks")
    return (ranks if kept == "bayes" else uniform), {"kept": kept, "bayes_loss": round(losses["bayes"], 5),
                                                      "uniform_loss": round(losses["uniform"], 5),
                                                      "check_windows": int(check.shape[0])}


def compress(model_dir: Path | str, out: Path | str, cfg: CompressConfig, progress: Progress = _stderr) -> CompressionReport:
    """Compress a dense checkpoint into ``out`` (a checkpoint folder plus compression.json)."""
    model_dir, out = Path(model_dir), Path(out)
    check_output_path(out, [model_dir], cfg.overwrite)
    with exclusive_output(out, "compressing"):
        return _compress(model_dir, out, cfg, progress)


def memory_estimate(ckpt, cfg: CompressConfig) -> int:
    """Bytes a compression allocates beyond the libraries: the fp32 model, one unit's float64
    decomposition, the calibration activations, one batch's logits, statistics and the save.
    An upper bound: the streaming path holds one layer's weights, not the model twice."""
    c = ckpt.config
    model = 4 * model_info(ckpt).total_params
    widest_unit = 2 * c.intermediate_size * c.hidden_size
    decomposition = 8 * 4 * widest_unit
    activations = 4 * 3 * cfg.calib_tokens * c.hidden_size if METHODS[cfg.method].needs_data else 0
    batch = 4 * BATCH * cfg.seq_len * (3 * c.intermediate_size + 4 * c.vocab_size)
    stats = 8 * 2 * (3 * c.hidden_size**2 + c.intermediate_size**2)
    return 2 * model + decomposition + activations + batch + stats


def _disk_estimate(ckpt, cfg: CompressConfig, dtype: torch.dtype) -> int:
    info = model_info(ckpt)
    kept = info.total_params - cfg.ratio * info.dense_decoder_linear_params
    return int(kept * torch.empty(0, dtype=dtype).element_size()) + (1 << 20)


def _compress(model_dir: Path, out: Path, cfg: CompressConfig, progress: Progress) -> CompressionReport:
    start = time.perf_counter()
    ckpt = open_checkpoint(model_dir)
    if ckpt.record.modules:
        raise RankdownError(f"{model_dir}: already compressed; compress the dense model instead")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else ckpt.stored_dtype
    require_memory(memory_estimate(ckpt, cfg), "compress", model_dir)
    check_free_space(out, _disk_estimate(ckpt, cfg, dtype), "the compressed checkpoint")
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    spec = METHODS[cfg.method]
    data = calibration_data(cfg)
    where = str(cfg.calib) if cfg.calib is not None else f"task {cfg.task}"
    windows = calibration_windows(tokenizer, data.texts or tuple(q.prompt + q.answer for q in data.qa),
                                  cfg.seq_len, cfg.calib_tokens, where)
    units = plan_units(layer_shapes(skeleton_model(ckpt)), spec.joint_groups, spec.dense_kinds, spec.factor_bias)
    before = sum(u.dense_params for u in units)
    progress(f"compressing {model_dir} with {cfg.method.value} ({cfg.allocate.value} ranks) to ratio {cfg.ratio}: "
             f"{len(units)} units, {windows.shape[0]} calibration windows of {cfg.seq_len} tokens "
             f"(RSS {rss_mb():.0f} MB)")
    keep_ratios: dict[str, float] = {}
    check: dict[str, float | str] = {}
    with atomic_folder(out, overwrite=cfg.overwrite) as tmp:
        if cfg.basis_mode is BasisMode.TUNED:
            # Training needs the whole model at once: this mode does not stream.
            from rankdown.compress.basis_tuning import tune_bases

            model = load_model(ckpt)
            training = training_windows(tokenizer, cfg)
            progress(f"tuning bases on {training.shape[0]} training windows: {cfg.tuning.steps} steps of "
                     f"{cfg.tuning.batch}, {cfg.tuning.prune_steps} pruning steps")
            ranks = tune_bases(model, units, windows, training, cfg.ratio, cfg.tuning, cfg.seed, progress)
            loss = calibration_loss(model, windows)
            writer = ShardedWriter(tmp, dtype)
            writer.add({k: v for k, v in model.state_dict().items()
                        if not (model.config.tie_word_embeddings and k == "lm_head.weight")})
        else:
            if cfg.allocate is Allocation.UNIFORM:
                ranks = allocate(units, cfg.ratio)
            else:
                from rankdown.compress.bayesian_ranks import compress_with_bayes

                search, unseen = check_windows(cfg, windows)
                dense = load_model(ckpt)
                ranks, keep_ratios = compress_with_bayes(dense, spec, units, search, cfg, progress)
                del dense  # never the dense model and a compressed one at once: the final pass streams
                ranks, check = _check_against_uniform(ckpt, spec, units, ranks, search, unseen, cfg, progress)
            writer = ShardedWriter(tmp, dtype)
            model, loss = _compress_streaming(ckpt, spec, units, ranks, windows, writer, progress)
        modules = {}
        for unit, rank in zip(units, ranks):
            for name, m_out in zip(unit.names(), unit.out_features):
                note = "" if rank is not None else ("left dense by the method" if not unit.compressible
                                                     else "kept dense: no rank would save parameters")
                modules[name] = ModuleReport(rank, m_out, unit.in_features, linear_params(model.get_submodule(name)),
                                             note)
        report = CompressionReport(
            method=cfg.method.value, task=cfg.task or str(cfg.calib), ratio=cfg.ratio, allocate=cfg.allocate.value,
            params_before=before, params_after=sum(m.params for m in modules.values()), modules=modules,
            calibration_loss=loss, wall_seconds=round(time.perf_counter() - start, 2),
            peak_memory_mb=round(peak_rss_mb(), 1), keep_ratios=keep_ratios, allocation_check=check,
            basis_mode=cfg.basis_mode.value if cfg.method.value == "basis" else None, seed=cfg.seed,
        )
        writer.finish(model, model_dir, extra_files={REPORT_FILE: report.to_json()})
    progress(f"wrote {out}: {report.params_after:,} of {report.params_before:,} decoder-linear parameters "
             f"({report.achieved_ratio:.2%} removed), calibration loss {loss:.4f}, {report.wall_seconds:.1f} s, "
             f"peak RSS {report.peak_memory_mb:.0f} MB")
    return report
