"""Where a stage computes: ``--device auto|cpu|cuda`` for compress and eval.

``auto`` is CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is a
one-line error before any work. Weights are always read and written from the CPU.
"""

from __future__ import annotations

import os
from enum import Enum

import torch

from rankdown.errors import RankdownError


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def resolve_device(device: Device, local_rank: int = 0) -> torch.device:
    """The torch device for ``device``; with CUDA, the process's own GPU (``local_rank``)."""
    if device is Device.AUTO:
        device = Device.CUDA if torch.cuda.is_available() else Device.CPU
    if device is Device.CPU:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RankdownError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RankdownError(f"--device cuda: this process is local rank {local_rank} but there are {count} GPUs")
    return torch.device("cuda", local_rank)


def usable_cpus() -> int:
    """CPUs this process may be scheduled on (a container's or taskset's share, where the OS says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads_here(flag: str, threads: int | None) -> None:
    """Refuse more threads than this process's CPUs for work that runs here: they only contend
    (eval at 9999 threads took 80x as long on 2 CPUs), and timings taken that way mean nothing."""
    if threads is not None and threads > (cpus := usable_cpus()):
        raise RankdownError(f"{flag} {threads}: this process may run on {cpus} CPUs")


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively here: about 4.5x float32's rate on a 2-core
    AVX512-BF16 CPU (a 1024 x 576 by 576 x 1536 product: 902 against 193 GFLOP/s), where a CPU
    without it would emulate them."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
