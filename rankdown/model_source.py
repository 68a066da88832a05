"""MODEL as a user has it: a checkpoint folder, a GGUF file, or a hub id in the local cache.

Every command that takes MODEL turns it into a checkpoint folder here, before any real work:
- a folder is itself;
- a GGUF file (known by its magic bytes) is imported once into rankdown's cache, keyed by the
  file's sha256, and later commands reuse that folder;
- ``org/name`` that is no local path is looked up in the Hugging Face cache, offline: nothing
  is ever downloaded; a snapshot of a GGUF repository (no config.json, one .gguf) is imported
  as a GGUF file is. The snapshot's symlinks into the cache's blobs are turned into hard
  links in a plain folder of rankdown's cache, so the checkpoint checks (no links out of a
  model folder) hold unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from rankdown.errors import RankdownError
from rankdown.gguf_check import is_gguf

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def cache_root() -> Path:
    return Path(os.environ.get("RANKDOWN_CACHE") or Path.home() / ".cache" / "rankdown")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def resolve_model(given: str | Path, say=_say) -> Path:
    """The checkpoint folder that ``given`` names (see the module docstring)."""
    path = Path(given)
    if path.is_dir():
        return path
    if path.is_file():
        if not is_gguf(path):
            raise RankdownError(f"{path}: not a model folder or a GGUF file")
        return imported_gguf(path, say)
    if HUB_ID.fullmatch(str(given)) and not str(given).startswith("."):
        folder = hub_snapshot(str(given), say)
        if (folder / "config.json").exists():
            return folder
        ggufs = [p for p in sorted(folder.iterdir()) if is_gguf(p)]
        if len(ggufs) > 1:  # a GGUF repository holds one file per quantization: the user picks
            raise RankdownError(f"{given}: the cached snapshot holds {len(ggufs)} GGUF files; give one as MODEL, "
                                f"e.g. {ggufs[0]}")
        return imported_gguf(ggufs[0], say) if ggufs else folder
    if not path.exists() and not path.is_symlink():
        # Said here, before the command imports torch and transformers (seconds for a typo).
        raise RankdownError(f"{path}: no such folder")
    return path  # a dangling link or a special file: the checkpoint loader names what is wrong


def imported_gguf(source: Path, say=_say) -> Path:
    """The folder ``rankdown import`` made of this exact file (by sha256), made now if absent."""
    from rankdown.gguf_check import check_gguf
    from rankdown.gguf_import import ImportRecord, import_gguf, sha256_of

    check_gguf(source)  # a bad file is refused before it is hashed
    digest = sha256_of(source)
    folder = cache_root() / "imported" / digest
    if folder.is_dir():
        try:
            if ImportRecord.read(folder).sha256 == digest:
                say(f"{source}: using its import made earlier, {folder}")
                return folder
        except RankdownError:
            pass  # an unreadable record: import again over it
    folder.parent.mkdir(parents=True, exist_ok=True)
    say(f"{source}: importing once into {folder} (`rankdown import` chooses the folder)")
    import_gguf(source, folder, overwrite=folder.exists(), progress=say, sha256=digest)
    return folder


def _hub_cache() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now (the library reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str, say=_say) -> Path:
    """The cached snapshot of ``repo_id`` as a plain folder; never a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = _hub_cache()
    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise RankdownError(f"{repo_id}: no such folder or file, and not in the local Hugging Face cache "
                            f"({cache}): fetch it with `huggingface-cli download {repo_id}` on a machine "
                            "with internet and copy the cache here (HF_HOME or HF_HUB_CACHE)") from None
    repo_root = cache / f"models--{repo_id.replace('/', '--')}"
    if snapshot.resolve().parent != (repo_root / "snapshots").resolve():
        raise RankdownError(f"{repo_root / 'refs'}: names a snapshot outside {repo_root / 'snapshots'}")
    return _plain_copy(snapshot, repo_root, repo_id, say)


def _plain_copy(snapshot: Path, repo_root: Path, repo_id: str, say) -> Path:
    """The snapshot's top-level files as a folder without links: hard links to the blobs (no
    space), copies across file systems. A link that leaves the repository's blobs is refused."""
    from rankdown.atomic import atomic_folder

    blobs = (repo_root / "blobs").resolve()
    folder = cache_root() / "hub" / repo_root.name / snapshot.name
    files = sorted(p for p in snapshot.iterdir() if p.is_file())
    if folder.is_dir() and sorted(p.name for p in folder.iterdir()) == [p.name for p in files]:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    say(f"{repo_id}: using the cached snapshot {snapshot.name[:12]} from {snapshot}")
    with atomic_folder(folder, overwrite=True) as tmp:
        for src in files:
            target = src.resolve()
            if src.is_symlink() and not target.is_relative_to(blobs):
                raise RankdownError(f"{src}: links outside the cache's blobs ({target})")
            try:
                os.link(target, tmp / src.name)
            except OSError:
                shutil.copyfile(target, tmp / src.name)
    return folder
