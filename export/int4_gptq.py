"""Data-aware rounding of the 4-bit weights (GPTQ, Frantar et al., 2022), for a checkpoint that was
not healed through them: ExecuTorch's here, ONNX's on its graph (export/onnx_int4_gptq.py) with the
same solve. The decoder's linears, and a 4-bit head (``--head-bits 4``) on the final hidden states.

Rounding each weight to its nearest code ignores that the errors of one output row add up through
the same inputs. GPTQ rounds a row's columns one at a time and moves the rounding error onto the
columns not yet rounded, weighted by the inputs' second moments H = X^T X on calibration text, so
the row's output error ||(W - Q) X|| is what is kept small, not each weight's. The scales stay the
ones the export chose (torchao's, rounded to bfloat16 as XNNPACK stores them: "static groups"), so
the format, the kernels and the file are the same; only which code each weight gets changes.

The statistics come from the float model's hidden states, one forward pass layer by layer, one
layer's statistics in memory at a time. Measured on dense SmolLM2-135M-Instruct, 8da4w groups of 32,
HQQ scales, PyTorch, on 8,192 evaluation tokens of math, code and prose (docs/measurements.md, "GPTQ
rounding"): perplexity x1.337 of the float model's with nearest rounding, x1.161 with GPTQ on
128 x 256 calibration tokens (top-1 agreement 69.0% -> 78.4%), 90 s more on 2 cores; the quantized
model's own stream, each layer run again once rounded, gave x1.149 (78.6%) in twice the time; with
the three tasks' windows taken in turn as compress takes a mix (what ``gptq_windows`` does), x1.150.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rankdown.compress.calibration import layer_inputs, run_layer
from rankdown.compress.training_data import task_windows
from rankdown.export.et_int4 import DecomposedQuantLinear
from rankdown.int4_numerics import QMAX, QMIN
from rankdown.tasks import Split

WINDOWS = 128  # calibration windows (GPTQ's paper uses 128 x 2048 tokens; 128 x 256 was measured here)
SEQ_LEN = 256
BATCH = 8  # windows per forward pass
DAMP = 0.01  # of the mean diagonal of H, added to it: an input no text exercises still inverts
ROWS_PER_SOLVE = 8192  # a solve holds a few float64 copies of its rows: 8192 x 4096 x 8 bytes each for an 8B head
HEAD = "lm_head"
BLOCK = 128  # columns rounded before the error is carried to the rest in one product (lazy batch updates)


@dataclass(frozen=True)
class GptqResult:
    """What the rounding did: linears rounded, and the calibration-weighted output error
    sum tr(E H E^T) over them with GPTQ's codes and with nearest rounding, E = W - dequantized."""

    linears: int
    tokens: int
    error: float
    nearest_error: float
    codes_sha256: str  # of every rounded linear's codes, in module order: validate's rebuild is checked against it
    walked: bool = True  # False: on statistics an earlier walk kept (``GptqStatistics``)

    @property
    def error_ratio(self) -> float:
        return self.error / self.nearest_error if self.nearest_error > 0 else 1.0

    def summary(self, fmt: str) -> str:
        """The export's line for it."""
        read = "" if self.walked else "; the statistics read back from the first format's walk"
        return (f"  {fmt}: GPTQ rounding of {self.linears} 4-bit linear(s) on {self.tokens} calibration tokens: "
                f"their output error {self.error_ratio:.2f}x nearest rounding's{read}")


def gptq_record(result: GptqResult) -> dict:
    """The manifest's record of a GPTQ rounding."""
    return {"linears": result.linears, "tokens": result.tokens,
            "error_vs_nearest": round(result.error_ratio, 4), "codes_sha256": result.codes_sha256}


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor,
               quant_range: tuple[int, int] = (QMIN, QMAX), damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """The integer codes (rows x columns, float64) of ``weight`` (rows x columns) at the fixed
    ``scales`` (rows x groups; the groups split the columns evenly), chosen by GPTQ on ``hessian``
    (columns x columns, the inputs' X^T X). With a diagonal ``hessian`` nothing is carried from one
    column to the next, and the codes are nearest rounding's."""
    rows, columns = weight.shape
    return gptq_codes_at(weight, hessian, _steps(scales.detach().to(torch.float64), rows, columns), None,
                         quant_range, damp, block)


def gptq_codes_at(weight: torch.Tensor, hessian: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None,
                  quant_range: tuple[int, int], damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """``gptq_codes`` with each weight's own ``step`` and integer ``zero`` point (rows x columns; None:
    symmetric, zero 0), dequantized as ``(code - zero) * step``: an asymmetric block format such as
    onnxruntime's ``MatMulNBits``. A step of 0 (a block of zeros) dequantizes to 0 whatever the code;
    its code is the zero point."""
    rows, columns = weight.shape
    low, high = quant_range
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    step = step.to(torch.float64)
    zero = torch.zeros_like(step) if zero is None else zero.to(torch.float64)
    live = step != 0
    divisor = torch.where(live, step, torch.ones_like(step))
    dead = torch.diagonal(h) == 0  # an input that is always zero: its weights do nothing
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(columns, dtype=h.dtype)
    # The upper Cholesky factor of H^-1: row i holds how column i's error spreads over the later columns.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part = w[:, start:end].clone()
        errors = torch.empty_like(part)
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            q = torch.clamp(torch.round(part[:, i] / divisor[:, column]) + zero[:, column], low, high)
            q = torch.where(live[:, column], q, zero[:, column])
            codes[:, column] = q
            error = (part[:, i] - (q - zero[:, column]) * step[:, column]) / local[i, i]
            part[:, i:] -= error[:, None] * local[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes


def weighted_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T), E = ``weight`` - ``dequantized``: the squared output error over the calibration tokens."""
    error = weight.to(torch.float64) - dequantized.to(torch.float64)
    return float(((error @ hessian.to(torch.float64)) * error).sum())


def gptq_memory(config, windows: int = WINDOWS, seq_len: int = SEQ_LEN) -> int:
    """Bytes GPTQ rounding holds beside the models: the hidden states of every calibration token
    entering and leaving a layer (float32), one layer's X^T X sums (float64: attention, its output,
    the MLP and its ``down``), and the widest linear's solve (its weights, codes and steps, and H,
    its Cholesky factor and inverse, float64). A factor pair's halves are narrower than the dense linear."""
    hidden, inner = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    stream = 2 * windows * seq_len * hidden * 4
    grams = 8 * (2 * hidden**2 + heads**2 + inner**2)
    widest = max(hidden, inner, heads)
    solve = 8 * (3 * widest**2 + 4 * widest * hidden)
    return stream + grams + solve


def gptq_windows(tokenizer, tasks: tuple[str, ...], windows: int = WINDOWS, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Calibration windows (N x ``seq_len``) from the calibration split of ``tasks``, as compress takes
    a task mix (the floor is judged on the evaluation split)."""
    return task_windows(tokenizer, tasks, Split.CALIBRATION, seq_len, windows * seq_len)


class InputGrams:
    """X^T X of each hooked linear's input, summed over the calibration tokens. Within one call of the
    layer, the linears that read one tensor (q/k/v, gate/up, or their factor pairs' ``down``s, which
    their ``up``s run between) share one sum, and a shared ``down`` its members call once each adds it once."""

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.source: dict[str, str] = {}  # linear -> the linear whose sum it shares
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # this call's inputs (kept alive: ids stay unique)
        self._handles = [layer.register_forward_pre_hook(lambda *_: self._seen.clear())]
        self._handles += [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def take(_module, args):
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:
                self.source[name] = seen[1]
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            gram = (flat.T @ flat).to(torch.float64)
            self.sums[name] = self.sums[name] + gram if name in self.sums else gram
            self.source[name] = name
            self._seen[id(x)] = (x, name)
        return take

    def of(self, name: str) -> torch.Tensor:
        return self.sums[self.source[name]]

    def close(self) -> None:
        self._seen.clear()
        for handle in self._handles:
            handle.remove()

    def write(self, path: Path) -> None:
        """The sums (float64, as summed) and which linear shares which, for ``StoredGrams.read``."""
        save_file(self.sums, str(path), metadata={"source": json.dumps(self.source)})


class StoredGrams:
    """An ``InputGrams`` read back from ``InputGrams.write``'s file."""

    def __init__(self, sums: dict[str, torch.Tensor], source: dict[str, str]):
        self.sums, self.source = sums, source

    @classmethod
    def read(cls, path: Path) -> StoredGrams:
        with safe_open(str(path), framework="pt") as f:
            source = json.loads((f.metadata() or {})["source"])
            return cls({name: f.get_tensor(name) for name in f.keys()}, source)  # noqa: SIM118 (safe_open has no __iter__)

    def of(self, name: str) -> torch.Tensor:
        return self.sums[self.source[name]]


Grams = InputGrams | StoredGrams


class GptqStatistics:
    """The inputs' X^T X of every linear of ``model`` (the float model the weights are rounded from)
    on the calibration ``windows``: each decoder layer's, and the head's on the final hidden states,
    from one walk, layer by layer (one layer's sums in memory at a time).

    The head's come from the walk's last hidden states, not from a second pass of the whole model
    (on SmolLM2-135M that second pass cost 29 s beside the walk's 34 s). With ``keep`` (a folder
    that does not exist yet), each layer's sums are also written there as the walk goes, so that a
    second reader, the other format of the same export, reads them back instead of walking again;
    the numbers it reads are the walk's own, so its codes are the same as a walk of its own gives."""

    def __init__(self, model: Any, windows: torch.Tensor, keep: Path | None = None):
        self.model = model
        self.windows = windows
        self.tokens = int(windows.numel())
        self.kept = keep
        self._complete = False  # a walk wrote every layer's sums to ``keep``
        self._head: Grams | None = None
        self.walks = 0  # passes of the model over the windows (each layer's, or to the head's input)

    def layers(self) -> Iterator[tuple[int, Grams]]:
        """(index, its sums) for each decoder layer in order: read back where a walk kept them, else walked."""
        count = len(self.model.model.layers)
        if self.kept is not None and self._complete:
            for index in range(count):
                yield index, StoredGrams.read(self.kept / f"layer-{index}.safetensors")
            return
        if self.kept is not None:
            self.kept.mkdir(parents=True, exist_ok=True)
        self.walks += 1
        hidden = layer_inputs(self.model, self.windows)
        for index, layer in enumerate(self.model.model.layers):
            grams = InputGrams(layer, _linears(layer))
            try:
                hidden = run_layer(self.model, layer, hidden, BATCH)
            finally:
                grams.close()
            if self.kept is not None:
                grams.write(self.kept / f"layer-{index}.safetensors")
            yield index, grams
            del grams
        self._complete = self.kept is not None
        if self._head is None:
            self._head = self._head_grams(hidden)

    def head(self) -> Grams:
        """The sums of the head's linears' inputs (``lm_head``, or a factored head's halves)."""
        if self._head is None:
            self.walks += 1
            hidden = layer_inputs(self.model, self.windows)
            for layer in self.model.model.layers:  # no statistics wanted: the hidden states only
                hidden = run_layer(self.model, layer, hidden, BATCH)
            self._head = self._head_grams(hidden)
        return self._head

    def discard(self) -> None:
        """Remove what the walk kept on disk (nothing where no walk over the layers ran: a head alone)."""
        if self.kept is not None and self.kept.exists():
            shutil.rmtree(self.kept)
        self._complete = False

    @torch.no_grad()
    def _head_grams(self, hidden: torch.Tensor) -> Grams:
        head = self.model.get_submodule(HEAD)
        linears = _linears(head, HEAD)
        grams = InputGrams(head, linears)
        # Once every linear's input is summed the rest of the head (the vocabulary-wide product) is not needed.
        stop = _StopWhenSeen(linears)
        try:
            for start in range(0, hidden.shape[0], BATCH):
                with contextlib.suppress(_AllSeen):
                    head(self.model.model.norm(hidden[start : start + BATCH]))
        finally:
            stop.close()
            grams.close()
        return grams


KEPT_FOLDER = ".gptq-statistics"
KEEP_MARGIN = 256 << 20  # free space left beside the kept statistics


def kept_bytes(model: Any) -> int:
    """At most the bytes ``GptqStatistics`` keeps on disk for ``model``: every decoder linear's input
    sum in float64 (linears that read one input share a sum, so the kept files are smaller)."""
    widths = [m.in_features for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    return 8 * sum(width * width for width in widths)


def _linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every ``nn.Linear`` in ``module`` by its name there (``prefix``: the name ``module`` itself has)."""
    return {".".join(p for p in (prefix, name) if p): m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


class _AllSeen(Exception):
    """Ends a forward pass once every hooked linear's input is summed."""


class _StopWhenSeen:
    def __init__(self, linears: dict[str, nn.Module]):
        # registered after the sums' hooks, so each linear's input is summed before this runs
        self._handles = [m.register_forward_pre_hook(self._hook) for m in linears.values()]
        self._want, self._calls = len(linears), 0

    def _hook(self, *_):
        self._calls += 1
        if self._calls % self._want == 0:
            raise _AllSeen

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _steps(scales: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Per-group (or per-row) ``scales`` spread over the ``columns`` they cover: rows x columns."""
    scales = scales.reshape(rows, -1)
    return scales.repeat_interleave(columns // scales.shape[1], 1)


def _zero_padded(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` in the top-left corner of zeros of ``shape``: int4 pads a factor pair's rank to a
    multiple of the group (zero rows in ``down``, zero columns in ``up``, so zero inputs after it)."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return padded


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, DecomposedQuantLinear) and module.quant_range == (QMIN, QMAX)


@torch.no_grad()
def gptq_round(quantized: Any, stats: GptqStatistics, progress: Callable[[str], None] = print,
               decoder: bool = True, head: bool = True) -> GptqResult:
    """Give, in place, every 4-bit decoder linear of ``quantized`` (export/et_int4.py's model, before
    its inputs are fused; ``decoder``) and a 4-bit head (``head``) GPTQ's codes at their own scales, on
    ``stats``, whose model is the float model ``quantized`` was made from (the same module names)."""
    float_model = stats.model
    walks = stats.walks
    layers = quantized.model.layers
    rounded, error, nearest = 0, 0.0, 0.0
    digest = hashlib.sha256()

    def four_bit(index: int) -> list[str]:
        return [name for name, m in layers[index].named_modules() if _is_4bit(m)]

    def round_linear(key: str, linear: Any, float_weight: torch.Tensor, gram: torch.Tensor) -> None:
        nonlocal rounded, error, nearest
        rows, columns = linear.weight.shape
        hessian = _zero_padded(gram, (columns, columns))
        digest.update(key.encode())
        # rows are rounded independently: a vocabulary-wide head in slices, not one float64 solve of GBs
        for start in range(0, rows, ROWS_PER_SOLVE):
            part = slice(start, min(start + ROWS_PER_SOLVE, rows))
            weight = _zero_padded(float_weight.detach(), (rows, columns))[part]
            scales = linear.scales.reshape(rows, -1)[part]
            step = _steps(scales, part.stop - part.start, columns)
            nearest += weighted_error(weight, linear.weight[part].to(torch.float64) * step, hessian)
            codes = gptq_codes(weight, hessian, scales, linear.quant_range)
            error += weighted_error(weight, codes * step, hessian)
            linear.weight[part] = codes.to(linear.weight.dtype)
            digest.update(codes.to(torch.int8).numpy().tobytes())
        rounded += 1

    for index, grams in (stats.layers() if decoder else ()):
        for name in four_bit(index):
            round_linear(f"{index}.{name}", layers[index].get_submodule(name),
                         float_model.get_submodule(f"model.layers.{index}.{name}").weight, grams.of(name))
        if (index + 1) % 10 == 0 or index + 1 == len(layers):
            progress(f"  executorch: GPTQ rounding, layer {index + 1}/{len(layers)}")
    heads = [name for name, m in quantized.named_modules() if name.startswith(HEAD) and _is_4bit(m)] if head else []
    if heads:
        grams = stats.head()
        for name in heads:
            round_linear(name, quantized.get_submodule(name), float_model.get_submodule(name).weight, grams.of(name))
        progress(f"  executorch: GPTQ rounding, the 4-bit head ({len(heads)} linear(s))")
    return GptqResult(rounded, stats.tokens, error, nearest, digest.hexdigest(), walked=stats.walks > walks)
