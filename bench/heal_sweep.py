"""Healing settings compared without recompressing (issue 14): heal an unhealed checkpoint.

`rankdown compress --heal-steps N` computes the dense model's targets, factors the model and heals
it in one run. The factorization does not depend on the healing settings, so on a slow machine a
sweep over steps and learning rates repeats it for nothing. This script runs the same pipeline
functions (``teacher_targets``, ``heal``, ``write_model``) on the factor pairs of an unhealed
checkpoint made by `rankdown compress` with the same method, ratio and task, writes the healed
checkpoint with the unhealed report plus its ``healing`` block (wall seconds: the unhealed
compression's plus the teacher's and healing's), and scores it like `make bench-real`.

Settings are to be chosen on the report's held-back training windows, never on the scores.

    python -m bench.heal_sweep DENSE UNHEALED OUT --task code --steps 32 --lr 5e-5,2e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from rankdown.atomic import write_text_atomic
from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.compress.config import CompressConfig, CompressionReport, Healing, HealingReport, Precision
from rankdown.compress.healing import heal, teacher_targets, write_healed
from rankdown.schema import to_jsonable


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def heal_checkpoint(dense: Path, unhealed: Path, out: Path, steps: int, lrs: list[float],
                    seed: int = 0, precision: Precision = Precision.AUTO) -> tuple[CompressionReport, list[HealingReport]]:
    """Heal the unhealed factors once per learning rate (the dense model's targets computed once) and
    write the one with the lowest held-back next-token loss; its report, and every rate's healing."""
    before = CompressionReport.read(unhealed)
    if before.healing is not None:
        raise SystemExit(f"{unhealed} is already healed")
    cfg = CompressConfig(method=before.method, ratio=before.ratio, task=before.task, healing=Healing(steps=steps, precision=precision),
                         seed=seed)
    targets = teacher_targets(open_checkpoint(dense), load_tokenizer(dense), cfg, progress)
    ckpt = open_checkpoint(unhealed)
    tried: list[HealingReport] = []
    best: tuple[LlamaForCausalLM, HealingReport] | None = None
    for lr in lrs:
        torch.manual_seed(seed)
        model = load_model(ckpt)  # float32, as compress holds the factors it heals
        tried.append(heal(model, targets, Healing(steps=steps, lr=lr, precision=precision), seed, progress))
        if best is None or tried[-1].loss_after < best[1].loss_after:
            best = (model, tried[-1])
        del model
    if best is None:
        raise SystemExit("no learning rate given")
    model, report = best
    # the unhealed run's settings with the healing that was written (an older report's are empty)
    config = before.config | {"healing": to_jsonable(dataclasses.replace(cfg.healing, lr=report.lr))}
    return write_healed(model, unhealed, out, targets, report, ckpt.stored_dtype, overwrite=True, config=config), tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("unhealed", type=Path, help="an unhealed `rankdown compress` checkpoint of the dense model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--task", required=True, help="the task the unhealed checkpoint was compressed for")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", default=str(Healing.lr), help="comma-separated learning rates: each heals the "
                        "unhealed factors, the one with the lowest held-back loss is written and scored")
    parser.add_argument("--precision", default=Precision.AUTO.value, choices=[p.value for p in Precision],
                        help="healing's arithmetic, as compress --heal-precision")
    parser.add_argument("--score-task", default="compare", help="exact-match task scored beside code and prose")
    parser.add_argument("--results", type=Path, default=Path("bench/results/healing.json"),
                        help="the row is added here (a row of the same checkpoint replaced)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if CompressionReport.read(args.unhealed).task != args.task:
        raise SystemExit(f"{args.unhealed} was not compressed for {args.task}")
    report, tried = heal_checkpoint(args.dense, args.unhealed, args.out, args.steps,
                                    [float(x) for x in args.lr.split(",")], precision=Precision(args.precision))
    from bench.real import score

    row = {"healing": dataclasses.asdict(report.healing), "tried": [dataclasses.asdict(h) for h in tried],
           "wall_seconds": report.wall_seconds,
           "peak_rss_mb": report.peak_memory_mb, "load_average": round(os.getloadavg()[0], 1)}
    row |= score(args.out, args.score_task, 200, 8192)
    row = {"task": args.task, "method": report.method, "ratio": report.ratio, "score_task": args.score_task,
           "checkpoint": str(args.out), "command": " ".join(["python -m bench.heal_sweep", *sys.argv[1:]])} | row
    print("SCORE " + json.dumps(row), flush=True)
    rows = json.loads(args.results.read_text())["rows"] if args.results.is_file() else []
    rows = [r for r in rows if r["checkpoint"] != row["checkpoint"]] + [row]
    write_text_atomic(args.results, json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
