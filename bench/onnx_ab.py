"""Two ONNX bundles interleaved in one onnxruntime process, as ``bench.pte_ab`` does for two .pte.

    python -m bench.onnx_ab A_BUNDLE B_BUNDLE [--rounds 12] [--threads 2] [--a-concatenated]

Each bundle's onnx/model.onnx in an ``OnnxDecoder`` (rankdown's, as ``validate`` and ``bench.peers``
run it); each round runs a 32-token prompt then times 128 greedy tokens on A and on B, the order
alternating by round, and the same summary as ``bench.pte_ab`` is printed. ``--a-concatenated``
runs A with its cache grown by concatenation (``in_place=False``): with A and B the same bundle,
that measures the in-place cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.pte_ab import interleaved, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--a-concatenated", action="store_true", help="A's cache grown by concatenation")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    graphs = [bundle / "onnx" / "model.onnx" for bundle in (args.a, args.b)]
    for bundle, graph in zip((args.a, args.b), graphs):
        if not graph.is_file():
            raise SystemExit(f"{bundle}: no onnx/model.onnx (a `rankdown export` folder with the onnx format)")

    from rankdown.export.decoding import OnnxDecoder

    decoders = [OnnxDecoder(graphs[0], threads=args.threads, in_place=False if args.a_concatenated else None),
                OnnxDecoder(graphs[1], threads=args.threads)]
    s = summary(*interleaved(decoders, args.rounds))
    cache = ["concatenated" if args.a_concatenated else "in place" if decoders[0].in_place else "concatenated",
             "in place" if decoders[1].in_place else "concatenated"]
    print(f"A {args.a} (cache {cache[0]}): {s['a']:.1f} tok/s; B {args.b} (cache {cache[1]}): {s['b']:.1f} tok/s; "
          f"B/A {s['ratio']:.3f} (interquartile {s['q25']:.3f}-{s['q75']:.3f}), B faster in {s['b_faster']}/{s['rounds']} rounds")


if __name__ == "__main__":
    main()
