"""Where a .pte's decode time goes: ExecuTorch's own profiler (ETDump), per event, per token.

Runs a 32-token prompt, then ``--steps`` greedy tokens one call each, in the Python runtime with
event tracing on, and prints each event's time and calls per call of ``forward`` (the prompt call
counts as one): the delegate calls, each XNNPACK operator inside them, and each portable kernel
outside. Tracing costs time itself, so compare rows within one run, not against `validate`.
Every token goes to ``forward`` unless ``--decode-method``: then the prompt goes to ``forward`` and
each new token to the .pte's one-token method (``decode_step``), as rankdown's runners call them,
and the rows are still per call (the prompt's included).

    python -m bench.et_profile PTE [PTE ...] [--signature hf] [--decode-method] [--out FILE.md]

``--signature hf``: optimum-executorch's ``forward(tokens, cache_position[n])``; the default is
rankdown's ``forward(tokens, input_pos[1])``.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

from rankdown.atomic import write_text_atomic
from rankdown.errors import RankdownError
from rankdown.export.decoding import DECODE_METHOD, set_executorch_threads
from rankdown.export.et_attention import load_custom_ops
from rankdown.export.pte_file import check_pte_header


def profile(pte: Path, steps: int, signature: str, threads: int,
            decode_method: bool = False) -> tuple[dict[str, float], dict[str, int], int]:
    """Per-event totals (ms) and counts over ``steps + 1`` calls: the prompt's of ``forward``, then
    one per new token, of ``forward`` or (``decode_method``) of ``DECODE_METHOD``."""
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib
    from executorch.kernels import quantized  # noqa: F401  (the 8-bit embedding kernels)

    load_custom_ops()
    set_executorch_threads(threads)
    data = pte.with_suffix(".ptd")
    module = portable_lib._load_for_executorch(str(pte), str(data) if data.is_file() else None, True, 0)
    if decode_method and DECODE_METHOD not in module.method_names():
        raise RankdownError(f"{pte}: no {DECODE_METHOD} method (--decode-method needs a quantized rankdown .pte)")

    def run(ids: list[int], start: int):
        positions = (torch.arange(start, start + len(ids), dtype=torch.long) if signature == "hf"
                     else torch.tensor([start], dtype=torch.long))
        return module.forward([torch.tensor([ids], dtype=torch.long), positions])[0]

    prompt = list(range(100, 132))
    logits = run(prompt, 0)
    for i in range(steps):
        token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
        if decode_method:
            logits = module.run_method(DECODE_METHOD, [torch.tensor([[token]], dtype=torch.long),
                                                       torch.tensor([len(prompt) + i], dtype=torch.long)])[0]
        else:
            logits = run([token], len(prompt) + i)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "trace.etdp"
        module.write_etdump_result_to_file(str(dump))
        inspector = Inspector(etdump_path=str(dump))
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            if event.perf_data is not None:
                totals[event.name] += sum(event.perf_data.raw)
                counts[event.name] += len(event.perf_data.raw)
    return totals, counts, steps + 1


def table(pte: Path, totals: dict[str, float], counts: dict[str, int], calls: int, rows: int) -> str:
    lines = [f"`{pte}`: per call of forward, {calls} calls", "", "| ms | calls | event |", "|---|---|---|"]
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"| {total / calls:.3f} | {counts[name] / calls:.1f} | {name} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pte", nargs="+", type=Path)
    parser.add_argument("--signature", choices=("rankdown", "hf"), default="rankdown")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--decode-method", action="store_true",
                        help=f"each new token through the one-token method ({DECODE_METHOD})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for pte in args.pte:
        try:
            check_pte_header(pte)
        except RankdownError as e:
            parser.error(str(e))
    parts = []
    for pte in args.pte:
        try:
            totals, counts, calls = profile(pte, args.steps, args.signature, args.threads, args.decode_method)
        except RankdownError as e:
            parser.error(str(e))
        parts.append(table(pte, totals, counts, calls, args.rows))
        print(parts[-1], "\n", flush=True)
    if args.out:
        write_text_atomic(args.out, "\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
