"""Start N worker processes on this machine as torchrun would, and watch them.

Each worker gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT on loopback) and runs one function; compress/distributed.py joins the group from
that environment, so a launched run and a torchrun run are the same code. When a worker
fails, the others are stopped at once and its error is raised here: the one line of a user
mistake, or a worker killed by a signal. This module imports no model library, so that a
worker quiets their logging before they load.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rankdown.errors import RankdownError
from rankdown.library_logs import quiet_library_logs

STOP_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when the other workers are stopped


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, size: int, port: int, threads: int, errors: Path, job: bytes) -> None:
    """One launched worker: torchrun's environment, then the pickled ``(target, args)``, unpickled
    once the libraries' import-time logging is quieted; a failure is left in ``errors`` for the
    launcher to report (one line for a user mistake, the traceback for a bug)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    quiet_library_logs()
    try:
        target, args = pickle.loads(job)
        target(*args)
    except RankdownError as e:
        (errors / f"{rank}.error").write_text(str(e))
        sys.exit(e.exit_code)
    except BaseException:  # noqa: BLE001 - a peer's failure surfaces here too; the launcher picks the first
        (errors / f"{rank}.bug").write_text(traceback.format_exc())
        sys.exit(1)


def _stop(processes: list) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(STOP_GRACE_SECONDS)
        if p.is_alive():
            p.kill()
            p.join()


def _failure(rank: int, size: int, exitcode: int, errors: Path) -> BaseException:
    if (errors / f"{rank}.error").is_file():
        return RankdownError((errors / f"{rank}.error").read_text())
    if (errors / f"{rank}.bug").is_file():
        return RuntimeError(f"worker {rank} of {size} failed:\n{(errors / f'{rank}.bug').read_text()}")
    how = f"was killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exited with status {exitcode}"
    return RankdownError(f"worker {rank} of {size} {how}; the other workers were stopped and nothing was written")


def worker_threads(size: int) -> int:
    """The threads each of ``size`` workers gets: the cores (or the caller's thread budget) shared
    out, since N workers each spinning on every core would slow all of them far below one process
    (OpenMP waits by spinning)."""
    budget = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    return max(1, budget // size)


def launch(target: Callable[..., Any], args: tuple, size: int) -> None:
    """Run ``target(*args)`` in ``size`` new processes on loopback, as torchrun would start them, and
    wait for all; when one fails, stop the others and raise its error."""
    port = _free_port()
    threads = worker_threads(size)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rankdown-workers-") as folder:
        errors = Path(folder)
        job = pickle.dumps((target, args))
        processes = [context.Process(target=_worker, args=(rank, size, port, threads, errors, job))
                     for rank in range(size)]
        try:
            for p in processes:
                p.start()
            waiting: dict[Any, int] = {p.sentinel: rank for rank, p in enumerate(processes)}
            while waiting:
                ended = [waiting.pop(s) for s in multiprocessing.connection.wait(list(waiting))]
                for rank in ended:
                    processes[rank].join()
                failed = [r for r in ended if processes[r].exitcode != 0]
                if failed:
                    # The first to fail is the cause; a worker killed by a signal comes before the peers
                    # whose collectives broke because of it.
                    first = min(failed, key=lambda r: (processes[r].exitcode or 0) >= 0)
                    _stop(processes)
                    exitcode = processes[first].exitcode
                    raise _failure(first, size, exitcode if exitcode is not None else 1, errors)
        finally:
            with contextlib.suppress(Exception):
                _stop(processes)
