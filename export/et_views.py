"""Transposes that only move dimensions of size 1, as reshapes, in the one-token graph.

With one token, transformers' ``view(1, 1, heads, head_dim).transpose(1, 2)`` and the attention
hooks' transposes back (export/et_attention.py) reorder nothing in memory, yet each becomes an
XNNPACK transpose that copies: six per layer for SmolLM2. A reshape to the same shape is the same
values, and XNNPACK's reshape costs next to nothing in an ETDump profile. Measured on SmolLM2-135M
at 40% + head 128, int4, rankdown-et-runner, 2 threads: decode 1.014x on top of
export/et_rotary.py (8 rounds interleaved; README, "Run x" under Beside the peers).

Only for a program whose shapes are static (``DECODE_METHOD``): in ``forward`` the token count is
symbolic, and whether a dimension is 1 is not known when the graph is built.
"""

from __future__ import annotations

import torch

_PERMUTES = (torch.ops.aten.transpose.int, torch.ops.aten.permute.default)


def _permutation(node, rank: int) -> list[int]:
    if node.target is torch.ops.aten.transpose.int:
        a, b = (d % rank for d in node.args[1:3])
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
        return order
    return [d % rank for d in node.args[1]]


def reshape_unit_permutes(program) -> int:
    """Replace, in place, every transpose/permute of a statically shaped tensor that keeps the
    order of its dimensions larger than 1 by a reshape to its output shape. Returns how many."""
    graph = program.graph_module.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _PERMUTES:
            continue
        shape = tuple(node.args[0].meta["val"].shape)
        if not all(isinstance(size, int) for size in shape):
            continue
        order = _permutation(node, len(shape))
        moved = [d for d in order if shape[d] != 1]
        if moved != sorted(moved):
            continue
        with graph.inserting_before(node):
            view = graph.call_function(torch.ops.aten.reshape.default, (node.args[0], [shape[d] for d in order]))
        view.meta = dict(node.meta)
        node.replace_all_uses_with(view)
        graph.erase_node(node)
        replaced += 1
    if replaced:
        graph.lint()
        program.graph_module.recompile()
    return replaced
