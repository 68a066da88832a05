"""How much of an ONNX int4 bundle's decode its ``MatMulNBits`` and ``GroupQueryAttention`` kernels
take by themselves: the bundle's own nodes (weights, blocks, accuracy level, attention attributes as
exported), each fed its own one-token input, in graph order, nothing else in the graph; beside the
bundle's decode, interleaved in one process.

    python -m bench.onnx_kernels BUNDLE [--threads 1,2] [--rounds 5]

Prints, per thread count, milliseconds a token for: the bundle's decode (128 greedy tokens after a
32-token prompt, as ``bench.onnx_ab`` times it), its MatMulNBits alone, those without the head, and
its attention alone at the decode's mean position (96). What those kernels take alone is a floor no
graph change above them can go below (README, "What bounds ONNX int4 here").
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.pte_ab import decode_rate

HEAD_PREFIX = "/lm_head"
MEAN_POSITION = 32 + 64  # the timed decode's 128 tokens after a 32-token prompt
CACHE_POSITIONS = 256


def kernels_only(graph: Path, head: bool = True):
    """The graph's MatMulNBits nodes as one model: each reads its own graph input ``x{i}`` (1 x 1 x K)
    and writes ``y{i}``. Constant inputs that other nodes compute (a Cast of fp16 scales) keep their
    producers, which onnxruntime folds at load."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(graph)
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    kept: list = []
    inputs: list = []
    outputs: list = []
    used: set[str] = set()
    constants: dict[str, onnx.NodeProto] = {}

    def need(name: str) -> None:
        if not name or name in used or name in constants:
            return
        if name in initializers:
            used.add(name)
            return
        producer = producers.get(name)
        if producer is None or producer.op_type not in ("Cast", "Reshape", "Constant"):
            raise SystemExit(f"{graph}: MatMulNBits input {name!r} is not a constant this bench can keep")
        constants[name] = producer
        for upstream in producer.input:
            need(upstream)

    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or (not head and node.name.startswith(HEAD_PREFIX)):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        i = len(kept)
        for name in node.input[1:]:
            need(name)
        kept.append(helper.make_node("MatMulNBits", [f"x{i}", *node.input[1:]], [f"y{i}"], name=node.name,
                                     domain="com.microsoft", **attributes))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 1, attributes["K"]]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 1, attributes["N"]]))
    if not kept:
        raise SystemExit(f"{graph}: no MatMulNBits nodes (export with --quantize int4)")
    producers_kept = [n for n in model.graph.node if any(o in constants for o in n.output)]
    result = helper.make_graph(producers_kept + kept, "kernels", inputs, outputs, [initializers[n] for n in sorted(used)])
    return helper.make_model(result, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def attention_only(graph: Path):
    """The graph's GroupQueryAttention nodes as one model: node i reads ``q{i}``, ``k{i}``, ``v{i}``
    and a cache ``past_key{i}`` / ``past_value{i}`` that ``KernelRun`` binds as its present too, as
    the decoder runs it; ``seqlens_k`` and ``total_sequence_length`` are shared."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(graph)
    initializers = {init.name: init for init in model.graph.initializer}
    kept: list = []
    inputs: list = []
    outputs: list = []
    used: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rotary = list(node.input[7:9]) if attributes.get("do_rotary") else []
        if not rotary or not all(name in initializers for name in rotary):
            raise SystemExit(f"{graph}: {node.name} has no rotary caches as initializers, which this bench needs")
        used.update(rotary)
        head_size = 2 * initializers[rotary[0]].dims[1]
        heads, kv_heads, i = attributes["num_heads"], attributes["kv_num_heads"], len(kept)
        names = [f"q{i}", f"k{i}", f"v{i}", f"past_key{i}", f"past_value{i}", "seqlens_k", "total_sequence_length", *rotary]
        kept.append(helper.make_node("GroupQueryAttention", names, [f"out{i}", f"present_key{i}", f"present_value{i}"],
                                     name=node.name, domain="com.microsoft", **attributes))
        widths = (heads * head_size, kv_heads * head_size, kv_heads * head_size)
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, w]) for n, w in zip(names, widths)]
        cache = [1, kv_heads, CACHE_POSITIONS, head_size]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, cache) for n in names[3:5]]
        outputs += [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [1, 1, heads * head_size])]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, cache) for n in (f"present_key{i}", f"present_value{i}")]
    if not kept:
        raise SystemExit(f"{graph}: no GroupQueryAttention nodes (a rankdown ONNX export)")
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    result = helper.make_graph(kept, "attention", inputs, outputs, [initializers[n] for n in sorted(used)])
    return helper.make_model(result, opset_imports=list(model.opset_import), ir_version=model.ir_version)


class KernelRun:
    """One session over ``kernels_only``'s or ``attention_only``'s model with every input and output
    bound once; a past cache and its present share one buffer, and attention sees ``position``
    tokens before the new one."""

    def __init__(self, model, threads: int, position: int = MEAN_POSITION) -> None:
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.nodes = sum(1 for node in model.graph.node if node.domain == "com.microsoft")
        rng = np.random.default_rng(0)
        self._arrays = []  # the buffers the bound OrtValues view
        shared = {}
        for value in model.graph.input:
            if value.name == "seqlens_k":
                self.binding.bind_cpu_input(value.name, np.array([position], np.int32))
                continue
            if value.name == "total_sequence_length":
                self.binding.bind_cpu_input(value.name, np.array(position + 1, np.int32))
                continue
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            array = rng.standard_normal(shape).astype(np.float32)
            self._arrays.append(array)
            bound = ort.OrtValue.ortvalue_from_numpy(array)
            self.binding.bind_ortvalue_input(value.name, bound)
            if value.name.startswith("past_"):
                shared[value.name.replace("past_", "present_")] = bound
        for value in model.graph.output:
            if value.name in shared:
                self.binding.bind_ortvalue_output(value.name, shared[value.name])
                continue
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            self.binding.bind_ortvalue_output(value.name, ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32))

    def milliseconds(self, runs: int = 128) -> float:
        """Median milliseconds of one run over ``runs`` runs, as many as a decode round's tokens."""
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    graph = args.bundle / "onnx" / "model.onnx"
    if not graph.is_file():
        raise SystemExit(f"{args.bundle}: no onnx/model.onnx (a `rankdown export` folder with the onnx format)")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")

    from rankdown.export.decoding import OnnxDecoder

    models = [kernels_only(graph, head=True), kernels_only(graph, head=False), attention_only(graph)]
    for threads in (int(t) for t in args.threads.split(",")):
        decoder = OnnxDecoder(graph, threads=threads)
        runs = [KernelRun(model, threads) for model in models]
        decode_rate(decoder)
        for run in runs:
            run.milliseconds(16)
        rows: list[list[float]] = [[] for _ in range(1 + len(runs))]
        for _ in range(args.rounds):
            rows[0].append(1e3 / decode_rate(decoder))
            for row, run in zip(rows[1:], runs):
                row.append(run.milliseconds())
        decode, kernels, body, attention = (statistics.median(r) for r in rows)
        print(f"{threads} thread(s): decode {decode:.3f} ms a token ({1e3 / decode:.1f} tok/s); alone: its "
              f"{runs[0].nodes} MatMulNBits {kernels:.3f} ms, without the head {body:.3f} ms; its {runs[2].nodes} "
              f"GroupQueryAttention at position {MEAN_POSITION} {attention:.3f} ms; the two together "
              f"{(kernels + attention) / decode:.0%} of the decode, the rest {decode - kernels - attention:.3f} ms",
              flush=True)
        del decoder, runs


if __name__ == "__main__":
    main()
