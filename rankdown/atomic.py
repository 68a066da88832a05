"""Write a whole output folder or file, or nothing: a temporary sibling renamed into place."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rankdown.errors import RankdownError


def check_output_path(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output that is, holds, or sits inside an input, or exists without ``overwrite``."""
    target = out.resolve()
    for given in inputs:
        src = given.resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            raise RankdownError(f"{out}: output must not be, contain, or lie inside the input {given}")
    if out.exists() and not overwrite:
        raise RankdownError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise RankdownError(f"{out}: exists and is not a folder")
    parent = target.parent
    if not parent.is_dir():
        raise RankdownError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise RankdownError(f"{out}: parent folder {parent} is not writable")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it becomes ``out``.

    On any failure (or Ctrl-C) the temporary folder is removed and ``out`` is untouched.
    An existing ``out`` is replaced only with ``overwrite``, and only once the new one is complete.
    """
    out = Path(out)
    parent = out.resolve().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise RankdownError(f"{out}: cannot create a folder in {parent}: {e.strerror}") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            if not overwrite:
                raise RankdownError(f"{out}: already exists (pass --overwrite to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / "previous")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise RankdownError(f"{out}: out of space writing {e.filename or out}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file via a temporary sibling and a rename, so a reader never sees half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
