"""A bundle's ONNX graph in onnxruntime's OpenVINO execution provider against its CPU provider.

OpenVINO is Intel's CPU runtime with its own 4-bit GEMM kernels (AMX, VNNI), and onnxruntime ships it
as a provider (the `onnxruntime-openvino` wheel, which replaces `onnxruntime`, hence its own venv):

    make bench-openvino BUNDLE=bench/models/work/W4-int4

or by hand, with any Python that has onnxruntime-openvino and numpy:

    python bench/onnx_openvino.py BUNDLE [--threads 2] [--prompt 32] [--tokens 64] [--rounds 5]

Both sessions read the same file. Each prefills the same prompt (token ids fixed by a seed) and then
decodes greedily, feeding back the previous step's present cache; rounds alternate the providers.
Prints the medians of decode milliseconds a token, whether the two greedy sequences agree and the
largest logit difference at the first decoded position. ``--placement`` instead prints onnxruntime's
node placement (which nodes OpenVINO took, which stayed on the CPU provider) and exits.

Standalone on purpose: numpy and onnxruntime only, nothing of the project's venv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def sessions(model: Path, threads: int, verbose: bool):
    import onnxruntime as ort

    def make(providers, options):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 0 if verbose else 3
        return ort.InferenceSession(str(model), so, providers=providers, provider_options=options)

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        sys.exit(f"this onnxruntime ({ort.__version__}) has no OpenVINO provider: install onnxruntime-openvino")
    return {"cpu": make(["CPUExecutionProvider"], [{}]),
            "openvino": make(["OpenVINOExecutionProvider"], [{"device_type": "CPU", "num_of_threads": str(threads)}])}


def decode(session, prompt, tokens: int, kv_heads: int, head_dim: int):
    """Greedy ids, the first decoded position's logits and each decode step's seconds."""
    import numpy as np

    names = [i.name for i in session.get_inputs()]
    past = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in names if n.startswith("past_key_values")}
    outputs = ["logits"] + [o.name for o in session.get_outputs() if o.name.startswith("present")]
    ids, first, seconds, total = list(prompt), None, [], len(prompt)
    step = np.array([prompt], np.int64)
    for i in range(tokens + 1):
        feeds = {"input_ids": step, "attention_mask": np.ones((1, total), np.int64), **past}
        start = time.perf_counter()
        logits, *presents = session.run(outputs, feeds)
        if i:
            seconds.append(time.perf_counter() - start)
        if first is None:
            first = logits[0, -1].copy()
        past = {n.replace("present", "past_key_values"): p for n, p in zip(outputs[1:], presents)}
        ids.append(int(logits[0, -1].argmax()))
        step = np.array([[ids[-1]]], np.int64)
        total += 1
    return ids[len(prompt):], first, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path, help="a `rankdown export` folder with onnx/model.onnx (fused graph)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--placement", action="store_true", help="print onnxruntime's node placement and exit")
    args = parser.parse_args()
    import numpy as np

    model = args.bundle / "onnx" / "model.onnx"
    if not model.is_file():
        sys.exit(f"{args.bundle}: no onnx/model.onnx (a `rankdown export` folder with the onnx format)")
    config = args.bundle / "onnx" / "genai_config.json"
    if not config.is_file():
        sys.exit(f"{args.bundle}: no onnx/genai_config.json (export with the fused graph, `--onnx-graph fused`, the default)")
    genai = json.loads(config.read_text())["model"]
    kv_heads, head_dim = genai["decoder"]["num_key_value_heads"], genai["decoder"]["head_size"]
    made = sessions(model, args.threads, args.placement)
    if args.placement:
        return  # the placement is in onnxruntime's verbose log, on stderr
    prompt = np.random.default_rng(0).integers(100, genai["vocab_size"] - 1, args.prompt).tolist()
    times: dict[str, list[float]] = {name: [] for name in made}
    runs = {}
    for _ in range(args.rounds):
        for name, session in made.items():
            runs[name] = decode(session, prompt, args.tokens, kv_heads, head_dim)
            times[name].append(statistics.median(runs[name][2]) * 1e3)
    for name, ms in times.items():
        print(f"{name:9s} decode {statistics.median(ms):7.3f} ms a token ({1e3 / statistics.median(ms):6.1f} tok/s); "
              f"rounds {', '.join(f'{m:.3f}' for m in ms)}")
    (cpu_ids, cpu_first, _), (ov_ids, ov_first, _) = runs["cpu"], runs["openvino"]
    agree = next((i for i, (a, b) in enumerate(zip(cpu_ids, ov_ids)) if a != b), len(cpu_ids))
    print(f"greedy ids identical for {agree} of {len(cpu_ids)} tokens; first position max |logit diff| "
          f"{float(np.abs(cpu_first - ov_first).max()):.3f} (logit scale {float(np.abs(cpu_first).max()):.1f}); "
          f"openvino/cpu time {statistics.median(times['openvino']) / statistics.median(times['cpu']):.2f}x")


if __name__ == "__main__":
    main()
