"""Write a whole output folder or file, or nothing: a temporary sibling renamed into place.

A run killed at any byte (SIGKILL, power loss) leaves the final path absent or holding the
previous complete output: content is only ever written under a temporary name, fsynced,
then renamed; an existing output is swapped for the new one in one atomic exchange where
the kernel offers it. Temporaries a killed run left behind are removed by the next run
into the same output (which holds the output lock, so no live run owns them).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rankdown.errors import RankdownError

_RENAME_EXCHANGE = 2  # linux/fs.h
_OUT_OF_SPACE_TEXT = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")


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
    _check_parent(out)


def _check_parent(out: Path) -> None:
    """The folder ``out`` is renamed into must exist and be writable (the rename is what writes)."""
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise RankdownError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise RankdownError(f"{out}: parent folder {parent} is not writable")


def check_file_output(path: Path) -> None:
    """Refuse, before any work, a result file that could not be written: a folder, or a parent
    that is missing or not writable (an existing file is replaced)."""
    path = Path(path)
    if path.is_dir():
        raise RankdownError(f"{path}: is a folder; give a file name")
    _check_parent(path)


def check_report_folder(folder: Path) -> None:
    """Refuse, before any work, a report folder that could not be written (it is created with its
    parents where missing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RankdownError(f"{folder}: exists and is not a folder")
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RankdownError(f"{folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise RankdownError(f"{folder}: {'it' if existing == folder.resolve() else existing} is not writable")


def check_free_space(out: Path, needed_bytes: int, what: str) -> None:
    """Pre-flight: refuse before any work when the output's file system cannot hold the estimate."""
    parent = Path(out).resolve().parent
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise RankdownError(f"{out}: out of space: {what} needs about {needed_bytes / 2**20:.0f} MiB, "
                            f"{free / 2**20:.0f} MiB free on {parent}")


def is_out_of_space(error: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or as the text of a native library's own error type
    (safetensors, protobuf and flatbuffer writers do not raise OSError)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return any(marker in text for marker in _OUT_OF_SPACE_TEXT)


def _last_written(root: Path) -> Path | None:
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def out_of_space_error(out: Path, error: BaseException, tmp: Path | None = None) -> RankdownError:
    """'out of space writing X', X the file being written when the disk filled."""
    name = getattr(error, "filename", None)
    where = Path(name) if name else (_last_written(tmp) if tmp is not None and tmp.is_dir() else None)
    if where is not None and tmp is not None and where.is_relative_to(tmp):
        where = Path(out) / where.relative_to(tmp)
    return RankdownError(f"{out}: out of space writing {where or out}")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary folders a killed run left beside ``out``; where the run died between
    moving the previous output aside and renaming the new one in (file systems without an atomic
    exchange), put the previous output back first. Call only while holding the output lock."""
    out = Path(out)
    parent = out.resolve().parent
    stale = sorted(p for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*") for p in parent.glob(pattern)
                   if p.is_dir() and not p.is_symlink())
    for path in stale:
        previous = path / "previous"
        if path.name.startswith(f".{out.name}.old-") and previous.is_dir() and not out.exists():
            os.rename(previous, out)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only
    swap, which another thread could see half-done)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _grant_mode(fd: int, mask: int) -> None:
    """Give the open path the mode ``open``/``mkdir`` would have under ``mask``, keeping its setgid
    (inherited from the parent folder) and sticky bits; best effort: file systems without Unix modes
    (exFAT, vfat, some network mounts) refuse the change, and the output is still whole without it."""
    mode = os.fstat(fd).st_mode
    executable = stat.S_ISDIR(mode) or mode & 0o111
    with contextlib.suppress(OSError):
        os.fchmod(fd, (mode & 0o7000) | ((0o777 if executable else 0o666) & ~mask))


def _grant_umask(root: Path) -> None:
    """The modes a plain ``open``/``mkdir`` would have given: mkdtemp/mkstemp (and the safetensors
    writer) create owner-only paths, which left bundles unreadable to the app or server that ships them.
    Deepest first and the (owner-only) root last, so nobody else can reach the tree while it changes,
    and each path opened without following a link, so that no mode is set outside it."""
    mask = _umask()
    for path in [*sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True), root]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # a link (ELOOP), or what cannot be opened: left as it is
            continue
        try:
            _grant_mode(fd, mask)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # this file system or kernel cannot exchange
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it becomes ``out``.

    On any failure (or Ctrl-C) the temporary folder is removed and ``out`` is untouched.
    An existing ``out`` is replaced only with ``overwrite``, and only once the new one is complete.
    """
    out = Path(out)
    parent = out.resolve().parent
    # Named before it is made and made inside the cleanup's reach: a SIGTERM landing just after
    # mkdtemp's mkdir, before its name came back, left the empty folder behind.
    tmp = parent / f".{out.name}.tmp-{secrets.token_hex(8)}"
    ours = True  # until its mkdir fails: then it was not made here (or is someone else's)
    try:
        try:
            tmp.mkdir(mode=0o700)
        except OSError as e:
            ours = False
            raise RankdownError(f"{out}: cannot create a folder in {parent}: {e.strerror}") from None
        yield tmp
        _grant_umask(tmp)
        _fsync_tree(tmp)
        if out.exists():
            if not overwrite:
                raise RankdownError(f"{out}: already exists (pass --overwrite to replace it)")
            if _exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous output
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
                os.rename(out, old / "previous")
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(parent)
    except BaseException as e:
        if not ours:
            raise
        error = out_of_space_error(out, e, tmp) if is_out_of_space(e) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file via a temporary sibling and a rename, so a reader never sees half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        _grant_mode(fd, _umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_out_of_space(e):
            raise RankdownError(f"{path}: out of space writing {path.name}") from None
        raise
