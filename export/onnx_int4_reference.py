"""PyTorch with the weights an ONNX int4 graph holds: the reference its export self-check and
`validate` hold onnxruntime to, so a lowering bug is told apart from what 4 bits cost.

ExecuTorch's int4 is quantized in PyTorch before it is lowered, so that PyTorch model exists
(export/et_int4.py). ONNX's is quantized on the exported graph by onnxruntime's own
``MatMulNBitsQuantizer`` (export/onnx_int4.py), and no PyTorch module does MatMulNBits' arithmetic.
So the reference is read back from the graph: every ``MatMulNBits`` node's codes, scales and zero
points, dequantized as the operator defines it (``(code - zero_point) * scale`` per block of K, codes
packed low-first, zero point 2^(bits-1) when absent), and laid over the loaded model's linears by
``torch.func.functional_call`` (the model's own parameters are not touched). A tied head overrides
the embedding too where the graph's ``GatherBlockQuantized`` reads the head's blocks; where the graph
keeps its own 4-bit lookup table (optimum's graph), lookup and head each get their own.

Names: the fused graph (the model builder's) calls a factor ``/<module>/<down|up>/MatMul``, a dense
linear ``/model/layers.N/attn/<proj>/MatMul`` (``attn`` for ``self_attn``), Q/K/V packed into
``qkv_proj`` (split back by rows), the head ``/lm_head/MatMul``; optimum's graph uses the module path
as its scope. A ``MatMulNBits`` that maps to no linear of the model fails the reference: a check
that silently kept a float weight would pass a broken export.

Activations: a node at accuracy level 4 (MLAS's CompInt8 kernels) rounds its input to int8 per
block of its K at run time, one symmetric scale per block (max |a| / 127, codes a * (127 / max |a|)
rounded half to even, MLAS's ``QuantizeARow_CompInt8``); the reference rounds each such linear's
input the same way (a forward pre-hook while it runs), so what is left between it and onnxruntime
is the kernels' summation order and the attention kernel (``ParityThresholds.lowering``). Where the
CPU has no CompInt8 kernel, onnxruntime runs such a node on the float input instead; whether it
rounds is asked of the onnxruntime that runs the graph (``RoundingProbe``: this machine's once a
process, or the device's when `validate` runs on one), not assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from rankdown.errors import RankdownError
from rankdown.export.factor_nodes import onnx_node_scope
from rankdown.export.onnx_fused_inputs import fused_members

_QKV = ("q_proj", "k_proj", "v_proj")
INT8_INPUTS = 4  # MatMulNBits' accuracy level that rounds its input to int8 per block
# Dequantized weights kept for the whole check below this, made per call above it (int4_reference):
# SmolLM2-135M's dense ones are about 0.5 GB and stay kept, a 1B model's would be a second 5 GB copy.
KEEP_DEQUANTIZED_BYTES = 1 << 30


@dataclass(frozen=True)
class BlockWeight:
    """One ``MatMulNBits`` weight as stored: codes ``(N, k_blocks, blob)``, scales ``(N, k_blocks)``,
    zero points packed ``(N, ceil(k_blocks * bits / 8))`` or None."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int
    n: int
    accuracy_level: int = 0  # 4: the input is rounded to int8 per block at run time

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    def take(self, rows) -> BlockWeight:
        """These rows (a slice or an index array) alone, still packed."""
        codes = self.codes[rows]
        return BlockWeight(codes=codes, scales=self.scales.reshape(self.n, -1)[rows],
                           zero_points=None if self.zero_points is None else self.zero_points.reshape(self.n, -1)[rows],
                           bits=self.bits, block_size=self.block_size, k=self.k, n=codes.shape[0],
                           accuracy_level=self.accuracy_level)

    def dequantize(self) -> np.ndarray:
        """The float weight, ``(N, K)`` (a linear's ``out x in``)."""
        return self.dequantized().numpy()

    def dequantized(self):
        """``dequantize`` as a torch tensor: the same float32 arithmetic, on all threads (the int4
        reference dequantizes per call for a large model: SmolLM2's 8-bit head takes 18 ms here
        against 290 in numpy)."""
        import torch

        per_byte = 8 // self.bits
        mask = (1 << self.bits) - 1
        shifts = torch.arange(per_byte, dtype=torch.uint8) * self.bits
        codes = (torch.tensor(self.codes)[..., None] >> shifts) & mask  # low bits first
        blocks = self.codes.shape[1]
        weight = codes.reshape(self.n, blocks, self.block_size).to(torch.float32)
        del codes
        if self.zero_points is None:
            zeros = torch.full((self.n, blocks), float(1 << (self.bits - 1)), dtype=torch.float32)
        else:
            packed = torch.tensor(self.zero_points.reshape(self.n, -1))
            zeros = ((packed[..., None] >> shifts) & mask).reshape(self.n, -1)[:, :blocks].to(torch.float32)
        scales = torch.from_numpy(self.scales.reshape(self.n, blocks).astype(np.float32))
        # in place: one float buffer the size of the weight, as a per-call reference needs
        weight.sub_(zeros[..., None]).mul_(scales[..., None])
        return weight.reshape(self.n, blocks * self.block_size)[:, : self.k].contiguous()


@dataclass(frozen=True)
class LookupTable:
    """A ``GatherBlockQuantized`` table of its own (an untied embedding): codes ``(rows, columns)``
    as onnx reads a 4-bit tensor (one code per element), scales and zero points per block of a row."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int
    default_zero_point: float  # the operator's, by the codes' type: 8 for uint4, 128 for uint8, 0 signed

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def take(self, rows) -> LookupTable:
        """These rows (a slice or an index array) alone, still packed."""
        return LookupTable(codes=self.codes[rows], scales=self.scales[rows],
                           zero_points=None if self.zero_points is None else self.zero_points[rows],
                           block_size=self.block_size, default_zero_point=self.default_zero_point)

    def dequantize(self) -> np.ndarray:
        return self.dequantized().numpy()

    def dequantized(self):
        """``dequantize`` as a torch tensor (see ``BlockWeight.dequantized``)."""
        import torch

        rows, columns = self.codes.shape
        # through numpy: onnx reads 4-bit codes as ml_dtypes' int4 / uint4, which torch does not take
        codes = torch.from_numpy(self.codes.astype(np.float32)).reshape(rows, -1, self.block_size)
        zeros = torch.full(self.scales.shape, self.default_zero_point, dtype=torch.float32) \
            if self.zero_points is None else torch.from_numpy(self.zero_points.astype(np.float32))
        codes.sub_(zeros[..., None]).mul_(torch.from_numpy(self.scales.astype(np.float32))[..., None])
        return codes.reshape(rows, columns).contiguous()


def _cast_constant(init, node):
    """The initializer that a Cast node computes from the constant ``init``."""
    import onnx
    from onnx import numpy_helper

    to = next(a.i for a in node.attribute if a.name == "to")
    values = numpy_helper.to_array(init).astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    return numpy_helper.from_array(values, node.output[0])


def graph_weights(model_path: Path, graph=None) -> dict[str, BlockWeight | LookupTable]:
    """Every ``MatMulNBits`` node's weight (a fused node's, one per member, by the member's name),
    and every ``GatherBlockQuantized`` table that is not one of those (a tied lookup reads the
    head's blocks), by node name. ``graph``: the graph at ``model_path`` already loaded with its data."""
    import onnx
    from onnx import TensorProto, numpy_helper

    graph = onnx.load(str(model_path)).graph if graph is None else graph
    initializers = {init.name: init for init in graph.initializer}
    # fp16 scales behind a Cast (onnx_int4._half_scales) read as the Cast's output: fp32 values
    initializers |= {node.output[0]: _cast_constant(initializers[node.input[0]], node)
                     for node in graph.node if node.op_type == "Cast" and node.input[0] in initializers}
    matmul_weights = {node.input[1] for node in graph.node if node.op_type == "MatMulNBits"}
    weights: dict[str, BlockWeight | LookupTable] = {}
    for node in graph.node:
        if node.op_type == "GatherBlockQuantized" and node.input[0] in initializers \
                and node.input[0] not in matmul_weights:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attributes.get("gather_axis", 0) != 0 or attributes.get("quantize_axis", 1) != 1:
                raise RankdownError(f"{model_path}: GatherBlockQuantized node {node.name} has a layout "
                                    f"other than rows gathered, blocks along a row")
            table = initializers[node.input[0]]
            zero_points = node.input[3] if len(node.input) > 3 and node.input[3] else None
            default_zero = {TensorProto.UINT4: 8.0, TensorProto.UINT8: 128.0}.get(table.data_type, 0.0)
            weights[node.name] = LookupTable(
                codes=numpy_helper.to_array(table), scales=numpy_helper.to_array(initializers[node.input[2]]),
                zero_points=None if zero_points is None else numpy_helper.to_array(initializers[zero_points]),
                block_size=int(attributes.get("block_size", 128)), default_zero_point=default_zero)
            continue
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * 4

        def constant(name: str) -> np.ndarray | None:
            return numpy_helper.to_array(initializers[name]) if name in initializers else None

        codes, scales = constant(inputs[1]), constant(inputs[2])
        if codes is None or scales is None:
            raise RankdownError(f"{model_path}: MatMulNBits node {node.name} has a weight that is not a constant")
        zero_points, n = constant(inputs[3]), int(attributes["N"])
        members = fused_members(node) or [(node.name, n)]
        if sum(rows for _, rows in members) != n:
            raise RankdownError(f"{model_path}: MatMulNBits node {node.name} has {n} rows, its members "
                                f"{sum(rows for _, rows in members)}")
        whole = BlockWeight(codes=codes, scales=scales.reshape(n, -1), zero_points=zero_points,
                            bits=int(attributes.get("bits", 4)), block_size=int(attributes["block_size"]),
                            k=int(attributes["K"]), n=n, accuracy_level=int(attributes.get("accuracy_level", 0)))
        start = 0
        for name, rows in members:  # a fused node's members are its rows, in order (export/onnx_fused_inputs.py)
            weights[name] = whole.take(slice(start, start + rows)) if len(members) > 1 else whole
            start += rows
    return weights


def lookup_reads_a_matmul_weight(graph) -> bool:
    """Whether a ``GatherBlockQuantized`` lookup reads a ``MatMulNBits`` node's weight (directly or
    through a Reshape / Transpose): the fused graph's tied table, stored once as the head's blocks."""
    weights = {node.input[1] for node in graph.node if node.op_type == "MatMulNBits"}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "GatherBlockQuantized":
            continue
        source = node.input[0]
        while source in producers and producers[source].op_type in ("Reshape", "Transpose"):
            source = producers[source].input[0]
        if source in weights:
            return True
    return False


def _module_path(node_name: str, names: set[str]) -> str | None:
    """The linear a node belongs to: its scope as export/factor_nodes.py reads it, with as many
    leading parts dropped as it takes to name a module of the model."""
    parts = onnx_node_scope(node_name).split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in names:
            return candidate
    return None


def node_linears(node_name: str, rows: int, model, names: set[str]) -> list[tuple[str, int, int]] | None:
    """The linears a quantized node (or a stacked node's member) named ``node_name`` holds, as
    ``[(module path, first row, rows)]``: itself, or the fused graph's packed ``qkv_proj`` split into
    q, k and v by their widths; None when the name matches no linear of ``model``. Raises when a
    packed node's ``rows`` are not q/k/v's."""
    path = _module_path(node_name, names)
    if path is not None:
        return [(path, 0, rows)]
    packed = _module_path(node_name.replace("qkv_proj", "q_proj"), names) if "qkv_proj" in node_name else None
    if packed is None:
        return None
    base, spans, start = packed.rpartition(".")[0], [], 0
    for proj in _QKV:
        width = model.get_submodule(f"{base}.{proj}").out_features
        spans.append((f"{base}.{proj}", start, width))
        start += width
    if start != rows:
        raise RankdownError(f"packed {node_name} has {rows} rows, q/k/v {start}")
    return spans


def weight_overrides(model, model_path: Path) -> dict[str, Any]:
    """``{parameter name: dequantized weight tensor}`` for every linear (and lookup table) the graph
    holds in 4 or 8 bits; names tied to one stored weight get one tensor."""
    return _dequantized(_graph_numerics(model, model_path)[0])


def _dequantized(sources: dict[str, BlockWeight | LookupTable]) -> dict[str, Any]:
    tensors: dict[int, Any] = {}  # by source: names tied to one stored weight share one tensor
    for source in sources.values():
        if id(source) not in tensors:
            tensors[id(source)] = source.dequantized()
    return {name: tensors[id(source)] for name, source in sources.items()}


def _graph_numerics(model, model_path: Path, rounds: Rounds | None = None
                    ) -> tuple[dict[str, BlockWeight | LookupTable], dict[str, int]]:
    """``{parameter name: its weight as the graph stores it}`` (still packed), and ``{linear's module
    path: block}`` for the linears whose input the graph rounds to int8 per block of that many
    (accuracy level 4). ``rounds``: whether the runtime that runs the graph rounds a kind of node's
    input (default: this machine's onnxruntime, asked)."""
    import onnx
    from torch import nn

    rounds = rounds or onnxruntime_rounds_int8_inputs

    graph = onnx.load(str(model_path)).graph
    linears = {name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Embedding))}
    overrides: dict[str, BlockWeight | LookupTable] = {}
    int8_inputs: dict[str, int] = {}
    for node, weight in graph_weights(model_path, graph).items():
        rounds_input = (isinstance(weight, BlockWeight) and weight.accuracy_level == INT8_INPUTS
                        and rounds(weight.bits, weight.block_size, weight.zero_points is not None))
        spans = node_linears(node, weight.shape[0], model, linears)
        if spans is None:
            raise RankdownError(f"{model_path}: MatMulNBits node {node} matches no linear of the model "
                                f"(is the model the checkpoint this graph was exported from?)")
        for path, start, rows in spans:
            if f"{path}.weight" in overrides:
                raise RankdownError(f"{model_path}: two quantized nodes map to {path} (one is {node})")
            overrides[f"{path}.weight"] = weight if len(spans) == 1 else weight.take(slice(start, start + rows))
            if rounds_input:
                int8_inputs[path] = weight.block_size
    # A tied table the graph stores once (the fused graph's lookup reads the head's blocks) is the
    # lookup's too; one it stores twice (optimum's graph: an 8-bit head copy, a 4-bit lookup) keeps
    # both, and a lookup the graph keeps in fp32 keeps the model's own table.
    if lookup_reads_a_matmul_weight(graph):
        tied: dict[int, list[str]] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            tied.setdefault(id(parameter), []).append(name)
        for names in tied.values():
            given = [overrides[n] for n in names if n in overrides]
            for name in names:
                if given and name not in overrides:
                    overrides[name] = given[0]
    for name, source in overrides.items():
        expected = model.get_parameter(name).shape
        if tuple(source.shape) != tuple(expected):
            raise RankdownError(f"{model_path}: the 4-bit weight for {name} is {tuple(source.shape)}, "
                                f"the model's {tuple(expected)}")
    return overrides, int8_inputs


# Whether a runtime rounds the input of a MatMulNBits of a kind (bits, block, zero points) to int8.
Rounds = Callable[[int, int, bool], bool]


@dataclass(frozen=True)
class RoundingProbe:
    """One small ``MatMulNBits`` of a kind at accuracy level 4 (``model``, serialized), an input
    ``x`` with an outlier per block, and their exact product. Rounding to int8 moves the output by
    about 1e-2 of its size (the outlier makes the steps coarse for the rest); float summation order
    by about 1e-7. Built here (it needs onnx); run wherever the graph will run, numpy and
    onnxruntime only (the validate harness's device half runs it on a remote device)."""

    kind: tuple[int, int, bool]  # bits, block, zero points
    model: bytes
    x: np.ndarray  # (1, K) float32
    exact: np.ndarray  # (1, N) float64

    def rounds(self, got: np.ndarray) -> bool:
        """Whether the runtime's output ``got`` says it rounded the input."""
        return bool(np.abs(got - self.exact).max() > 1e-3 * np.abs(self.exact).max())


def rounding_probe(bits: int = 4, block_size: int = 32, zero_points: bool = False) -> RoundingProbe:
    from onnx import TensorProto, helper, numpy_helper

    k, n, blocks = 2 * block_size, 8, 2
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n, blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.full(n * blocks, 0.01, np.float32)
    # zero points at the middle code, packed as the operator reads them (two per byte at 4 bits)
    packed = np.full((n, 1 if bits == 4 else blocks), 0x88 if bits == 4 else 0x80, np.uint8) if zero_points else None
    inputs = ["x", "w", "s"] + (["z"] if zero_points else [])
    initializers = [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scales, "s")]
    initializers += [numpy_helper.from_array(packed, "z")] if packed is not None else []
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block_size, accuracy_level=INT8_INPUTS)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializers)
    # an IR version every supported onnxruntime reads, whatever the installed onnx writes by default
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((1, k)).astype(np.float32)
    x[0, 3] = 200.0
    x[0, 3 + block_size] = 200.0
    weight = BlockWeight(codes, scales.reshape(n, blocks), packed, bits, block_size, k, n, INT8_INPUTS).dequantize()
    return RoundingProbe((bits, block_size, zero_points), model.SerializeToString(), x,
                         x.astype(np.float64) @ weight.T.astype(np.float64))


@cache
def onnxruntime_rounds_int8_inputs(bits: int = 4, block_size: int = 32, zero_points: bool = False) -> bool:
    """Whether this machine's onnxruntime rounds the input of a ``MatMulNBits`` of these ``bits``,
    block and zero points to int8 at accuracy level 4 (MLAS has CompInt8 kernels for AVX2, AVX512
    and Arm's dot-product extension, chosen per bit width and block; elsewhere it falls back to float
    inputs). A fact of the machine and the installed onnxruntime, so each kind is asked once a process."""
    import onnxruntime as ort

    probe = rounding_probe(bits, block_size, zero_points)
    session = ort.InferenceSession(probe.model, providers=["CPUExecutionProvider"])
    return probe.rounds(session.run(None, {"x": probe.x})[0])


def int8_input_kinds(model_path: Path) -> set[tuple[int, int, bool]]:
    """The kinds (bits, block, zero points) of the graph's ``MatMulNBits`` nodes at accuracy level 4,
    read from the nodes alone: what a runtime is asked before the reference is built."""
    import onnx

    kinds = set()
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("accuracy_level", 0) == INT8_INPUTS:
            kinds.add((int(attributes.get("bits", 4)), int(attributes["block_size"]),
                       len(node.input) > 3 and bool(node.input[3])))
    return kinds


def int8_blocks(x, block: int):
    """``x`` as MLAS's CompInt8 kernels read it: int8 per block of ``block`` along the last axis (the
    last block zero-padded), one symmetric scale max |x| / 127 each, codes x * (127 / max |x|) rounded
    half to even (``torch.round``), and back to float."""
    import torch
    import torch.nn.functional as F

    width = x.shape[-1]
    grouped = F.pad(x, (0, -width % block)).reshape(*x.shape[:-1], -1, block)
    peak = grouped.abs().amax(-1, keepdim=True)
    inverse = torch.where(peak > 0, 127.0 / peak, torch.zeros_like(peak))
    codes = torch.round(grouped * inverse)
    return (codes * (peak / 127.0)).reshape(*x.shape[:-1], -1)[..., :width]


def int4_reference(model, model_path: Path, keep_bytes: int = KEEP_DEQUANTIZED_BYTES, rounds: Rounds | None = None):
    """``model`` as the ONNX int4 graph at ``model_path`` computes it (its weights dequantized), for
    ``torch_greedy``; ``model`` itself is left as it is.

    The dequantized weights are a second float copy of the model's linears. Up to ``keep_bytes`` of
    them are made once and kept; past that (a model of a few hundred million parameters and up) each
    linear's weight is dequantized from the packed codes when the linear runs and dropped after, a
    lookup's only for the rows it reads, so the reference costs one weight's float buffer (plus its
    packed codes) at a time and a dequantization per call instead of a second model.

    ``rounds``: whether the runtime that will run the graph rounds a kind of node's input to int8
    (default: this machine's onnxruntime; `validate` on a device asks the device's)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    sources, int8_inputs = _graph_numerics(model, model_path, rounds)
    unique = {id(source): source for source in sources.values()}.values()
    dequantized_bytes = sum(4 * source.shape[0] * source.shape[1] for source in unique)
    kept = dequantized_bytes <= keep_bytes
    overrides = _dequantized(sources) if kept else {}

    def rounding(block: int):
        return lambda module, inputs: (int8_blocks(inputs[0], block), *inputs[1:])

    def dequantizing(module: nn.Module, source: BlockWeight | LookupTable):
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise RankdownError(f"{model_path}: the lookup {type(module).__name__} renormalizes rows (max_norm), "
                                f"which the int4 reference does not reproduce")
        if isinstance(module, nn.Embedding):
            def lookup(ids):
                # inference: padding_idx only shapes gradients
                rows, where = np.unique(ids.numpy(), return_inverse=True)
                table = source.take(rows).dequantized()
                return F.embedding(torch.from_numpy(where.reshape(ids.shape)), table)
            return lookup
        if not isinstance(module, nn.Linear):
            raise RankdownError(f"{model_path}: a quantized weight maps to a {type(module).__name__}, not a linear")
        bias = module.bias
        return lambda x: F.linear(x, source.dequantized(), bias)

    class WithGraphWeights(nn.Module):
        note: str | None  # for the progress line of a slower check: why it dequantizes per call
        rounded_inputs: int  # linears whose input it rounds to int8, as the runtime does

        def __init__(self, note: str | None):
            super().__init__()
            self.inner = model
            self.note = note
            self.rounded_inputs = len(int8_inputs)

        def forward(self, *args, **kwargs):
            # The hooks and forwards set here live only as long as this call: ``model`` itself is left as it is.
            hooks = [model.get_submodule(path).register_forward_pre_hook(rounding(block))
                     for path, block in int8_inputs.items()]
            patched: list[tuple[nn.Module, Any]] = []  # each module and the instance forward it had, if any
            try:
                if kept:
                    # Ties are resolved in ``overrides`` already, where the graph may hold two versions of one table.
                    return torch.func.functional_call(self.inner, overrides, args, kwargs, tie_weights=False)
                for name, source in sources.items():
                    module = model.get_submodule(name.rpartition(".")[0])
                    if any(module is done for done, _ in patched):
                        continue  # a module reached by two names (a tied parameter) is given its weight once
                    patched.append((module, vars(module).get("forward")))
                    module.forward = dequantizing(module, source)  # an instance attribute: the class's is untouched
                return self.inner(*args, **kwargs)
            finally:
                for hook in hooks:
                    hook.remove()
                for module, before in patched:
                    if before is None:
                        del module.forward
                    else:
                        module.forward = before

    note = None if kept else (f"weights dequantized per call ({dequantized_bytes / 2**30:.1f} GiB kept would be "
                              f"a second copy of the model's linears)")
    return WithGraphWeights(note).eval()
