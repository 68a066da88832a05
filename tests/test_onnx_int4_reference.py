"""ONNX int4's PyTorch reference: the weights read back from the graph are the ones onnxruntime
multiplies by (checked against onnxruntime itself, one node at a time), the export's self-check
holds the graph to them and can fail, and a node that maps to no linear is refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import quiet
from onnx import TensorProto, helper, numpy_helper

from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.onnx_int4_reference import graph_weights, weight_overrides
from rankdown.export.parity import GENERIC_TASKS
from rankdown.export.pipeline import export


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


def test_int4_export_is_held_to_its_read_back_weights(shipped_math_bundle, tmp_path):
    """The self-check holds the int4 graph to PyTorch with the graph's own weights first: much
    closer than to the float model, and recorded in the manifest. One bundle with both formats in
    int4: validate holds each runtime to its own quantized model (ONNX's read back from the graph,
    ExecuTorch's rebuilt from the source) in one run."""
    from rankdown.validate.config import ValidateConfig
    from rankdown.validate.harness import validate

    folder, _ = shipped_math_bundle
    manifest = export(folder, tmp_path / "b", ExportConfig(quantize="int4"), progress=quiet)
    entry = manifest.formats["onnx"]
    assert entry.lowering is not None and entry.lowering.passed and entry.parity.passed
    assert entry.lowering.max_abs_logit_diff < 0.5 * entry.parity.max_abs_logit_diff
    assert entry.lowering.top1_agreement > entry.parity.top1_agreement
    assert entry.lowering.p95_abs_logit_diff is not None
    assert entry.lowering.p95_abs_logit_diff <= 0.25 * entry.lowering.logit_scale  # the bound it was held to
    assert manifest.formats["executorch"].lowering is not None
    # the kernels are checked on the generic text, the float floor on the task the checkpoint was compressed for
    for entry in manifest.formats.values():
        assert entry.lowering is not None and entry.lowering.tasks == GENERIC_TASKS and entry.parity.tasks == ("math",)
    report = validate(tmp_path / "b", ValidateConfig(latency=None, max_examples=3, max_tokens=256), progress=quiet)
    assert set(report.runtimes) == {"onnxruntime", "executorch"}
    for name, result in report.runtimes.items():
        parity = result.parity
        assert parity.reference == "quantized" and parity.top1_agreement > parity.float_top1_agreement, name
        assert parity.float_prompt_tasks == ("math",), name
        assert not [f for f in result.failures if ".parity." in f], (name, result.failures)


def test_a_graph_that_departs_from_its_weights_fails_the_check(shipped_math_bundle, tmp_path, monkeypatch):
    """A graph whose function is not the model's with those weights (here the final norm's weight
    doubled after quantizing, which no read-back sees) is refused in one line, and no bundle is left."""
    from rankdown.export import onnx as onnx_format

    real = onnx_format.quantize_int4

    def skewed(src, dst, *args, **kwargs):
        summary = real(src, dst, *args, **kwargs)
        model = onnx.load(str(dst))
        norm = next(n for n in model.graph.node if n.op_type.endswith("SimplifiedLayerNormalization")
                    and "final_norm" in n.name)
        weight = norm.input[2] if norm.op_type.startswith("Skip") else norm.input[1]
        gamma = next(i for i in model.graph.initializer if i.name == weight)
        gamma.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(gamma), gamma.name))
        onnx.save(model, str(dst))
        return summary

    monkeypatch.setattr(onnx_format, "quantize_int4", skewed)
    folder, _ = shipped_math_bundle
    with pytest.raises(RankdownError, match="onnx export failed its parity self-check against PyTorch with its "
                                            "int4 weights: "):
        export(folder, tmp_path / "b", ExportConfig(formats="onnx", quantize="int4"), progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_node_that_maps_to_no_linear_is_refused(shipped_math_bundle, tmp_path):
    from rankdown.checkpoint import load_model, open_checkpoint

    folder, bundle = shipped_math_bundle
    export(folder, tmp_path / "b", ExportConfig(formats="onnx", quantize="int4"), progress=quiet)
    path = tmp_path / "b" / "onnx" / "model.onnx"
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "/up/" in n.name)
    node.name = "/model/layers.0/mystery/MatMul_Q4"
    onnx.save(model, str(path))
    with pytest.raises(RankdownError, match=r"model\.onnx: MatMulNBits node /model/layers.0/mystery/MatMul_Q4 "
                                            "matches no linear of the model"):
        weight_overrides(load_model(open_checkpoint(folder)), path)
