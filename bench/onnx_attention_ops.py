"""onnxruntime's two CPU attention kernels with a KV cache, at SmolLM2's shapes, one decoded token:
the contrib ``GroupQueryAttention`` (rotary inside, the cache shared between past and present, as
the export and onnxruntime-genai's builder emit it) against ONNX's own ``Attention`` (opset 23)
after two ``RotaryEmbedding`` nodes, which takes the past and returns a present one position longer.

    python -m bench.onnx_attention_ops [--layers 30] [--position 96] [--threads 1,2] [--rounds 5]

Each graph holds ``--layers`` independent nodes (one per decoder layer); inputs are bound once
as OrtValues, so the time is the kernels' and the executor's, not numpy's copies. Prints the
median over rounds (run round-robin) in milliseconds a token and microseconds a layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

HEADS, KV_HEADS, HEAD_DIM, CACHE = 9, 3, 64, 256


def graphs(layers: int, position: int):
    """(name, model, feeds, shared) for each kernel: ``shared`` binds each present to its past."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rotary = [numpy_helper.from_array(rng.standard_normal((CACHE, HEAD_DIM // 2)).astype(np.float32), name)
              for name in ("cos", "sin")]
    widths = {"q": HEADS * HEAD_DIM, "k": KV_HEADS * HEAD_DIM, "v": KV_HEADS * HEAD_DIM}
    tokens = {f"{n}{i}": rng.standard_normal((1, 1, w)).astype(np.float32) for i in range(layers) for n, w in widths.items()}
    caches = {f"{n}{i}": rng.standard_normal((1, KV_HEADS, CACHE, HEAD_DIM)).astype(np.float32)
              for i in range(layers) for n in ("past_key", "past_value")}

    def value(name, array):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(array.shape))

    def outputs(i):
        return [helper.make_tensor_value_info(f"{n}{i}", TensorProto.FLOAT, None) for n in ("out", "present_key", "present_value")]

    nodes, inputs, outs = [], [], []
    for i in range(layers):
        names = [f"q{i}", f"k{i}", f"v{i}", f"past_key{i}", f"past_value{i}", "seqlens_k", "total_sequence_length", "cos", "sin"]
        nodes.append(helper.make_node("GroupQueryAttention", names, [o.name for o in outputs(i)], domain="com.microsoft",
                                      num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1))
        inputs += [value(n, tokens[n]) for n in names[:3]] + [value(n, caches[n]) for n in names[3:5]]
        outs += outputs(i)
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    gqa = helper.make_model(helper.make_graph(nodes, "gqa", inputs, outs, rotary), ir_version=10,
                            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    gqa_feeds = {**tokens, **caches, "seqlens_k": np.array([position], np.int32),
                 "total_sequence_length": np.array(position + 1, np.int32)}

    pasts = {name: array[:, :, :position].copy() for name, array in caches.items()}
    nodes, inputs, outs = [], [], []
    for i in range(layers):
        nodes.append(helper.make_node("RotaryEmbedding", [f"q{i}", "cos", "sin", "position_ids"], [f"q_rot{i}"], num_heads=HEADS))
        nodes.append(helper.make_node("RotaryEmbedding", [f"k{i}", "cos", "sin", "position_ids"], [f"k_rot{i}"], num_heads=KV_HEADS))
        nodes.append(helper.make_node("Attention", [f"q_rot{i}", f"k_rot{i}", f"v{i}", "", f"past_key{i}", f"past_value{i}"],
                                      [o.name for o in outputs(i)], q_num_heads=HEADS, kv_num_heads=KV_HEADS))
        inputs += [value(n, tokens[n]) for n in (f"q{i}", f"k{i}", f"v{i}")]
        inputs += [value(n, pasts[n]) for n in (f"past_key{i}", f"past_value{i}")]
        outs += outputs(i)
    inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, 1]))
    onnx_attention = helper.make_model(helper.make_graph(nodes, "attention23", inputs, outs, rotary), ir_version=10,
                                       opset_imports=[helper.make_opsetid("", 23)])
    attention_feeds = {**tokens, **pasts, "position_ids": np.array([[position]], np.int64)}
    return [("GroupQueryAttention (contrib, shared cache)", gqa, gqa_feeds, True),
            ("Attention opset 23 + 2 RotaryEmbedding", onnx_attention, attention_feeds, False)]


def timed(model, feeds, shared: bool, threads: int, calls: int) -> float:
    """Milliseconds a call of the whole graph, inputs bound once."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        past = output.name.replace("present", "past")
        if shared and past in values:
            binding.bind_ortvalue_output(output.name, values[past])
        else:
            binding.bind_output(output.name)
    for _ in range(calls // 10):
        session.run_with_iobinding(binding)
    start = time.perf_counter()
    for _ in range(calls):
        session.run_with_iobinding(binding)
    return (time.perf_counter() - start) / calls * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.onnx_attention_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--position", type=int, default=96, help="cached positions before the token (< 256)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    if not 0 < args.position < CACHE:
        parser.error(f"--position must be in 1..{CACHE - 1}")
    kernels = graphs(args.layers, args.position)
    threads = [int(t) for t in args.threads.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for count in threads:
            for name, model, feeds, shared in kernels:
                times.setdefault((name, count), []).append(timed(model, feeds, shared, count, args.calls))
    print(f"{args.layers} layers, one token at position {args.position}, median of {args.rounds} rounds:")
    print("| kernel | threads | ms a token | us a layer |\n|---|---|---|---|")
    for (name, count), values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {count} | {median:.3f} | {median / args.layers * 1e3:.1f} |")


if __name__ == "__main__":
    main()
