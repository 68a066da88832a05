"""Where an ONNX int4 bundle's decode time goes, kernel by kernel: the bundle's own ``MatMulNBits``
nodes, its ``GroupQueryAttention`` nodes and its other nodes (norms, splits, activations), each kind
in a graph of its own, every node fed its own one-token input; beside the bundle's decode and the
share of it spent in onnxruntime's ``run``, interleaved in one process.

    python -m bench.onnx_kernels BUNDLE [--threads 1,2] [--rounds 5]

Prints, per thread count, milliseconds a token for: the decode (128 greedy tokens after a 32-token
prompt, as ``bench.onnx_ab`` times it) and its Python around onnxruntime; the MatMulNBits alone, and
without the head; the attention alone at the decode's mean position (96); the other nodes alone; and
what is left, onnxruntime's executor between the nodes. What the kernels take alone is a floor no
graph change above them can go below (docs/measurements.md, "What bounds ONNX int4 here").
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


def other_nodes_only(graph: Path):
    """The graph's nodes that are neither MatMulNBits nor attention nor the embedding and mask
    preamble nor constants (so: norms, splits, activations, the ``Mul`` of the MLP) as one model, each
    reading its own inputs at the shapes one decoded token gives them (found by one run of the graph)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(graph)
    initializers = {init.name: init for init in model.graph.initializer}
    preamble = ("/model/embed_tokens/", "/model/attn_mask_reformat/", "/model/constant_nodes/")
    chosen = [node for node in model.graph.node
              if node.op_type not in ("MatMulNBits", "GroupQueryAttention") and not node.name.startswith(preamble)
              and not all(name in initializers for name in node.input)]
    probed = sorted({name for node in chosen for name in node.input if name and name not in initializers})
    for name in probed:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.array([[5]], np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, 1), np.int64)
        else:  # an empty cache [1, kv_heads, 0, head_size]
            feeds[value.name] = np.zeros([1, value.shape[1], 0, _head_size(graph)], np.float32)
    shapes = {name: array.shape for name, array in zip(probed, session.run(probed, feeds))}
    del session
    kept: list = []
    inputs: list = []
    outputs: list = []
    used: set[str] = set()
    for i, node in enumerate(chosen):
        names = []
        for j, name in enumerate(node.input):
            if not name or name in initializers:
                used.update([name] if name else [])
                names.append(name)
                continue
            names.append(f"x{i}_{j}")
            inputs.append(helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, list(shapes[name])))
        results = [f"y{i}_{j}" if name else "" for j, name in enumerate(node.output)]
        outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in results if name]
        kept.append(helper.make_node(node.op_type, names, results, name=node.name, domain=node.domain,
                                     **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
    result = helper.make_graph(kept, "others", inputs, outputs, [initializers[n] for n in sorted(used)])
    return helper.make_model(result, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _head_size(graph: Path) -> int:
    import json

    config = json.loads((graph.parent / "config.json").read_text(encoding="utf-8"))
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


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
        self.nodes = len(model.graph.node) - sum(1 for node in model.graph.node if node.op_type == "Cast")
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
            if shape and all(shape):
                self.binding.bind_ortvalue_output(value.name, ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32))
            else:  # onnxruntime allocates it, as the decode's intermediate values
                self.binding.bind_output(value.name)

    def milliseconds(self, runs: int = 128) -> float:
        """Mean milliseconds of one run over ``runs`` runs, as many as a decode round's tokens: a mean,
        as the decode's rate and the session's share are, so that the columns subtract."""
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            seconds.append(time.perf_counter() - start)
        return statistics.fmean(seconds) * 1e3


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

    models = [kernels_only(graph, head=True), kernels_only(graph, head=False), attention_only(graph),
              other_nodes_only(graph)]
    for threads in (int(t) for t in args.threads.split(",")):
        decoder = OnnxDecoder(graph, threads=threads)
        in_run = _TimedRuns(decoder)
        runs = [KernelRun(model, threads) for model in models]
        decode_rate(decoder)
        for run in runs:
            run.milliseconds(16)
        rows: list[list[float]] = [[] for _ in range(2 + len(runs))]
        for _ in range(args.rounds):
            in_run.seconds.clear()
            rows[0].append(1e3 / decode_rate(decoder))
            # a mean, as the decode's rate and the kernels' rows are (so the columns subtract); not the
            # prompt's call. Each column is then the median of its rounds.
            rows[1].append(statistics.fmean(in_run.seconds[1:]) * 1e3)
            for row, run in zip(rows[2:], runs):
                row.append(run.milliseconds())
        decode, session, kernels, body, attention, others = (statistics.median(r) for r in rows)
        print(f"{threads} thread(s): decode {decode:.3f} ms a token ({1e3 / decode:.1f} tok/s), of it Python "
              f"{decode - session:.3f} ms; alone: its {runs[0].nodes} MatMulNBits {kernels:.3f} ms (without the head "
              f"{body:.3f}), its {runs[2].nodes} GroupQueryAttention at position {MEAN_POSITION} {attention:.3f} ms, "
              f"its {runs[3].nodes} other nodes {others:.3f} ms; left for onnxruntime between nodes "
              f"{session - kernels - attention - others:.3f} ms", flush=True)
        del decoder, runs


class _TimedRuns:
    """Wraps a decoder's session so each call's seconds are kept: ``run_with_iobinding`` (the
    in-place cache) or ``run`` (a graph whose cache is concatenated)."""

    def __init__(self, decoder) -> None:
        self.seconds: list[float] = []
        session = decoder.session
        timed = self

        def kept(method):
            def call(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    timed.seconds.append(time.perf_counter() - start)
            return call

        class Timed:
            run = staticmethod(kept(session.run))
            run_with_iobinding = staticmethod(kept(session.run_with_iobinding))

            def __getattr__(self, name):
                return getattr(session, name)

        decoder.session = Timed()


if __name__ == "__main__":
    main()
