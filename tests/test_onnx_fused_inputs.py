"""export/onnx_fused_inputs.py on small graphs built here: stacked MatMulNBits nodes compute what
the separate ones did, biases included; a node whose weight another node reads is left alone."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rankdown.export.onnx_fused_inputs import fuse_shared_inputs, fused_members
from rankdown.export.onnx_int4 import _fold_biases


def _quantized_graph(widths: list[int], biased: list[bool], k: int = 96):
    """x (1, 3, k) -> one MatMul per width (a bias Add where asked) -> outputs y0, y1, ...; quantized
    to 4 bits in blocks of 32 with onnxruntime's own quantizer, biases folded. The model proto."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, (n, bias) in enumerate(zip(widths, biased, strict=True)):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        out = f"y{i}"
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}" if bias else out], name=f"/l{i}/MatMul"))
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out], name=f"/l{i}/Add"))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3, n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=False, accuracy_level=4,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    model = quantizer.model.model
    _fold_biases(model.graph)
    return model


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_stacked_nodes_with_and_without_biases_give_the_same_outputs():
    model = _quantized_graph([40, 24, 64], [True, False, True])
    x = np.random.default_rng(1).standard_normal((1, 3, 96)).astype(np.float32)
    before = _run(model, x)
    names = [n.name for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert fuse_shared_inputs(model.graph) == 2
    onnx.checker.check_model(model)
    fused = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 1 and fused_members(fused[0]) == [(name, n) for name, n in zip(names, [40, 24, 64], strict=True)]
    assert len(fused[0].input) == 6 and fused[0].input[5]  # the members' biases, zeros for the one without
    assert not any(n.op_type == "Add" for n in model.graph.node)
    after = _run(model, x)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_a_node_whose_weight_is_read_elsewhere_is_not_stacked():
    model = _quantized_graph([40, 24, 32], [False, False, False])
    graph = model.graph
    shared = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/l2/"))
    # another reader of that node's scales (as a tied lookup reads the head's blocks)
    graph.node.append(helper.make_node("Identity", [shared.input[2]], ["scales_copy"], name="/reader"))
    graph.output.append(helper.make_tensor_value_info("scales_copy", TensorProto.FLOAT, [32, 3]))
    assert fuse_shared_inputs(graph) == 1
    kept = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert [fused_members(n) is None for n in kept].count(True) == 1
    assert any(n.name == shared.name for n in kept)
    onnx.checker.check_model(model)


def test_nothing_to_stack_leaves_the_graph_as_it_was():
    model = _quantized_graph([40], [True])
    before = model.SerializeToString()
    assert fuse_shared_inputs(model.graph) == 0
    assert model.SerializeToString() == before
