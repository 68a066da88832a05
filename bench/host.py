"""The CPU a benchmark ran on, for its table: XNNPACK and onnxruntime pick kernels by ISA extension,
so a ranking measured on one CPU need not hold on another (the int4 layouts: per channel 1.77x
groups of 32 on a Zen 3 with AVX2 only, 1.20x on a Zen 4 with AVX512-VNNI)."""

from __future__ import annotations

from pathlib import Path

ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "asimddp", "i8mm", "sve")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``AMD EPYC (family 25, model 17; avx2, avx512f, avx512_vnni, avx512_bf16)``; "unknown CPU" off Linux."""
    if not cpuinfo.is_file():
        return "unknown CPU"
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in cpuinfo.read_text().splitlines())}
    flags = set((fields.get("flags") or fields.get("Features", "")).split())  # x86 / arm64
    name = fields.get("model name") or fields.get("CPU part") or "unknown CPU"
    isa = [f for f in ISA if f in flags]
    return (f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}; "
            f"{', '.join(isa) or 'none of ' + ', '.join(ISA[:2])})")
