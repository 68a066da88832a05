"""ONNX int4's PyTorch reference: the weights read back from the graph are the ones onnxruntime
multiplies by (checked against onnxruntime itself, one node at a time). The export's self-check
against them, and its refusals, are in test_int4_shipped.py, on the shipped model's int4 bundle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rankdown.export.onnx_int4_reference import graph_weights


def _one_node_graph(op: str, weight: np.ndarray, tmp_path, **quantizer):
    """A graph of one MatMul (x @ weight) or Gather (weight[ids]), quantized by onnxruntime's
    MatMulNBitsQuantizer with ``quantizer``'s options; its path."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/layer/proj/MatMul")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, weight.shape[0]])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, weight.shape[1]])
    else:
        node = helper.make_node("Gather", ["w", "x"], ["y"], name="/model/embed/Gather", axis=0)
        x = helper.make_tensor_value_info("x", TensorProto.INT64, [5])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, weight.shape[1]])
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, op_types_to_quantize=(op,), **quantizer)
    quantizer.process()
    path = tmp_path / f"{op}.onnx"
    onnx.save(quantizer.model.model, str(path))
    return path


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False)])
def test_read_back_weight_is_what_onnxruntime_multiplies_by(tmp_path, bits, symmetric):
    """K = 70 leaves a partial last block; accuracy level 0 keeps the activations in fp32, so the
    only difference left is the order of the additions."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((70, 24)).astype(np.float32)  # (K, N), as a MatMul holds it
    path = _one_node_graph("MatMul", weight, tmp_path, bits=bits, block_size=32, is_symmetric=symmetric,
                           accuracy_level=0)
    [(name, read)] = graph_weights(path).items()
    assert name.startswith("/layer/proj/MatMul")
    dequantized = read.dequantize()
    assert dequantized.shape == (24, 70)
    assert 0 < np.abs(dequantized - weight.T).max() < 0.3 * np.abs(weight).max()  # quantized, not the float
    x = rng.standard_normal((3, 70)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ dequantized.T, rtol=1e-5, atol=1e-4)


def test_read_back_lookup_table_is_what_onnxruntime_gathers(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    table = rng.standard_normal((40, 64)).astype(np.float32)
    path = _one_node_graph("Gather", table, tmp_path, bits=4, block_size=32, is_symmetric=False,
                           quant_axes=(("Gather", 1),))
    [read] = graph_weights(path).values()
    ids = np.array([0, 7, 39, 7, 12], np.int64)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": ids})[0]
    np.testing.assert_allclose(got, read.dequantize()[ids], rtol=1e-6, atol=1e-6)
    assert np.abs(read.dequantize() - table).max() > 0  # 4-bit, not the float table


