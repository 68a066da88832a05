"""Transposes that only move dimensions of size 1, as reshapes, in the one-token graph.

With one token, transformers' ``view(1, 1, heads, head_dim).transpose(1, 2)`` and the attention
hooks' transposes back (export/et_attention.py) reorder nothing in memory, yet each becomes an
XNNPACK transpose that copies: six per layer for SmolLM2. A reshape to the same shape is the same
values, and XNNPACK's reshape costs next to nothing in an ETDump profile. Measured on SmolLM2-135M
at 40% + head 128, int4, rankdown-et-runner, 2 threads: decode 1.014x on top of
export/et_rotary.py (8 rounds interleaved; docs/measurements.md, "Run x" under Beside the peers).

``drop_unit_reshapes`` then removes most of those reshapes. Moving a dimension of size 1 changes no
memory order, so the rotary between the heads' view and the attention (multiplies by the
``[1, 1, 1, head_dim]`` cos and sin, the rotate-half linear, an add) computes the same numbers in
either layout: the swap and the swap back both go, and a reshape of a reshape becomes one. Each
XNNPACK operator, a reshape too, costs the delegate a reshape and setup pass on every call.

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
    return _recompiled(program, replaced)


def _recompiled(program, changes: int) -> int:
    """``changes``, after checking and recompiling ``program``'s graph if there were any."""
    if changes:
        program.graph_module.graph.lint()
        program.graph_module.recompile()
    return changes


_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default)
# Ops that compute the same numbers whichever dims of size 1 their operands are laid out in, as long
# as every other operand is of size 1 along the moved dims (elementwise with broadcasting; a linear
# acts on the last dim only).
_ELEMENTWISE = (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor,
                torch.ops.aten.neg.default)


def _static_shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    shape = tuple(getattr(val, "shape", ()))
    return shape if val is not None and all(isinstance(size, int) for size in shape) else None


def _unit_swap(node) -> tuple[int, int] | None:
    """(a, b) if ``node`` is a reshape that swaps dims a and b of its input, one of them of size 1
    and every dim between them of size 1 too: the larger dims keep their order, so each element
    keeps its coordinates along them."""
    if node.op != "call_function" or node.target not in _RESHAPES:
        return None
    before, after = _static_shape(node.args[0]), _static_shape(node)
    if before is None or after is None or len(before) != len(after) or before == after:
        return None
    moved = [d for d in range(len(before)) if before[d] != after[d]]
    if len(moved) != 2:
        return None
    a, b = moved
    if before[a] != after[b] or before[b] != after[a] or 1 not in (before[a], before[b]):
        return None
    if any(before[d] != 1 for d in range(a + 1, b)):
        return None  # the moved dim would pass a larger one: the same memory, other coordinates
    return a, b


def _region(swap, axes: tuple[int, int]) -> list | None:
    """The nodes fed by ``swap`` up to the reshapes that read them, if every one of them computes the
    same in ``swap``'s input layout; None if one would not (then the swap stays)."""
    rank = len(_static_shape(swap) or ())
    region: dict = {}
    frontier = [swap]
    while frontier:
        for user in frontier.pop().users:
            if user not in region and user.target not in _RESHAPES:  # a reshape reads memory order: the same
                region[user] = None
                frontier.append(user)
    inside = set(region) | {swap}
    for node in region:
        shape = _static_shape(node)
        if shape is None or len(shape) != rank:
            return None
        if node.target in _ELEMENTWISE:
            for other in node.args:
                if not isinstance(other, torch.fx.Node) or other in inside:
                    continue
                other_shape = _static_shape(other)
                if other_shape is None:
                    return None
                padded = (1,) * (rank - len(other_shape)) + other_shape
                if any(padded[d] != 1 for d in axes):
                    return None
        elif node.target is torch.ops.aten.linear.default:
            if node.args[0] not in inside or any(a in inside for a in node.args[1:]) or rank - 1 in axes:
                return None
        else:
            return None
    return list(region)


def drop_unit_reshapes(program) -> int:
    """In a statically shaped program: undo reshapes that only swap a dim of size 1 where what they
    feed computes the same in the other layout, merge reshapes of reshapes, and remove reshapes to
    the shape they are given. Returns how many reshapes went."""
    graph = program.graph_module.graph
    removed = 0
    for node in list(graph.nodes):
        axes = _unit_swap(node)
        if axes is None:
            continue
        region = _region(node, axes)
        if region is None:
            continue
        source = node.args[0]
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        removed += 1
        for member in region:
            order = list(range(len(member.meta["val"].shape)))
            order[axes[0]], order[axes[1]] = order[axes[1]], order[axes[0]]
            member.meta["val"] = member.meta["val"].permute(order).contiguous()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _RESHAPES:
            continue
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.target in _RESHAPES and len(source.users) == 1:
            node.args = (source.args[0], *node.args[1:])
            graph.erase_node(source)
            removed += 1
            source = node.args[0]
        before, after = _static_shape(source), _static_shape(node)
        if before is not None and before == after:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            removed += 1
    return _recompiled(program, removed)
