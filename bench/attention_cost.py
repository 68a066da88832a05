"""What a token's attention costs in a .pte, apart from the weights: SmolLM2's 30 layers of
attention (9 query heads, 3 key/value heads, head dim 64) and nothing else, two ways.

- ``custom``: the export's attention, ``llama::update_cache`` twice then ``llama::custom_sdpa``
  (portable kernels from ExecuTorch's LLM custom ops; their cost grows with the position).
- ``xnnpack``: the same attention as ops XNNPACK takes, over the whole static cache with a causal
  mask: scores as K @ Q^T (so the cache is never transposed), softmax, then P @ V, the caches laid
  out [kv head, position, 1, head dim] so ``update_cache`` still writes them in place.

Each variant is exported once, then ``forward`` is timed for one new token at each position in
``--positions``, 2 threads, median of 7 runs of 200 calls, in one process: the custom ops first,
then again after one call of an XNNPACK linear (in a .pte the two alternate every layer, and one
XNNPACK call leaves the custom ops' kernels slower at 2 threads for good), then XNNPACK's.

    python -m bench.attention_cost [--positions 10,50,100,200] [--cache 256] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rankdown.atomic import write_text_atomic

LAYERS, HEADS, KV_HEADS, DIM = 30, 9, 3, 64


def _modules(cache: int):
    import torch

    group = HEADS // KV_HEADS

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(LAYERS):
                self.register_buffer(f"k{i}", torch.zeros(1, cache, KV_HEADS, DIM))
                self.register_buffer(f"v{i}", torch.zeros(1, cache, KV_HEADS, DIM))

        def forward(self, q, k, v, input_pos):
            p = input_pos[0].item()
            torch._check_is_size(p)
            torch._check(p + q.shape[1] <= cache)
            for i in range(LAYERS):
                keys, values = getattr(self, f"k{i}"), getattr(self, f"v{i}")
                torch.ops.llama.update_cache(k, keys, p)
                torch.ops.llama.update_cache(v, values, p)
                q = torch.ops.llama.custom_sdpa(q, keys, values, p, None, 0.0, True, DIM ** -0.5)
            return q

    class Xnnpack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(LAYERS):
                self.register_buffer(f"k{i}", torch.zeros(KV_HEADS, cache, 1, DIM))
                self.register_buffer(f"v{i}", torch.zeros(KV_HEADS, cache, 1, DIM))
            self.register_buffer("mask", torch.full((cache, cache), float("-inf")).triu(1))

        def forward(self, q, k, v, input_pos):
            n = q.shape[1]
            p = input_pos[0].item()
            torch._check_is_size(p)
            torch._check(p + n <= cache)
            mask = self.mask.narrow(0, p, n).view(1, n, 1, cache)
            for i in range(LAYERS):
                keys, values = getattr(self, f"k{i}"), getattr(self, f"v{i}")
                torch.ops.llama.update_cache(k.permute(2, 1, 0, 3), keys, p)
                torch.ops.llama.update_cache(v.permute(2, 1, 0, 3), values, p)
                grouped = q.view(n, KV_HEADS, group, DIM).permute(1, 0, 2, 3).reshape(KV_HEADS, n * group, DIM)
                scores = torch.bmm(keys.view(KV_HEADS, cache, DIM), grouped.transpose(1, 2)).transpose(1, 2)
                scores = (scores.view(KV_HEADS, n, group, cache) * DIM ** -0.5 + mask).view(KV_HEADS, n * group, cache)
                out = torch.bmm(torch.softmax(scores, dim=-1), values.view(KV_HEADS, cache, DIM))
                q = out.view(KV_HEADS, n, group, DIM).permute(1, 0, 2, 3).reshape(1, n, HEADS, DIM)
            return q

    return {"custom": Custom(), "xnnpack": Xnnpack()}


def export(module, cache: int, delegate: bool, path: Path) -> None:
    import torch
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    # Four tokens in the example: a length-1 example would specialise the sequence length to 1.
    example = (torch.randn(1, 4, HEADS, DIM), torch.randn(1, 4, KV_HEADS, DIM), torch.randn(1, 4, KV_HEADS, DIM),
               torch.tensor([5]))
    seq = torch.export.Dim("seq", max=cache - 1)
    dynamic = {"q": {1: seq}, "k": {1: seq}, "v": {1: seq}, "input_pos": None}
    program = torch.export.export(module, example, dynamic_shapes=dynamic, strict=True)
    partitioners = []
    if delegate:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners = [XnnpackPartitioner()]
    edge = to_edge_transform_and_lower(program, partitioner=partitioners,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
    path.write_bytes(edge.to_executorch().buffer)


def export_linear(path: Path) -> None:
    """One 512 x 512 fp32 linear on 64 rows, lowered to XNNPACK: enough work to run on every thread."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(torch.nn.Linear(512, 512), (torch.randn(64, 512),), strict=True)
    path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def load(path: Path, threads: int):
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)
    return portable_lib._load_for_executorch(str(path))


def time_forward(module, position: int) -> float:
    """Microseconds per call of ``forward`` for one new token at ``position``."""
    import torch

    args = [torch.randn(1, 1, HEADS, DIM), torch.randn(1, 1, KV_HEADS, DIM), torch.randn(1, 1, KV_HEADS, DIM),
            torch.tensor([position])]
    for _ in range(50):
        module.forward(args)
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(200):
            module.forward(args)
        runs.append((time.perf_counter() - start) / 200 * 1e6)
    return statistics.median(runs)


def _positions(text: str) -> list[int]:
    try:
        positions = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated whole numbers: {text!r}") from None
    if min(positions) < 0:
        raise argparse.ArgumentTypeError(f"positions cannot be negative: {text!r}")
    return positions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", default="10,50,100,200", type=_positions,
                        help="comma-separated positions, each below --cache")
    parser.add_argument("--cache", type=int, default=256, help="static cache length (the export's --max-seq-len)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from rankdown.export.et_attention import load_custom_ops

    load_custom_ops()
    positions = args.positions
    if max(positions) >= args.cache:
        parser.error(f"--positions must be below --cache {args.cache}, got {max(positions)}")
    lines = [f"{LAYERS} layers of attention ({HEADS} query heads, {KV_HEADS} key/value heads, head dim {DIM}), "
             f"a cache of {args.cache}, {args.threads} threads: microseconds per token (one call of forward). "
             "Columns in the order they ran, in one process: `custom` before any XNNPACK delegate has run, "
             "`custom` again after one call of a 64 x 512 x 512 XNNPACK linear, then `xnnpack`", "",
             "| position | custom (first) | custom (after one XNNPACK call) | xnnpack |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, module in _modules(args.cache).items():
            paths[name] = Path(tmp) / f"{name}.pte"
            export(module, args.cache, name == "xnnpack", paths[name])
        export_linear(Path(tmp) / "linear.pte")
        custom = load(paths["custom"], args.threads)
        first = {p: time_forward(custom, p) for p in positions}
        import torch

        load(Path(tmp) / "linear.pte", args.threads).forward([torch.randn(64, 512)])
        after = {p: time_forward(custom, p) for p in positions}
        xnnpack = load(paths["xnnpack"], args.threads)
        delegated = {p: time_forward(xnnpack, p) for p in positions}
        for p in positions:
            lines.append(f"| {p} | {first[p]:.0f} | {after[p]:.0f} | {delegated[p]:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        write_text_atomic(args.out, report)


if __name__ == "__main__":
    main()
