"""Count the graph nodes that carry each factor pair, so a pair folded into one dense weight
(by an exporter's constant folding, a fusion pass, or a bug) is caught at export time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rankdown.errors import RankdownError
from rankdown.export.et_norms import MEAN_BUFFER
from rankdown.export.et_rotary import BUFFER as ROTARY_BUFFER
from rankdown.export.manifest import FactorNodes
from rankdown.export.onnx_fused_inputs import fused_members
from rankdown.factor_record import FACTORED_TABLE, HEAD, FactorRecord

# The factor pair's child names are part of the checkpoint format (see rankdown.factor);
# the exported graphs keep them in node scopes and parameter names.
FACTOR_CHILDREN = ("down", "up")
_ONNX_MATMULS = {"MatMul", "MatMulInteger", "Gemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits"}


@dataclass(frozen=True)
class _Expected:
    shapes: dict[tuple[str, str], set[tuple[int, int]]]  # (module, child) -> acceptable weight shapes
    pairs: int
    groups: int

    @property
    def count(self) -> int:
        return len(self.shapes)


def _expected(record: FactorRecord) -> _Expected:
    shapes: dict[tuple[str, str], set[tuple[int, int]]] = {}
    groups = 0
    owners = {spec.shares_down_with for spec in record.modules.values() if spec.shares_down_with}
    for name, spec in record.modules.items():
        if spec.shares_down_with is None:
            # A group's down is stored once, on its owner, and must run once per token.
            shapes[(name, "down")] = {(spec.in_features, spec.rank), (spec.rank, spec.in_features)}
        shapes[(name, "up")] = {(spec.rank, spec.out_features), (spec.out_features, spec.rank)}
        groups += name in owners
    return _Expected(shapes, len(record.modules), groups)


def _tally(record: FactorRecord, weights: list[tuple[str | None, str | None, tuple[int, ...]]], where: str) -> FactorNodes:
    """``weights``: one (module, child, weight shape) per weight-carrying matmul node; module is
    None for a node outside any recorded module, child None for a node directly in one."""
    expected = _expected(record)
    seen: dict[tuple[str, str], int] = {}
    dense = 0
    for module, child, shape in weights:
        if module is None:
            dense += 1
            continue
        if child is None:
            spec = record.modules[module]
            raise RankdownError(f"{where}: factor pair {module} was folded into one dense "
                                f"{spec.out_features}x{spec.in_features} matmul")
        key = (module, child)
        if key not in expected.shapes:
            raise RankdownError(f"{where}: {module}.{child} runs as a matmul of its own, but it shares "
                                f"the down factor of {record.modules[module].shares_down_with}; it must reuse it")
        if tuple(shape[-2:]) not in expected.shapes[key]:
            raise RankdownError(f"{where}: {module}.{child} has weight shape {tuple(shape)}, "
                                f"expected one of {sorted(expected.shapes[key])}")
        seen[key] = seen.get(key, 0) + 1
    repeated = sorted(k for k, n in seen.items() if n > 1)
    if repeated:
        module, child = repeated[0]
        raise RankdownError(f"{where}: {module}.{child} appears {seen[repeated[0]]} times; each factor runs once")
    missing = sorted(set(expected.shapes) - set(seen))
    if missing:
        module, child = missing[0]
        raise RankdownError(f"{where}: no matmul carries {module}.{child} ({len(missing)} factor node(s) missing)")
    return FactorNodes(pairs=expected.pairs, shared_groups=expected.groups, expected=expected.count,
                       found=sum(seen.values()), dense_linears=dense)


def _locate(record: FactorRecord, dotted: str) -> tuple[str | None, str | None]:
    """(module, child) for a scope or parameter path such as ``model.layers.0.mlp.up_proj.down``,
    tolerating prefixes an exporter adds (``model.`` wrappers, leading ``/``)."""
    parts = dotted.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in record.modules:
            return candidate, None
        head, _, child = candidate.rpartition(".")
        if child in FACTOR_CHILDREN and head in record.modules:
            return head, child
    return None, None


# onnxruntime-genai's model builder names a layer's attention ``attn`` where transformers says ``self_attn``.
_BUILDER_SCOPES = (("/attn/", "/self_attn/"),)


def onnx_node_scope(node_name: str) -> str:
    """A graph node's scope as a dotted module path, the builder's names translated:
    ``/model/layers.0/attn/o_proj/MatMul`` -> ``model.layers.0.self_attn.o_proj``,
    ``/model.layers.0.self_attn.q_proj/down/MatMul`` -> ``model.layers.0.self_attn.q_proj.down``."""
    for builder, transformers in _BUILDER_SCOPES:
        node_name = node_name.replace(builder, transformers)
    return ".".join(node_name.strip("/").split("/")[:-1])


def count_onnx(record: FactorRecord, model_path: Path) -> FactorNodes:
    """Nodes of an optimum/torch.onnx export (scopes such as ``/model/layers.0/self_attn/q_proj/down/MatMul``)
    or of the model builder's fused graph (a factor ``/model.layers.0.self_attn.q_proj/down/MatMul``,
    export/onnx_builder.py; a dense linear ``/model/layers.0/attn/o_proj/MatMul``)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    weights: list[tuple[str | None, str | None, tuple[int, ...]]] = []
    for node in model.graph.node:
        if node.op_type not in _ONNX_MATMULS:
            continue
        weight = next((shapes[i] for i in node.input[1:2] if i in shapes), None)
        if node.op_type == "MatMulNBits" and weight is not None:
            # The weight is packed (N, blocks, bytes per block); the node's K and N are the matrix's shape.
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            members = fused_members(node)
            if members is not None:  # rows of several linears reading one input: each counts as itself
                weights += [(*_locate(record, onnx_node_scope(name)), (int(attributes["K"]), rows))
                            for name, rows in members]
                continue
            weight = (int(attributes["K"]), int(attributes["N"]))
        if weight is None or len(weight) < 2:
            continue  # activation x activation (attention scores), not a layer
        weights.append((*_locate(record, onnx_node_scope(node.name)), weight))
    return _tally(record, weights, f"{model_path}")


def _weight_input(linear):
    """An ``aten.linear`` node's weight input: a quantized weight through its dequantize op, to the
    parameter it unpacks."""
    weight = linear.args[1]
    while weight.op == "call_function" and weight.args:
        weight = weight.args[0]
    return weight


def linear_weight_path(linear, params: dict[str, str]) -> str:
    """The dotted module path of an ``aten.linear`` node's weight; ``params``: the program's
    inputs_to_parameters."""
    weight = _weight_input(linear)
    fqn = params.get(weight.name, weight.name)
    return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn


def fused_group(dotted: str, fused: dict[str, list[tuple[str, bool, int]]]) -> list[tuple[str, bool, int]] | None:
    """The members of the fused linear at ``dotted`` (a path that may carry a wrapper's prefix)."""
    for path, members in fused.items():
        if dotted == path or dotted.endswith(f".{path}"):
            return members
    return None


def count_exported_program(record: FactorRecord, program, where: str,
                           fused: dict[str, list[tuple[str, bool, int]]] | None = None) -> FactorNodes:
    """``aten.linear`` nodes of a torch.export program, matched to parameters by name (a quantized
    weight through its dequantize op, to the parameter it unpacks). ``fused``: linears that stack
    several first stages (export/et_fused_inputs.py ``fused_members``); each member's rows count
    as its ``down`` (a factor pair) or as a dense linear."""
    import torch

    params = dict(program.graph_signature.inputs_to_parameters)
    buffers = dict(program.graph_signature.inputs_to_buffers)
    weights: list[tuple[str | None, str | None, tuple[int, ...]]] = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        dotted = linear_weight_path(node, params)
        weight = _weight_input(node)
        if buffers.get(weight.name, "").endswith((f".{ROTARY_BUFFER}", f".{MEAN_BUFFER}")):
            continue  # the rotary's permutation or a norm's mean (export/et_rotary.py, et_norms.py), not a layer
        members = fused_group(dotted, fused or {})
        if members is not None:
            columns = tuple(weight.meta["val"].shape)[-1]
            weights += [(*_locate(record, f"{name}.down"), (rows, columns)) if is_down else (None, None, (rows, columns))
                        for name, is_down, rows in members]
            continue
        if dotted.endswith(FACTORED_TABLE):
            # A factored tied table is one Parameter, named for the lookup that registered it first:
            # the linear that reads it is the head's ``up``.
            dotted = f"{HEAD}.up"
        shape = tuple(weight.meta["val"].shape)
        weights.append((*_locate(record, dotted), shape))
    return _tally(record, weights, where)
