"""Data-parallel compression on torch.distributed: calibration windows split over processes.

Each process (a *worker*) holds a contiguous share of the calibration windows, whole batches
of ``BATCH`` windows, so every statistics group is the one a single process would form. Per
layer, the workers sum their input statistics (all-reduce), factor the layer's units
round-robin, broadcast each unit's factors from the worker that built them, and push their
own windows through the compressed layer. The one-process run is the same code with a world
of one, where every collective is a no-op. Processes come from ``torchrun`` (its RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) or from ``launch``, which sets the same
variables on loopback and stops every worker when one fails (compress/launch.py). ``gloo`` on
the CPU, ``nccl`` on CUDA.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rankdown.compress.calibration import InputStats
from rankdown.compress.decomposition import Factors
from rankdown.compress.units import BATCH, Unit
from rankdown.compute_device import Device, resolve_device
from rankdown.errors import RankdownError

# The longest one worker waits for the others inside a collective: one layer's decompositions on
# the slowest worker (minutes at 8B width on a CPU). A dead worker is noticed sooner: its sockets
# close, and ``launch`` watches its process.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class Workers:
    """This process's place among the workers, and what it has sent to them."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    reduced_bytes: int = 0  # all-reduced by this worker so far
    broadcast_bytes: int = 0  # sent or received by broadcast so far

    @property
    def leader(self) -> bool:
        """Worker 0 writes the checkpoint and the progress messages."""
        return self.rank == 0

    def owner(self, position: int) -> int:
        """The worker that factors the ``position``-th unit of a layer's work list."""
        return position % self.world_size

    def local_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """This worker's share: whole batches, contiguous, in rank order (the one-process groups)."""
        batches = -(-windows.shape[0] // BATCH)
        if batches < self.world_size:
            raise RankdownError(f"--workers {self.world_size}: {windows.shape[0]} calibration windows make only "
                                f"{batches} batches of {BATCH}, fewer than the workers (give more --calib-tokens)")
        first, last = self.rank * batches // self.world_size, (self.rank + 1) * batches // self.world_size
        return windows[first * BATCH : last * BATCH]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the workers, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            self.reduced_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def max(self, value: float) -> float:
        """The largest ``value`` over the workers."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        self.reduced_bytes += tensor.element_size()
        return float(tensor.item())

    def sum_stats(self, stats: dict[str, InputStats]) -> None:
        """Every sum of every site's statistics added up over the workers, before any is read."""
        for site in sorted(stats):
            s = stats[site]
            for tensor in (s.xxt, s.x_sum, s.abs_sum, s.pooled_cov_sum, s.cross_sum):
                if tensor is not None:
                    self.sum_(tensor)
            counts = self.sum_(torch.tensor([s.count, s.groups], dtype=torch.int64, device=self.device))
            s.count, s.groups = int(counts[0]), int(counts[1])

    def broadcast_(self, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        """``tensor`` (of a shape every worker knows) as ``owner`` holds it, in place."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=owner)
            self.broadcast_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """Whether this process is one of several started by torchrun or by ``launch``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size(requested: int) -> int:
    """The number of workers a run will have: torchrun's, or ``--workers`` otherwise."""
    if not launched():
        return requested
    started = int(os.environ["WORLD_SIZE"])
    if requested not in (1, started):
        raise RankdownError(f"--workers {requested}: this run was started with {started} processes; "
                            "leave --workers at 1 under torchrun")
    return started


def join(device: Device) -> Workers:
    """This process's Workers: one process alone, or a member of the group its environment names."""
    if not launched():
        return Workers(device=resolve_device(device))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = resolve_device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    # A SIGTERM from the launcher unwinds like an error, so that worker 0's temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    dist.init_process_group("nccl" if where.type == "cuda" else "gloo", rank=rank, world_size=size,
                            timeout=PROCESS_GROUP_TIMEOUT)
    return Workers(rank, size, where)


def share_factors(workers: Workers, factors: Factors | None, unit: Unit, owner: int, dtype: torch.dtype) -> Factors:
    """A unit's factors as ``owner`` built them (``factors``, None elsewhere), on every worker: first a
    header (the rank, which members have a bias), then each tensor, all of shapes known from it."""
    if workers.world_size == 1:
        assert factors is not None, "one worker factors every unit"
        return factors
    header = torch.zeros(1 + len(unit.members), dtype=torch.int64, device=workers.device)
    if factors is not None:
        header[0] = factors[0].shape[0]
        header[1:] = torch.tensor([bias is not None for bias in factors[2]], dtype=torch.int64)
    workers.broadcast_(header, owner)
    rank, has_bias = int(header[0]), [bool(flag) for flag in header[1:]]
    if factors is None:
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=workers.device)

        factors = (empty(rank, unit.in_features), [empty(m, rank) for m in unit.out_features],
                   [empty(m) if bias else None for m, bias in zip(unit.out_features, has_bias)])
    a, bs, biases = (factors[0].contiguous(), [b.contiguous() for b in factors[1]],
                     [None if b is None else b.contiguous() for b in factors[2]])
    for tensor in (a, *bs, *(b for b in biases if b is not None)):
        workers.broadcast_(tensor, owner)
    return a, bs, biases


def leads_output() -> bool:
    """Whether this process prints a command's result: not one of torchrun's workers 1..N-1."""
    return int(os.environ.get("RANK", "0")) == 0


def share_vector(workers: Workers, vector: torch.Tensor | None, owner: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor as ``owner`` holds it (``vector``, None elsewhere), on every worker: its length first."""
    if workers.world_size == 1:
        assert vector is not None, "one worker computes every vector"
        return vector
    length = torch.tensor([0 if vector is None else vector.numel()], dtype=torch.int64, device=workers.device)
    workers.broadcast_(length, owner)
    shared = (torch.empty(int(length), dtype=dtype, device=workers.device) if vector is None
              else vector.to(device=workers.device, dtype=dtype).contiguous())
    return workers.broadcast_(shared, owner)
