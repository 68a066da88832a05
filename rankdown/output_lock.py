"""One writer per output: a lock file next to the output, held for the whole run.

Two runs into one folder would otherwise both build a temporary folder and race to rename
it; the lock makes the second fail at once instead of minutes later. ``flock`` locks die
with their process, so a run killed with SIGKILL leaves no stale lock, only a file that the
next run takes over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from rankdown.errors import RankdownError


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.resolve().parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``out``; a second holder fails fast with a one-line error."""
    path = lock_path(out)
    if not path.parent.is_dir():
        raise RankdownError(f"{out}: parent folder {path.parent} does not exist")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RankdownError(f"{out}: cannot create lock file {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RankdownError(f"{out}: another rankdown run is writing it (lock {path} is held)") from None
            raise
        # The previous holder may have unlinked the file between our open and flock: then we
        # hold a lock on a file nobody else can see, so start over on the current one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def exclusive_output(out: Path, doing: str) -> Iterator[None]:
    """How a stage holds its output for a run: locked, last run's leftovers cleared, and running
    out of memory reported as one line (``doing``: "compressing", "exporting")."""
    from rankdown.atomic import remove_stale_temporaries
    from rankdown.memory import is_out_of_memory, peak_rss_mb

    with output_lock(out):
        remove_stale_temporaries(out)
        try:
            yield
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            raise RankdownError(f"{out}: ran out of memory while {doing} (peak RSS {peak_rss_mb():.0f} MB)") from None
