"""How fast onnxruntime's 4-bit ``MatMulNBits`` streams weights that do not fit in cache: a chain of
``--depth`` nodes (K x N, then N x K, ...) quantized by onnxruntime's own quantizer (blocks of 32,
asymmetric, accuracy level 4), one token through it, timed from Python.

    python -m bench.matmulnbits_stream [--depth 300] [--shape 576x576] [--threads 1,2] [--blocks 64,128,256]

Prints microseconds per node and the weight bytes per second (docs/measurements.md, run h: what bounds ONNX int4).
``--blocks``: instead, symmetric nodes written directly in each of those blocks, the last block
zero-padded where it does not divide K, as the healed export stores per-channel rows (docs/measurements.md,
"Blocks by speed, padded").
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time


def chain(k: int, n: int, depth: int):
    """The quantized chain as an onnx model."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(depth):
        rows, columns = (k, n) if i % 2 == 0 else (n, k)
        weights.append(numpy_helper.from_array((rng.standard_normal((rows, columns)) * 0.05).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=False, accuracy_level=4))
    quantizer.process()
    return quantizer.model.model


def padded_chain(k: int, n: int, depth: int, block: int):
    """The chain with every node a symmetric ``MatMulNBits`` in blocks of ``block`` (random codes,
    one scale per block, no zero points), the last block of a row zero-padded."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(depth):
        rows, columns = (k, n) if i % 2 == 0 else (n, k)
        count = -(-rows // block)
        weights.append(numpy_helper.from_array(rng.integers(0, 256, (columns, count, block // 2), dtype=np.uint8), f"w{i}"))
        weights.append(numpy_helper.from_array((rng.random(columns * count) * 0.01 + 1e-3).astype(np.float32), f"s{i}"))
        nodes.append(helper.make_node("MatMulNBits", [x, f"w{i}", f"s{i}"], [f"y{i}"], name=f"mm{i}", domain="com.microsoft",
                                      K=rows, N=columns, bits=4, block_size=block, accuracy_level=4))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=300)
    parser.add_argument("--shape", default="576x576", help="K x N of the first node")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--blocks", default="", help="comma-separated blocks: symmetric nodes written in each, padded")
    args = parser.parse_args()
    k, n = (int(v) for v in args.shape.lower().split("x"))

    blocks: list[int | None] = [int(b) for b in args.blocks.split(",") if b]
    for block in blocks or [None]:
        model = chain(k, n, args.depth) if block is None else padded_chain(k, n, args.depth, block)
        timed(model, f"{args.depth} nodes of {k}x{n}" + ("" if block is None else f", blocks of {block}"), k, args)


def timed(model, label: str, k: int, args) -> None:
    """Print the chain's time a node and weight bytes a second at each of ``args.threads``."""
    import numpy as np
    import onnxruntime as ort

    megabytes = sum(len(init.raw_data) for init in model.graph.initializer) / 1e6
    blob = model.SerializeToString()
    for threads in (int(t) for t in args.threads.split(",")):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        x = np.ones((1, 1, k), np.float32)
        output = session.get_outputs()[0].name
        for _ in range(50):
            session.run([output], {"x": x})
        seconds = []
        for _ in range(args.runs):
            start = time.perf_counter()
            session.run([output], {"x": x})
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        print(f"{label} ({megabytes:.1f} MB), {threads} thread(s): "
              f"{median / args.depth * 1e6:.1f} us a node, {megabytes / median / 1e3:.1f} GB/s")


if __name__ == "__main__":
    main()
