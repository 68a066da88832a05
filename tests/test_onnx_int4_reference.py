"""ONNX int4's PyTorch reference: the weights read back from the graph are the ones onnxruntime
multiplies by (checked against onnxruntime itself, one node at a time). The export's self-check
against them, and its refusals, are in test_int4_shipped.py, on the shipped model's int4 bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rankdown.export.onnx_int4_reference import graph_weights, int8_blocks, onnxruntime_rounds_int8_inputs


def _one_node_graph(op: str, weight: np.ndarray, tmp_path, **quantizer):
    """A graph of one MatMul (x @ weight) or Gather (weight[ids]), quantized by onnxruntime's
    MatMulNBitsQuantizer with ``quantizer``'s options; its path."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/layer/proj/MatMul")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", weight.shape[0]])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", weight.shape[1]])
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




@pytest.mark.parametrize("block", [32, 64])
def test_the_reference_rounds_the_input_as_accuracy_level_4_does(tmp_path, block):
    """MLAS's CompInt8 kernels read the input as int8 per block of K: the reference's rounding
    (int8_blocks) gives onnxruntime's node output to float precision, at one token (its M=1 kernel)
    and at several, where the fp32 input is far off (an outlier channel makes the blocks coarse)."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(2)
    weight = rng.standard_normal((160, 48)).astype(np.float32)  # K = 160: a partial last block of 64
    path = _one_node_graph("MatMul", weight, tmp_path, bits=4, block_size=block, is_symmetric=False,
                           accuracy_level=4)
    [read] = graph_weights(path).values()
    assert read.accuracy_level == 4
    dequantized = read.dequantize()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, 160)).astype(np.float32)
    x[:, 7] *= 60.0
    rounds = onnxruntime_rounds_int8_inputs()
    for rows in (1, 5):
        got = session.run(None, {"x": x[:rows]})[0]
        rounded = int8_blocks(torch.from_numpy(x[:rows]), block).numpy() @ dequantized.T
        float_input = x[:rows] @ dequantized.T
        runs, other = (rounded, float_input) if rounds else (float_input, rounded)
        np.testing.assert_allclose(got, runs, rtol=1e-5, atol=2e-4)
        assert np.abs(got - other).max() > 50 * np.abs(got - runs).max()


def _cpu_has_int8_dot() -> bool | None:
    """Whether MLAS has CompInt8 kernels for this CPU (AVX2 on x86-64, the dot-product extension on
    arm64), from /proc/cpuinfo; None where this test cannot tell."""
    import platform

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "avx2" in flags
    if machine in ("aarch64", "arm64"):
        return "asimddp" in flags
    return None


def test_the_rounding_probe_answers_as_the_cpu_has_int8_kernels():
    expected = _cpu_has_int8_dot()
    if expected is None:
        pytest.skip("no /proc/cpuinfo on x86-64 or arm64 to say which kernels MLAS has")
    # each kind the export writes: 4-bit decoder weights in blocks of 16-256, the 8-bit head in 32s
    for bits, block, zero_points in ((4, 32, False), (4, 128, True), (4, 256, False), (8, 32, False), (8, 32, True)):
        assert onnxruntime_rounds_int8_inputs(bits, block, zero_points) is expected, (bits, block, zero_points)


def test_the_reference_keeps_float_inputs_where_onnxruntime_does(tmp_path, monkeypatch):
    """On a CPU without CompInt8 kernels (the probe says so), an accuracy-level-4 node's input is not
    rounded by the reference either."""
    from torch import nn

    import rankdown.export.onnx_int4_reference as reference

    weight = np.random.default_rng(4).standard_normal((96, 64)).astype(np.float32)
    path = _one_node_graph("MatMul", weight, tmp_path, bits=4, block_size=32, is_symmetric=False, accuracy_level=4)
    model = nn.Module()
    model.layer = nn.Module()
    model.layer.proj = nn.Linear(96, 64, bias=False)  # /layer/proj/MatMul's module
    answers = {}
    for rounds in (True, False):
        monkeypatch.setattr(reference, "onnxruntime_rounds_int8_inputs", lambda *_, rounds=rounds: rounds)
        overrides, answers[rounds] = reference._graph_numerics(model, path)
        assert set(overrides) == {"layer.proj.weight"}
    assert answers == {True: {"layer.proj": 32}, False: {}}


# (per channel: 96 in one block of 128, 200 in one of 256, 576 in five of 128, each last block padded)
@pytest.mark.parametrize("group,k,accuracy_level,block", [(0, 96, 0, 128), (32, 96, 0, 32), (0, 200, 4, 256),
                                                          (0, 576, 4, 128), (32, 200, 4, 32)])
def test_healed_numerics_are_stored_to_the_bit_and_run_as_read_back(tmp_path, group, k, accuracy_level, block):
    """export/onnx_int4.py's healed path: the MatMulNBits read back is fake_int4 of the float weight
    in the export's rounding (per channel: float32 scales repeated over ``channel_block``'s blocks,
    the last zero-padded where the block does not divide K; groups of 32: bf16 scales), without zero
    points, and onnxruntime multiplies by exactly that (at accuracy level 4, of its int8-rounded input)."""
    import onnxruntime as ort
    import torch

    from rankdown.compress.fake_quant import fake_int4
    from rankdown.export.onnx_int4 import _healed_matmul_nbits, channel_block
    from rankdown.int4_numerics import int4_rounding

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((k, 40)).astype(np.float32)  # (K, N)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/layer/proj/MatMul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", 40])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    blocks = _healed_matmul_nbits(model.graph, [model.graph.node[0]], group, accuracy_level=accuracy_level, block_cost=32)
    assert block == (channel_block(k, 32) if group == 0 else int4_rounding(k, group)[0])
    assert blocks == {"/layer/proj/MatMul": block} and [i.name for i in model.graph.initializer] == ["w_Q4", "w_scales"]
    path = tmp_path / "healed.onnx"
    onnx.save(model, str(path))
    [read] = graph_weights(path).values()
    assert read.zero_points is None and read.accuracy_level == accuracy_level
    expected = fake_int4(torch.from_numpy(weight.T.copy()), *int4_rounding(k, group)).numpy()
    assert np.array_equal(read.dequantize(), expected)
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rounds = accuracy_level == 4 and onnxruntime_rounds_int8_inputs()
    read_input = int8_blocks(torch.from_numpy(x), block).numpy() if rounds else x
    np.testing.assert_allclose(got, read_input @ expected.T, rtol=1e-5, atol=2e-4)


def test_healed_numerics_store_a_weight_two_matmuls_share_once():
    """Two MatMuls reading one weight get one 4-bit weight and one scale tensor between them."""
    import onnxruntime as ort

    from rankdown.export.onnx_int4 import _healed_matmul_nbits

    weight = np.random.default_rng(4).standard_normal((64, 24)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], [y], name=f"/{y}/MatMul") for y in ("a", "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 24]) for y in ("a", "b")],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    _healed_matmul_nbits(model.graph, list(model.graph.node), 0, accuracy_level=0, block_cost=32)
    assert sorted(i.name for i in model.graph.initializer) == ["w_Q4", "w_scales"]
    assert [n.input[1:3] for n in model.graph.node] == [["w_Q4", "w_scales"]] * 2
    onnx.checker.check_model(model)
    x = np.ones((1, 64), np.float32)
    a, b = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(a, b) and np.abs(a - x @ weight).max() < 0.2 * np.abs(x @ weight).max()


def test_channel_block_trades_padding_for_fewer_blocks():
    """A per-channel row's block: exact where a large block divides K, else fewer blocks with the last
    padded (576: five of 128, not nine of 64), never a block that is mostly padding (32: 32)."""
    from rankdown.export.onnx_int4 import CHANNEL_BLOCKS, channel_block

    assert {k: channel_block(k, 32) for k in (32, 64, 96, 256, 576, 1536)} == {
        32: 32, 64: 64, 96: 128, 256: 256, 576: 128, 1536: 256}
    assert channel_block(576, 0) == 64 and channel_block(576, 10_000) == 256  # bytes only; blocks only
    assert all(channel_block(k) in CHANNEL_BLOCKS for k in range(16, 2048, 16))
