"""How fast XNNPACK runs rankdown's 4-bit linears at one token, by scale layout (decode's shape).

A stand-in for SmolLM2-135M's compressed decoder: 30 layers of G-like factor pairs (a q/k/v-sized
fused ``down`` 576 -> 320 and its ``up``, a gate/up-sized one 576 -> 672, an up 320 -> 1536, a
down_proj pair 1536 -> 256 -> 576), random codes, each linear a ``DecomposedQuantLinear`` as the
int4 export writes it, lowered to XNNPACK with int8 per-token inputs (8da4w). Layouts: 4-bit groups
of 32 and 64 (XNNPACK's blockwise qb4w kernels, bf16 scales), 4-bit per output channel (qc4w,
float32 scales: ``--group-size channel``) and 8-bit per channel (qc8w).

    python -m bench.int4_kernels build   # the .pte files, under bench/models/work/int4-kernels/ (minutes)
    python -m bench.int4_kernels time [ROUNDS]   # interleaved, one process; run on an idle machine

Writes ``bench/results/int4-kernels/kernels.md``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.host import cpu_description
from rankdown.export.et_int4 import DecomposedQuantLinear
from rankdown.int4_numerics import PER_CHANNEL, stored_scales

OUT = Path(__file__).parent / "results" / "int4-kernels"  # the table
PROGRAMS = Path(__file__).parent / "models" / "work" / "int4-kernels"  # the .pte files (git-ignored)
LAYOUTS = {"4-bit, groups of 32 (qb4w)": (32, 4), "4-bit, groups of 64 (qb4w)": (64, 4),
           "4-bit, per channel (qc4w)": (PER_CHANNEL, 4), "8-bit, per channel (qc8w)": (PER_CHANNEL, 8)}
HIDDEN, LAYERS, CALLS = 576, 30, 100


def _linear(rows: int, columns: int, group: int, bits: int) -> DecomposedQuantLinear:
    """Random codes and scales in the layout the int4 export writes: only the kernel is timed."""
    low, high = (-8, 7) if bits == 4 else (-128, 127)
    size = columns if group == PER_CHANNEL else group
    codes = torch.randint(low, high + 1, (rows, columns), dtype=torch.int8)
    scales = torch.rand(rows, columns // size) / 64 + 1e-3
    if group != PER_CHANNEL:
        scales = stored_scales(scales)  # XNNPACK's blockwise kernels hold bf16 scales
    return DecomposedQuantLinear(codes, scales, size, (low, high))


class _Stack(nn.Module):
    def __init__(self, group: int, bits: int):
        super().__init__()
        shapes = [(320, HIDDEN), (HIDDEN, 192), (672, HIDDEN), (1536, 320), (256, 1536), (HIDDEN, 256)]
        self.linears = nn.ModuleList(_linear(r, c, group, bits) for _ in range(LAYERS) for r, c in shapes)

    def forward(self, x):
        for i in range(0, len(self.linears), 6):
            qkv, o, gate_up, up, down, proj = self.linears[i:i + 6]
            attention = o(qkv(x)[..., :192])
            mlp = proj(down(up(gate_up(x)[..., :320])))
            x = x + attention + mlp
        return x


def _file(label: str) -> Path:
    return PROGRAMS / (label.split(" (")[0].replace(", ", "-").replace(" ", "-") + ".pte")


def build() -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    PROGRAMS.mkdir(parents=True, exist_ok=True)
    for label, (group, bits) in LAYOUTS.items():
        torch.manual_seed(0)
        program = torch.export.export(_Stack(group, bits).eval(), (torch.randn(1, 1, HIDDEN),))
        buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
        _file(label).write_bytes(buffer)
        print(f"built {label}: {len(buffer) / 2**20:.1f} MiB", flush=True)


def run(rounds: int) -> None:
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    methods = {label: runtime.load_program(_file(label)).load_method("forward") for label in LAYOUTS}
    x = torch.randn(1, 1, HIDDEN)
    times: dict[str, list[float]] = {label: [] for label in LAYOUTS}
    for _ in range(rounds + 1):  # the first round warms up
        for label, method in methods.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                method.execute([x])
            times[label].append((time.perf_counter() - start) * 1e3 / CALLS)
    base = statistics.median(times[next(iter(LAYOUTS))][1:])
    lines = [f"CPU: {cpu_description()}.", "", f"{LAYERS} layers of 6 linears at one token, {torch.get_num_threads()} torch threads, "
             f"{rounds} interleaved rounds of {CALLS} calls, median (min):", "",
             "| layout | ms per call | x groups of 32 | file MiB |", "|---|---|---|---|"]
    for label in LAYOUTS:
        median = statistics.median(times[label][1:])
        lines.append(f"| {label} | {median:.3f} ({min(times[label][1:]):.3f}) | {base / median:.2f} | "
                     f"{_file(label).stat().st_size / 2**20:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "kernels.md").write_text(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["build"]:
        build()
    else:
        run(int(sys.argv[2]) if len(sys.argv) > 2 else 15)
