"""The half of the harness that runs where the model will run: numpy and the runtime only.

    python -m rankdown.validate.on_device JOB.json OUT_DIR

JOB names the artifact, the runtime and pre-tokenized work (the host owns the tokenizer, the
PyTorch reference and every comparison). OUT_DIR receives ``result.json`` and ``logits.npz``.
Nothing here imports torch except ExecuTorch's own Python runtime, which needs it; on a
phone the C++ runner takes that part.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

JOB_SCHEMA = 2  # 2: parity new_tokens per prompt


def _import_runtime(runtime: str, native: bool) -> None:
    """Import before the load clock starts: a Python import is not what an app waits for."""
    from rankdown.export.formats import by_runtime

    if not native:
        importlib.import_module(by_runtime(runtime).runtime_module)


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss on Linux
    carries the parent's peak across fork and exec, so it would report the host's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux and Android


def _decoder(runtime: str, artifact: Path, threads: int | None, native_runner: list[str] | None):
    from rankdown.export.formats import by_runtime, runtime_names

    if runtime not in runtime_names():
        raise ValueError(f"unknown runtime {runtime!r}")
    return by_runtime(runtime).open_decoder(artifact, threads, native_runner)


def _parity(decoder, prompts: list[list[int]], new_tokens: list[int]) -> tuple[list[list[int]], dict]:
    """Each prompt's logits and greedy tokens; ``new_tokens`` per prompt (1 where only the prompt's
    logits are judged)."""
    from rankdown.export.decoding import greedy

    if len(new_tokens) != len(prompts):
        raise ValueError(f"parity job: {len(new_tokens)} token counts for {len(prompts)} prompts")
    tokens, arrays = [], {}
    for i, (prompt, count) in enumerate(zip(prompts, new_tokens)):
        got = greedy(decoder, prompt, count)
        tokens.append(list(got.tokens))
        arrays[f"prompt_{i}"] = got.prompt_logits.astype(np.float32)
    return tokens, arrays


def task_answers(decoder, prompts: list[list[int]], budgets: list[int], stop_ids: set[int]) -> list[list[int]]:
    """Greedy continuations, stopping at EOS or a token that ends the line."""
    out = []
    for prompt, budget in zip(prompts, budgets):
        logits = decoder.prefill(prompt)[-1]
        produced = []
        for _ in range(budget):
            token = int(np.argmax(logits))
            produced.append(token)
            if token in stop_ids:
                break
            logits = decoder.step(token)
        out.append(produced)
    return out


def perplexity(decoder, windows: list[list[int]]) -> tuple[float | None, int]:
    nll, count = 0.0, 0
    for window in windows:
        logits = decoder.prefill(window).astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        targets = np.asarray(window[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return (math.exp(nll / count), count) if count else (None, 0)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def _latency(decoder, job: dict) -> dict:
    spec = job["latency"]
    prompt = spec["prompt_tokens"]
    ttft = {}
    for length in spec["prompt_lengths"]:
        ids = prompt[:length]
        times = []
        for run in range(spec["warmup"] + spec["repeats"]):
            start = time.perf_counter()
            int(np.argmax(decoder.prefill(ids)[-1]))
            if run >= spec["warmup"]:
                times.append((time.perf_counter() - start) * 1e3)
        ttft[str(length)] = _spread(times)
    rates = []
    decode_prompt = prompt[: spec["decode_prompt_length"]]
    for run in range(spec["warmup"] + spec["repeats"]):
        token = int(np.argmax(decoder.prefill(decode_prompt)[-1]))
        start = time.perf_counter()
        for _ in range(spec["decode_tokens"]):
            token = int(np.argmax(decoder.step(token)))
        if run >= spec["warmup"]:
            rates.append(spec["decode_tokens"] / (time.perf_counter() - start))
    return {"ttft_ms": ttft, "decode_tokens_per_s": _spread(rates)}


def _rounding_probes(job: dict, out_dir: Path) -> dict:
    """Each probe graph's output on its input (export/onnx_int4_reference.py's ``RoundingProbe``: the
    host judges whether this device's onnxruntime rounded the input to int8). No bundle needed."""
    import onnxruntime as ort

    arrays = {}
    for i, probe in enumerate(job["rounding_probes"]):
        session = ort.InferenceSession(base64.b64decode(probe["model"]), providers=["CPUExecutionProvider"])
        arrays[f"probe_{i}"] = session.run(None, {"x": np.asarray(probe["x"], np.float32)})[0]
    result = {"machine": platform.machine(), "system": platform.system(), "probes": len(arrays)}
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "logits.npz", **arrays)
    (out_dir / "result.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result


def run_job(job: dict, out_dir: Path) -> dict:
    if job.get("schema_version") != JOB_SCHEMA:
        raise ValueError(f"job schema {job.get('schema_version')!r} is not {JOB_SCHEMA}")
    if "rounding_probes" in job:
        return _rounding_probes(job, out_dir)
    artifact = Path(job["bundle"]) / job["artifact"]
    native = job.get("executorch_runner")  # argv of rankdown-et-runner; absent: the Python runtime
    _import_runtime(job["runtime"], bool(native))
    start = time.perf_counter()
    decoder = _decoder(job["runtime"], artifact, job.get("threads"), native)
    result: dict = {"load_s": time.perf_counter() - start, "size_bytes": artifact.stat().st_size,
                    "max_positions": decoder.max_positions, "machine": platform.machine(),
                    "system": platform.system(), "cores": os.cpu_count(),
                    "runner": "native" if native and job["runtime"] == "executorch" else "python"}
    arrays: dict[str, Any] = {}  # savez takes its arrays as keywords
    if "parity" in job:
        tokens, arrays = _parity(decoder, job["parity"]["prompts"], job["parity"]["new_tokens"])
        result["parity_tokens"] = tokens
    if "quality" in job:
        q = job["quality"]
        begin = time.perf_counter()
        result["answers"] = task_answers(decoder, q["prompts"], q["budgets"], set(q["stop_ids"]))
        ppl, scored = perplexity(decoder, q["windows"])
        result["perplexity"], result["perplexity_tokens"] = ppl, scored
        result["quality_s"] = time.perf_counter() - begin
    if "latency" in job:
        result["latency"] = _latency(decoder, job)
    result["peak_rss_mb"] = peak_rss_mb()  # the whole process: runtime, model load and runs
    if hasattr(decoder, "close"):
        # The native runner holds the model in its own process: its peak is the app's figure.
        result["harness_peak_rss_mb"], result["peak_rss_mb"] = result["peak_rss_mb"], decoder.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "logits.npz", **arrays)
    (out_dir / "result.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m rankdown.validate.on_device JOB.json OUT_DIR", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        run_job(job, Path(argv[1]))
    except Exception as e:
        print(f"on_device: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
