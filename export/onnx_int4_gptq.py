"""GPTQ codes for the ONNX 4-bit weights, on the quantized graph (export/int4_gptq.py for the method).

onnxruntime's ``MatMulNBitsQuantizer`` chooses each block's scale and zero point and rounds every
weight to its nearest code; its own GPTQ (``GPTQWeightOnlyQuantConfig``) needs Intel's Neural
Compressor and an ONNX calibration reader for a graph with a KV cache. So the blocks stay the
quantizer's (scales as stored, fp16 included; zero points), and only the codes are chosen again here,
by the same GPTQ as ExecuTorch int4, on the inputs' X^T X from the float PyTorch model the graph was
exported from, layer by layer. The file, its nodes and kernels are unchanged; ``validate`` reads the
codes back from the graph (export/onnx_int4_reference.py), so nothing is rebuilt to check it.

A node's rows are a linear's (or, for a stacked node, its members' in order: export/onnx_fused_inputs.py;
the fused graph's dense q/k/v are one ``qkv_proj``), so each linear is rounded on its own input
statistics and its codes are written back into its rows. The decoder layers' 4-bit nodes are
rounded, and a 4-bit head (``--head-bits 4``) on the final hidden states, whose blocks a tied lookup
reads too (export/onnx_int4.py): on dense SmolLM2-135M with ``--task compare`` the 4-bit head's .onnx
went from perplexity +7.0% to +0.2% of the float model's, float top-1 79.7% -> 84.1% (docs/measurements.md,
"GPTQ for ONNX int4"). ExecuTorch rounds a 4-bit head the same way (its lookup keeps its own 8-bit
table); an 8-bit head keeps nearest rounding in both.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from rankdown.errors import RankdownError
from rankdown.export.int4_gptq import HEAD, ROWS_PER_SOLVE, GptqResult, GptqStatistics, gptq_codes_at, weighted_error
from rankdown.export.onnx_fused_inputs import fused_members
from rankdown.export.onnx_int4_reference import node_linears

BITS = 4


@dataclass(frozen=True)
class _Rows:
    """Where one linear's codes lie: ``rows`` rows of ``node``'s weight from ``start``."""

    node: str
    start: int
    rows: int


class _NodeBlocks:
    """One ``MatMulNBits`` node's codes (unpacked, writable), steps and zero points."""

    def __init__(self, node, constant: Callable[[str], np.ndarray]):
        attributes = {a.name: a.i for a in node.attribute if a.type == a.INT}
        self.k, self.n, self.block = attributes["K"], attributes["N"], attributes["block_size"]
        self.weight_name = node.input[1]
        packed = constant(node.input[1]).reshape(self.n, -1)
        self.codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(self.n, -1)  # low nibble first
        blocks = self.codes.shape[1] // self.block
        self.scales = constant(node.input[2]).astype(np.float32).reshape(self.n, blocks)
        zero_points = node.input[3] if len(node.input) > 3 and node.input[3] else ""
        if zero_points:
            packed_zeros = constant(zero_points).reshape(self.n, -1)
            self.zeros = np.stack([packed_zeros & 0x0F, packed_zeros >> 4], axis=-1).reshape(self.n, -1)[:, :blocks]
        else:
            self.zeros = np.full((self.n, blocks), 1 << (BITS - 1), np.uint8)  # the operator's default

    def spread(self, values: np.ndarray, rows: slice) -> torch.Tensor:
        """Per-block ``values`` of ``rows`` repeated over the K columns they cover (the padding cut)."""
        return torch.from_numpy(np.repeat(values[rows].astype(np.float64), self.block, axis=1)[:, : self.k])

    def packed(self) -> np.ndarray:
        pairs = self.codes.reshape(self.n, -1, 2).astype(np.uint8)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(self.n, -1, self.block // 2)


def _four_bit_rows(graph, model) -> dict[str, _Rows]:
    """``{linear's module path: its rows}`` for every 4-bit ``MatMulNBits`` of the decoder layers and head."""
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found: dict[str, _Rows] = {}
    for node in graph.node:
        attributes = {a.name: a.i for a in node.attribute if a.type == a.INT}
        if node.op_type != "MatMulNBits" or attributes.get("bits", 4) != BITS:
            continue
        offset = 0
        for name, rows in fused_members(node) or [(node.name, attributes["N"])]:
            spans = node_linears(name, rows, model, linears)
            if spans is None:
                raise RankdownError(f"MatMulNBits node {name} matches no linear of the model")
            for path, start, width in spans:
                if path in found:
                    raise RankdownError(f"MatMulNBits nodes {found[path].node} and {node.name} both map to {path}")
                found[path] = _Rows(node.name, offset + start, width)
            offset += rows
        if offset != attributes["N"]:
            raise RankdownError(f"MatMulNBits node {node.name} has {attributes['N']} rows, its linears {offset}")
    return {path: rows for path, rows in found.items() if path.startswith(("model.layers.", HEAD))}


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    return cast(torch.Tensor, module.get_submodule(name).weight)


@torch.no_grad()
def gptq_round_graph(graph, stats: GptqStatistics, progress: Callable[[str], None] = print,
                     decoder: bool = True, head: bool = True) -> GptqResult:
    """Give, in place, every 4-bit decoder ``MatMulNBits`` of ``graph`` (an onnx GraphProto, scales
    possibly behind Casts; ``decoder``) and a 4-bit head (``head``) GPTQ's codes at their own blocks,
    on ``stats``, whose model is the float model the graph was exported from."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    casts = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Cast" and node.input[0] in initializers}

    def constant(name: str) -> np.ndarray:
        source = casts.get(name, name)
        if source not in initializers:
            raise RankdownError(f"MatMulNBits input {name} is not a constant; cannot round its weights again")
        return numpy_helper.to_array(initializers[source])

    model, walks = stats.model, stats.walks
    nodes = {node.name: node for node in graph.node}
    targets = {path: rows for path, rows in _four_bit_rows(graph, model).items()
               if (head if path.startswith(HEAD) else decoder)}
    blocks: dict[str, _NodeBlocks] = {}
    layers = model.model.layers
    rounded, error, nearest = 0, 0.0, 0.0
    digest = hashlib.sha256()

    def mine(index: int) -> dict[str, _Rows]:
        prefix = f"model.layers.{index}."
        return {path[len(prefix):]: rows for path, rows in targets.items() if path.startswith(prefix)}

    left = Counter(rows.node for rows in targets.values())  # linears still to round, per node

    def round_linear(path: str, full: torch.Tensor, hessian: torch.Tensor) -> None:
        nonlocal rounded, error, nearest
        where = targets[path]
        if where.node not in blocks:
            blocks[where.node] = _NodeBlocks(nodes[where.node], constant)
        node = blocks[where.node]
        if tuple(full.shape) != (where.rows, node.k):
            raise RankdownError(f"MatMulNBits node {where.node}: {where.rows} x {node.k} rows for {path}, "
                                f"whose weight is {tuple(full.shape)}")
        # rows are rounded independently: a vocabulary-wide head in slices, not one float64 solve of GBs
        for start in range(0, where.rows, ROWS_PER_SOLVE):
            part = slice(start, min(start + ROWS_PER_SOLVE, where.rows))
            rows = slice(where.start + part.start, where.start + part.stop)
            weight = full.detach()[part].to(torch.float64)
            step, zero = node.spread(node.scales, rows), node.spread(node.zeros, rows)
            before = torch.from_numpy(node.codes[rows, : node.k].astype(np.float64))
            nearest += weighted_error(weight, (before - zero) * step, hessian)
            codes = gptq_codes_at(weight, hessian, step, zero, (0, (1 << BITS) - 1))
            error += weighted_error(weight, (codes - zero) * step, hessian)
            node.codes[rows, : node.k] = codes.numpy().astype(np.uint8)
            digest.update(f"{path}.{start}".encode() + codes.to(torch.int8).numpy().tobytes())
        rounded += 1
        left[where.node] -= 1
        if not left[where.node]:  # the node's last linear: packed back now, so one node's codes are unpacked at a time
            at = list(graph.initializer).index(initializers[node.weight_name])
            graph.initializer.remove(initializers[node.weight_name])
            graph.initializer.insert(at, numpy_helper.from_array(node.packed(), node.weight_name))
            del blocks[where.node]

    for index, grams in (stats.layers() if decoder else ()):
        for name in mine(index):
            round_linear(f"model.layers.{index}.{name}", _weight(layers[index], name), grams.of(name))
        if (index + 1) % 10 == 0 or index + 1 == len(layers):
            progress(f"  onnx: GPTQ rounding, layer {index + 1}/{len(layers)}")
    heads = [path for path in targets if path.startswith(HEAD)]  # a 4-bit head
    if heads:
        grams = stats.head()
        for path in heads:
            round_linear(path, _weight(model, path), grams.of(path))
        progress(f"  onnx: GPTQ rounding, the 4-bit head ({len(heads)} matmul(s))")
    return GptqResult(rounded, stats.tokens, error, nearest, digest.hexdigest(), walked=stats.walks > walks)
