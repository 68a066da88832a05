"""One MatMulNBits per input for ONNX int4: the quantized nodes (of equal bits, K and block) that
read the same activation (a Llama layer's q/k/v first stages, its gate/up first stages: a factor
pair's ``down`` or a dense linear) become one node over their stacked rows (and biases) and a
``Split``, as export/et_fused_inputs.py does for the .pte. Every factor pair is still two
matmuls: its ``down`` is rows of one node, its ``up`` runs alone.

Why: at accuracy level 4 each MatMulNBits quantizes its input to int8 per block and is its own
kernel call with its own thread-pool dispatch, so a 40% model whose layers hold five factor pairs
runs up to 12 such calls per layer where the dense model runs 4 (q/k/v packed). Stacking rows
leaves each row's codes, scales and zero points, and the int8 input, as they were: the results are
the same numbers. docs/measurements.md ("ONNX int4: one `MatMulNBits` per input") has the measurement.

The fused node lists its members (name, rows) in its ``doc_string``, so the factor-node count
(export/factor_nodes.py) and the int4 read-back (export/onnx_int4_reference.py) still see each
member by the name the quantizer gave it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

FUSED_PREFIX = "rankdown fused inputs: "
_BIAS = 5  # MatMulNBits' inputs: A, B, scales, zero_points, g_idx, bias


def fused_members(node) -> list[tuple[str, int]] | None:
    """``[(member node name, rows), ...]`` for a node this pass made; None for any other node."""
    if not node.doc_string.startswith(FUSED_PREFIX):
        return None
    return [(str(name), int(rows)) for name, rows in json.loads(node.doc_string[len(FUSED_PREFIX):])]


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _key(node, initializers: dict, uses: Counter) -> tuple | None:
    """What a node must share with another to be stacked with it; None if it cannot be (a weight
    that is not its own constant, a ``g_idx``)."""
    inputs = list(node.input) + [""] * (6 - len(node.input))
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or inputs[4]:
        return None
    own = [name for name in inputs[1:4] + [inputs[_BIAS]] if name]
    if not all(name in initializers and uses[name] == 1 for name in own):
        return None  # a weight another node reads too (a tied lookup reads the head's blocks)
    attributes = _attributes(node)
    return (inputs[0], attributes.get("K"), attributes.get("bits", 4), attributes.get("block_size"),
            attributes.get("accuracy_level", 0), bool(inputs[3]))


def _stack(arrays: list, rows: list[int]):
    """Stack per-node tensors whose first axis (or, flat, whose leading ``rows[i]`` parts) is N."""
    import numpy as np

    flat = arrays[0].ndim == 1
    stacked = np.concatenate([a.reshape(n, -1) for a, n in zip(arrays, rows, strict=True)])
    return stacked.reshape(-1) if flat else stacked.reshape((sum(rows), *arrays[0].shape[1:]))


def fuse_shared_inputs(graph) -> int:
    """Rewrite ``graph`` in place; returns how many MatMulNBits nodes it removed."""
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    nodes = list(graph.node)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, node in enumerate(nodes):
        key = _key(node, initializers, uses)
        if key is not None:
            groups[key].append(index)
    prefixes: set[str] = set()
    replaced: dict[int, list] = {}  # a group's first member's index -> the fused node and its Split
    dropped: set[int] = set()
    for key, indices in groups.items():
        if len(indices) < 2:
            continue
        members = [nodes[i] for i in indices]
        rows = [int(_attributes(m)["N"]) for m in members]
        inputs = [list(m.input) + [""] * (6 - len(m.input)) for m in members]

        def take(slot: int, inputs=inputs) -> list:
            return [numpy_helper.to_array(initializers[i[slot]]) for i in inputs]

        prefix = "/fused_inputs/" + key[0].lstrip("/")
        if prefix in prefixes:  # another group on this input (other bits or block), or a name that differs by a '/'
            prefix += f"_{len(prefixes)}"
        prefixes.add(prefix)
        stacked = [numpy_helper.from_array(_stack(take(1), rows), prefix + "/weight"),
                   numpy_helper.from_array(_stack(take(2), rows), prefix + "/scales")]
        if key[-1]:
            stacked.append(numpy_helper.from_array(_stack(take(3), rows), prefix + "/zero_points"))
        fused_inputs = [key[0]] + [t.name for t in stacked]
        biases = [numpy_helper.to_array(initializers[i[_BIAS]]) if i[_BIAS] else None for i in inputs]
        if any(b is not None for b in biases):
            dtype = next(b.dtype for b in biases if b is not None)
            bias = np.concatenate([np.zeros(n, dtype) if b is None else b for b, n in zip(biases, rows, strict=True)])
            stacked.append(numpy_helper.from_array(bias, prefix + "/bias"))
            fused_inputs += [""] * (_BIAS - len(fused_inputs)) + [prefix + "/bias"]
        sizes = numpy_helper.from_array(np.asarray(rows, np.int64), prefix + "/split")
        attributes = _attributes(members[0]) | {"N": sum(rows)}
        fused = helper.make_node("MatMulNBits", fused_inputs, [prefix + "/output_0"], name=prefix + "/MatMulNBits",
                                 domain="com.microsoft", **attributes)
        fused.doc_string = FUSED_PREFIX + json.dumps([[m.name, n] for m, n in zip(members, rows, strict=True)])
        split = helper.make_node("Split", [fused.output[0], sizes.name], [m.output[0] for m in members],
                                 name=prefix + "/Split", axis=-1)
        for name in {n for i in inputs for n in i[1:] if n}:
            graph.initializer.remove(initializers[name])
        graph.initializer.extend([*stacked, sizes])
        # The group's input exists before its first member, and every member's consumers come
        # after that member: the fused node and its Split in the first member's place keep the
        # graph in topological order.
        replaced[indices[0]] = [fused, split]
        dropped.update(indices[1:])
    if not replaced:
        return 0
    rewritten = []
    for index, node in enumerate(nodes):
        if index in dropped:
            continue
        rewritten.extend(replaced.get(index, [node]))
    del graph.node[:]
    graph.node.extend(rewritten)
    return len(dropped)
