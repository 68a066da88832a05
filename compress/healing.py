"""Healing (issue 14, item 3): a short distillation of the compressed model on the task's data.

After factorization, both factors of every pair are trained on the task's training split (or the
--calib file) with next-token loss + ``distill`` x KL(dense || compressed). The dense model's side
of the KL is computed first, before anything is compressed: its top-k log-probs on every training
window are kept (the rest of its mass as one more outcome, so the KL is that of the two
distributions coarsened to k + 1 outcomes, exact where the top k hold all the mass), and the
dense model is freed. So the dense and the compressed models are never in memory together.

Healing needs the whole compressed model, so when it runs the strategy hands its tensors to
``HeldWeights`` (in memory) instead of the checkpoint writer; the healed model is then written
a decoder layer per piece, as the streaming pass writes it. Embeddings, norms, the head and
linears left dense stay as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from rankdown.atomic import atomic_folder
from rankdown.checkpoint import DTYPES, Checkpoint, ShardedWriter, load_model, load_tokenizer, open_checkpoint
from rankdown.compress.config import (
    REPORT_FILE,
    REPORT_SCHEMA_VERSION,
    CompressConfig,
    CompressionReport,
    Healing,
    HealingReport,
    HealQuantize,
    Precision,
    recorded_config,
)
from rankdown.compress.fake_quant import fake_quantized
from rankdown.compress.rank_job import Progress, WeightSink
from rankdown.compress.training_attention import float32_attention
from rankdown.compress.training_data import training_windows
from rankdown.compress.units import BATCH
from rankdown.compute_device import bf16_native
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear, SharedDownLinear
from rankdown.int4_numerics import group_label
from rankdown.memory import peak_rss_mb, release_free_memory, rss_mb

MICRO_BATCH = 4  # windows per forward/backward pass; a step accumulates its batch from these
MIN_RESIDUAL = 1e-8  # floor of the mass outside the top k, so its log stays finite


@dataclass
class TeacherTargets:
    """The dense model's next-token top-k log-probs on every training window (N x (T-1) x k)."""

    windows: torch.Tensor  # N x T; the last ``held_back`` are never trained on
    log_probs: torch.Tensor  # float32
    tokens: torch.Tensor  # int32
    held_back: int
    seconds: float


class HeldWeights:
    """A WeightSink that keeps the compressed tensors in memory, for healing to train them."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors.update(tensors)


def teacher_targets(ckpt: Checkpoint, tokenizer, cfg: CompressConfig, progress: Progress) -> TeacherTargets:
    """Training windows and the dense model's top-k log-probs on them; the dense model is freed after."""
    healing = cfg.healing
    start = time.perf_counter()
    tokens = (healing.steps * healing.batch + healing.held_back) * healing.seq_len
    windows = training_windows(tokenizer, cfg, healing.seq_len, tokens)
    held = min(healing.held_back, windows.shape[0] // 4)
    if held < 1:
        raise RankdownError(f"{cfg.source}: healing needs at least 4 training windows of {healing.seq_len} tokens, "
                            f"the data gives {windows.shape[0]} (--heal-steps 0 skips healing)")
    # The held-back windows are the text's first ones, moved last: the windows read grow with the
    # steps, so holding back the last ones would judge runs of different lengths on different text.
    windows = torch.cat([windows[held:], windows[:held]])
    dense = load_model(ckpt)
    # In bf16 where healing trains in bf16: 2.4x faster, and as good a target (SmolLM2 20% for code, 32
    # steps: code perplexity 16.25 against 16.23 with float32 targets; their top-32 log-probs differ by
    # 0.024 nats, probability-weighted). The held-back windows, which the report's KL is judged on,
    # always in float32.
    device = next(dense.parameters()).device
    bf16 = training_precision(healing, device) is Precision.BF16
    first_held, count = windows.shape[0] - held, windows.shape[0]
    chunks = [(i, min(i + BATCH, first_held), bf16) for i in range(0, first_held, BATCH)]
    chunks += [(i, min(i + BATCH, count), False) for i in range(first_held, count, BATCH)]
    # Filled in place: small tensors kept between each chunk's large transient logits fragmented the
    # heap (the shipped model's 861 windows: peak RSS 3.7 GB for a 12 MB model), and a final cat copied them.
    shape = (count, windows.shape[1] - 1, healing.top_k)
    log_probs = torch.empty(shape, device=device)
    indices = torch.empty(shape, dtype=torch.int32, device=device)
    # Minutes on a CPU without bf16 (SmolLM2-135M, 706 windows, fp32 on 2 cores: 504 s), so it reports
    # once a minute; a phase of seconds says nothing until its summary.
    reported = start
    with torch.no_grad(), float32_attention(dense, enabled=_attention_in_float32(training_precision(healing, device), device)):
        for begin, end, autocast in chunks:
            if time.perf_counter() - reported >= 60:
                reported = time.perf_counter()
                progress(f"healing: dense top-{healing.top_k} log-probs, {begin}/{count} windows in "
                         f"{reported - start:.0f} s")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = dense(input_ids=windows[begin:end]).logits[:, :-1].float()
            top = F.log_softmax(logits, -1).topk(healing.top_k, dim=-1)
            log_probs[begin:end] = top.values
            indices[begin:end] = top.indices
            del logits, top
    del dense
    release_free_memory()
    seconds = time.perf_counter() - start
    progress(f"healing: dense top-{healing.top_k} log-probs ({'bf16' if bf16 else 'fp32'}) on {windows.shape[0]} training windows of "
             f"{healing.seq_len} tokens ({held} held back) in {seconds:.1f} s (RSS {rss_mb():.0f} MB)")
    return TeacherTargets(windows, log_probs, indices, held, seconds)


def distillation_terms(logits: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor,
                       tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token loss, mean KL(dense || compressed) over the top k + the rest) for logits of
    windows ``ids`` (B x T x V) against the dense model's top-k log-probs (B x (T-1) x k)."""
    log_probs = F.log_softmax(logits[:, :-1].float(), -1)
    nll = -log_probs.gather(-1, ids[:, 1:, None]).mean()
    student = log_probs.gather(-1, tokens.long())
    p = teacher.exp()
    rest_p = (1 - p.sum(-1)).clamp_min(MIN_RESIDUAL)
    rest_q = (1 - student.exp().sum(-1)).clamp_min(MIN_RESIDUAL)
    kl = (p * (teacher - student)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())
    return nll, kl.mean()


@torch.no_grad()
def _judge(model, targets: TeacherTargets, rows: torch.Tensor) -> tuple[float, float]:
    """(next-token loss, KL) averaged over the windows ``rows``, token-weighted."""
    nll_sum, kl_sum = 0.0, 0.0
    for chunk in rows.split(BATCH):
        ids = targets.windows[chunk]
        nll, kl = distillation_terms(model(input_ids=ids).logits, ids, targets.log_probs[chunk], targets.tokens[chunk])
        nll_sum += nll.item() * len(chunk)
        kl_sum += kl.item() * len(chunk)
    return nll_sum / len(rows), kl_sum / len(rows)


def factor_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Both factors (and their biases) of every factor pair, a shared down once."""
    found: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (FactorizedLinear, SharedDownLinear)):
            found.update((id(p), p) for p in module.parameters())
    return list(found.values())


def _materialize(model: LlamaForCausalLM, held: HeldWeights) -> None:
    """Put the held tensors into the strategy's model (its weights may be on meta), in float32."""
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in held.tensors.items()},
                          strict=False, assign=True)
    held.tensors.clear()
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"healing: tensors the strategy did not hand over: {left[:3]}")


def training_precision(healing: Healing, device: torch.device) -> Precision:
    """The precision ``auto`` stands for on ``device``; an explicit one as given. Healing for int4
    takes bf16 too: a 4-bit weight (code x group scale) cast to bfloat16 moves by at most 2^-9 of
    its scale, far inside the 4-bit step, and SmolLM2 healed so for compare+code at 40% (256 steps,
    14 min 38 s) keeps compare at 100% in ExecuTorch int4 (docs/measurements.md, "healed through 4-bit weights")."""
    if healing.precision is not Precision.AUTO:
        return healing.precision
    return Precision.BF16 if bf16_native(device) else Precision.FP32


def _attention_in_float32(precision: Precision, device: torch.device) -> bool:
    """bf16 autocast on a CPU: attention in float32, the more exact and not slower there
    (compress/training_attention.py)."""
    return precision is Precision.BF16 and device.type == "cpu"


def heal(model: LlamaForCausalLM, targets: TeacherTargets, healing: Healing, seed: int,
         progress: Progress) -> HealingReport:
    """Train every factor pair of ``model`` in place for ``healing.steps`` steps (AdamW, linear decay).
    For int4 (``healing.quantize``) every decoder linear is fake-quantized while training and judging
    (compress/fake_quant.py; 8da4w: the quantized linears' inputs too), at the factors' own scales: balancing them first (as the int4 export
    does) was measured worse (SmolLM2 40%, `compare` exact match through 4-bit weights 78.0% against
    93.0% unbalanced), and the export does not balance a checkpoint healed this way."""
    start = time.perf_counter()
    precision = training_precision(healing, next(model.parameters()).device)
    healing = dataclasses.replace(healing, precision=precision)
    with contextlib.ExitStack() as stack:
        stack.enter_context(float32_attention(model, enabled=_attention_in_float32(precision, next(model.parameters()).device)))
        if healing.quantize.four_bit:
            activations = healing.quantize is HealQuantize.INT4_8DA
            linears = stack.enter_context(fake_quantized(model, healing.group_size, activations))
            progress(f"healing for int4: {linears} decoder linears trained through 4-bit weights, scales "
                     f"{group_label(healing.group_size)}" + (", every quantized linear on int8 per-token inputs" if activations else ""))
        report = _train(model, targets, healing, seed, progress, start)
    if healing.quantize.four_bit:
        report = dataclasses.replace(report, quantize=healing.quantize.value, group_size=healing.group_size)
    return dataclasses.replace(report, precision=precision.value)


def _train(model: LlamaForCausalLM, targets: TeacherTargets, healing: Healing, seed: int,
           progress: Progress, start: float) -> HealingReport:
    trainable = factor_parameters(model)
    if not trainable:
        raise RankdownError("healing: the compressed model has no factor pairs to train")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    count = targets.windows.shape[0] - targets.held_back
    held_rows = torch.arange(count, targets.windows.shape[0])
    loss_before, kl_before = _judge(model, targets, held_rows)
    device = trainable[0].device
    # bf16 autocast: the products in bfloat16, the float32 weights, gradients and AdamW state kept;
    # the logits' log-softmax runs in float32 (autocast's rule, and distillation_terms casts them).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=healing.precision is Precision.BF16)
    progress(f"healing {sum(p.numel() for p in trainable):,} factor parameters on {count} training windows: "
             f"{healing.steps} steps of {healing.batch} x {healing.seq_len} tokens in {healing.precision.value}; "
             f"held-back loss "
             f"{loss_before:.4f}, KL {kl_before:.4f}")
    generator = torch.Generator().manual_seed(seed)
    # fused: one kernel over all factors (measured 0.11 -> 0.07 s a step on SmolLM2's 82 M factor parameters)
    optimizer = torch.optim.AdamW(trainable, lr=healing.lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 - done / healing.steps)
    order = torch.empty(0, dtype=torch.long)
    report_every = max(1, healing.steps // 12)
    running: list[tuple[float, float]] = []
    model.train()
    for step in range(1, healing.steps + 1):
        while order.numel() < healing.batch:  # every window once per pass, a fresh order each pass
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        rows, order = order[: healing.batch], order[healing.batch :]
        optimizer.zero_grad(set_to_none=True)
        nll_step, kl_step = 0.0, 0.0
        for chunk in rows.split(MICRO_BATCH):
            ids = targets.windows[chunk]
            with autocast:
                logits = model(input_ids=ids).logits
            nll, kl = distillation_terms(logits, ids, targets.log_probs[chunk], targets.tokens[chunk])
            del logits
            share = len(chunk) / len(rows)
            ((nll + healing.distill * kl) * share).backward()
            nll_step += nll.item() * share
            kl_step += kl.item() * share
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        running.append((nll_step, kl_step))
        if step % report_every == 0 or step == healing.steps:
            nll_mean = sum(r[0] for r in running) / len(running)
            kl_mean = sum(r[1] for r in running) / len(running)
            progress(f"healing step {step}/{healing.steps}: loss {nll_mean + healing.distill * kl_mean:.4f} "
                     f"(next-token {nll_mean:.4f}, KL {kl_mean:.4f}), {time.perf_counter() - start:.0f} s, "
                     f"RSS {rss_mb():.0f} MB, peak {peak_rss_mb():.0f} MB")
            running = []
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    del optimizer, schedule
    loss_after, kl_after = _judge(model, targets, held_rows)
    seconds = time.perf_counter() - start
    progress(f"healed in {seconds:.1f} s: held-back loss {loss_before:.4f} -> {loss_after:.4f}, "
             f"KL {kl_before:.4f} -> {kl_after:.4f}")
    return HealingReport(steps=healing.steps, batch=healing.batch, seq_len=healing.seq_len, lr=healing.lr,
                         distill=healing.distill, training_windows=count, held_back_windows=targets.held_back,
                         loss_before=round(loss_before, 5), loss_after=round(loss_after, 5),
                         kl_before=round(kl_before, 5), kl_after=round(kl_after, 5),
                         teacher_seconds=round(targets.seconds, 2), seconds=round(seconds, 2))


def write_model(writer: WeightSink, model: LlamaForCausalLM) -> None:
    """The model's tensors, a decoder layer per piece and then the rest (a tied head once)."""
    for index, layer in enumerate(model.model.layers):
        writer.add({f"model.layers.{index}.{k}": v for k, v in layer.state_dict().items()})
    tied = model.config.tie_word_embeddings
    writer.add({k: v for k, v in model.state_dict().items()
                if not k.startswith("model.layers.") and not (tied and k == "lm_head.weight")})


class Healer:
    """The pipeline's handle on healing: the dense model's targets first, then the held weights
    trained and written."""

    def __init__(self, ckpt: Checkpoint, tokenizer, cfg: CompressConfig, progress: Progress):
        self.cfg, self.progress = cfg, progress
        self.targets = teacher_targets(ckpt, tokenizer, cfg, progress)
        self.weights = HeldWeights()  # the strategy's writer while healing is on

    def heal_into(self, model: LlamaForCausalLM, writer: WeightSink) -> HealingReport:
        _materialize(model, self.weights)
        report = heal(model, self.targets, self.cfg.healing, self.cfg.seed, self.progress)
        write_model(writer, model)
        return report


def backward_memory(config, seq_len: int, windows: int) -> int:
    """Bytes one forward/backward pass of ``windows`` windows keeps for the backward (an estimate: about
    10 hidden-wide and 5 MLP-wide float32 values per token and layer, the attention weights, and a few
    vocabulary-wide copies of the logits)."""
    per_token = (config.num_hidden_layers * (10 * config.hidden_size + 5 * config.intermediate_size
                                             + config.num_attention_heads * seq_len) + 4 * config.vocab_size)
    return 4 * windows * seq_len * per_token


def healing_memory(ckpt: Checkpoint, cfg: CompressConfig, trainable: float) -> int:
    """Bytes healing adds beyond the compressed model: gradients and AdamW's two moments of the
    ``trainable`` factor parameters, the dense model's targets, and one micro-batch's activations
    and logits kept for the backward pass (an estimate: about 10 hidden-wide and 5 MLP-wide values
    per token and layer, the attention weights, and a few vocabulary-wide copies of the logits)."""
    healing, c = cfg.healing, ckpt.config
    if healing.steps == 0:
        return 0
    windows = healing.steps * healing.batch + healing.held_back
    targets = windows * healing.seq_len * healing.top_k * 8 + windows * healing.seq_len * 8
    activations = backward_memory(c, healing.seq_len, MICRO_BATCH)
    # bf16 autocast keeps a bfloat16 copy of every weight a forward pass multiplies by
    casts = 2 * (trainable + c.vocab_size * c.hidden_size) if healing.precision is not Precision.FP32 else 0
    return int(3 * 4 * trainable + casts) + targets + activations


def heal_written(model_dir: Path, unhealed: Path, out: Path, cfg: CompressConfig, progress: Progress,
                 then: Callable[[Path, LlamaForCausalLM, CompressionReport], CompressionReport] | None = None) -> CompressionReport:
    """Heal the factor pairs of ``unhealed`` (a checkpoint `compress` made of ``model_dir`` without
    healing) as ``cfg.healing`` says and write the result to ``out``. For factors made elsewhere (worker
    processes): healing trains the whole model, so it runs in one process after them. The report is
    the unhealed one plus healing; its seconds add the dense targets' and the training's. ``then``
    (folder, healed model, report) rewrites the folder before it becomes ``out`` (the head's
    factoring) and returns its report."""
    dense = open_checkpoint(model_dir)
    targets = teacher_targets(dense, load_tokenizer(model_dir), cfg, progress)
    torch.manual_seed(cfg.seed)
    model = load_model(open_checkpoint(unhealed))  # float32, as compress holds the factors it heals
    report = heal(model, targets, cfg.healing, cfg.seed, progress)
    return write_healed(model, unhealed, out, targets, report, DTYPES[cfg.dtype] if cfg.dtype else dense.stored_dtype,
                        cfg.overwrite, then, recorded_config(cfg))


def write_healed(model: LlamaForCausalLM, unhealed: Path, out: Path, targets: TeacherTargets, report: HealingReport,
                 dtype: torch.dtype, overwrite: bool,
                 then: Callable[[Path, LlamaForCausalLM, CompressionReport], CompressionReport] | None = None,
                 config: dict | None = None) -> CompressionReport:
    """Write ``model``, healed from the checkpoint ``unhealed``, to ``out`` with that checkpoint's report
    plus ``report``: the seconds a one-process `compress` would take (its own, the dense targets', the
    training's) and the larger peak RSS; ``then`` as in ``heal_written``; ``config`` the settings of the
    whole run (the unhealed checkpoint records its factoring stage's, healing off)."""
    before = CompressionReport.read(unhealed)
    healed = dataclasses.replace(before, healing=report, peak_memory_mb=round(max(before.peak_memory_mb, peak_rss_mb()), 1),
                                 config=before.config if config is None else config,
                                 wall_seconds=round(before.wall_seconds + targets.seconds + report.seconds, 2),
                                 schema_version=REPORT_SCHEMA_VERSION)  # written now, in today's format
    with atomic_folder(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, dtype)
        write_model(writer, model)
        writer.finish(model, unhealed, extra_files={REPORT_FILE: healed.to_json()})
        if then is not None:
            healed = then(tmp, model, healed)
    return healed
