"""Memory: a pre-flight estimate against the limits a run is under, and peak RSS for reports.

A stage that would run out of memory half-way fails at the start instead, with "needs about
X GB", when the process has a hard limit: an address-space or data ulimit (RLIMIT_AS,
RLIMIT_DATA) or a cgroup v2 ``memory.max``. Free memory on a shared machine is not a limit
and is not checked: it changes while the run goes.
"""

from __future__ import annotations

import resource
from pathlib import Path

from rankdown.errors import RankdownError

_GB = 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB.

    Linux's VmHWM, where there is one: ``ru_maxrss`` survives exec, so a process started by a
    big parent reports the parent's resident size at the fork as its own peak (the compress
    benchmark, whose parent had built a 1B-shape model, read 2.9 GB where VmHWM read 1.7 GB).
    """
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory now, in MB (VmRSS; the peak where /proc is unavailable)."""
    now = _status_bytes("VmRSS")
    return now / 2**20 if now is not None else peak_rss_mb()


def _cgroup_room() -> tuple[int, str] | None:
    try:
        line = next(entry for entry in Path("/proc/self/cgroup").read_text().splitlines() if entry.startswith("0::"))
        folder = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((folder / "memory.current").read_text())
        return int(limit) - used, f"the cgroup memory limit ({int(limit) / _GB:.2f} GB)"
    except (OSError, StopIteration, ValueError):
        return None


def memory_room() -> tuple[int, str] | None:
    """Bytes this process may still allocate under its tightest hard limit, and which limit; None if unlimited."""
    rooms = []
    for limit_id, status, what in ((resource.RLIMIT_AS, "VmSize", "ulimit -v"), (resource.RLIMIT_DATA, "VmData", "ulimit -d")):
        soft, _ = resource.getrlimit(limit_id)
        used = _status_bytes(status)
        if soft != resource.RLIM_INFINITY and used is not None:
            rooms.append((soft - used, f"the {what} limit ({soft / _GB:.2f} GB, {used / _GB:.2f} GB in use)"))
    cgroup = _cgroup_room()
    if cgroup is not None:
        rooms.append(cgroup)
    return min(rooms, default=None)


def require_memory(needed_bytes: int, stage: str, where: object) -> None:
    """Refuse to start ``stage`` when its estimate does not fit under the process's memory limit."""
    room = memory_room()
    if room is not None and needed_bytes > room[0]:
        raise RankdownError(f"{where}: {stage} needs about {needed_bytes / _GB:.2f} GB of memory; "
                            f"{room[1]} leaves {max(room[0], 0) / _GB:.2f} GB")


def require_shared_memory(needed_bytes: int, processes: int, stage: str, where: object) -> None:
    """Refuse to start ``processes`` workers of ``stage`` on this machine when their estimates together
    do not fit under the cgroup limit they share (a ulimit binds each process alone: each worker
    checks that one itself)."""
    room = _cgroup_room()
    total = processes * needed_bytes
    if room is not None and total > room[0]:
        raise RankdownError(f"{where}: {stage} with {processes} workers on this machine needs about "
                            f"{total / _GB:.2f} GB of memory together ({needed_bytes / _GB:.2f} GB each); "
                            f"{room[1]} leaves {max(room[0], 0) / _GB:.2f} GB (fewer --workers use less)")


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure, as Python or torch's CPU allocator reports it."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "DefaultCPUAllocator" in str(error)))


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Tensors under glibc's mmap threshold live on the heap, and the threshold rises each time a
    large tensor is freed, so a layer-by-layer pass would otherwise keep each layer's freed
    working memory resident (about 160 MB a layer at Llama-3.2-1B shape, measured).
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library already loaded in this process
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
    trim(0)
