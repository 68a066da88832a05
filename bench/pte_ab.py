"""Two .pte bundles interleaved in one process: which decodes faster, when the gap is smaller than
this host's minute-to-minute drift.

    python -m bench.pte_ab A_BUNDLE B_BUNDLE [--rounds 30] [--threads 2]

Both programs are loaded once (ExecuTorch's Python runtime, rankdown's decoder, as `validate` and
`bench.peers` run a bundle); each round runs a 32-token prompt then times 128 greedy tokens on A
and on B, back to back, the order alternating between rounds. A round's ratio B/A is taken from
two runs seconds apart, so a slow minute slows both; the median of the rounds' ratios, its
interquartile range and how many rounds B won are printed. Separate-process bench runs (`bench.peers`) spread by
more than 0.1 from run to run on the same artifact, which this resolves.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT_TOKENS, NEW_TOKENS = 32, 128


def summary(a: list[float], b: list[float]) -> dict:
    """Rounds of tok/s for A and B (same length, paired by round): B over A per round."""
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    return {"a": statistics.median(a), "b": statistics.median(b), "ratio": statistics.median(ratios),
            "q25": float(np.percentile(ratios, 25)), "q75": float(np.percentile(ratios, 75)),
            "b_faster": sum(r > 1 for r in ratios), "rounds": len(ratios)}


def decode_rate(decoder) -> float:
    """Tokens per second of 128 greedy tokens after a 32-token prompt."""
    decoder.prefill(list(range(100, 100 + PROMPT_TOKENS)))
    token = 5
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        token = int(decoder.step(token).argmax())
    return NEW_TOKENS / (time.perf_counter() - start)


def interleaved(decoders: list, rounds: int) -> list[list[float]]:
    """Each decoder's rate per round after one warm-up each, the order alternating by round."""
    for decoder in decoders:
        decode_rate(decoder)
    timed: list[list[float]] = [[] for _ in decoders]
    for round_no in range(rounds):
        order = range(len(decoders)) if round_no % 2 == 0 else reversed(range(len(decoders)))
        for i in order:
            timed[i].append(decode_rate(decoders[i]))
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    for bundle in (args.a, args.b):
        if not (bundle / "executorch" / "model.pte").is_file():
            raise SystemExit(f"{bundle}: no executorch/model.pte (a `rankdown export` folder with the executorch format)")

    from rankdown.export.decoding import open_executorch

    decoders = [open_executorch(bundle / "executorch" / "model.pte", threads=args.threads) for bundle in (args.a, args.b)]
    s = summary(*interleaved(decoders, args.rounds))
    print(f"A {args.a}: {s['a']:.1f} tok/s; B {args.b}: {s['b']:.1f} tok/s; B/A {s['ratio']:.3f} "
          f"(interquartile {s['q25']:.3f}-{s['q75']:.3f}), B faster in {s['b_faster']}/{s['rounds']} rounds")


if __name__ == "__main__":
    main()
