"""Validate a safetensors file's header before any library maps it.

The safetensors library rejects most malformed files, but with messages that do not name
the file, and only after it is asked to load. This check reads the 8-byte length and the
JSON header alone (bounded memory), and proves that every tensor's bytes lie inside the
file, match its dtype and shape, and that the tensors tile the data region exactly.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from rankdown.errors import RankdownError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, after checking every offset against the file."""
    def bad(problem: str) -> RankdownError:
        return RankdownError(f"{path}: not a valid safetensors file: {problem}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise bad(f"file is {size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES:
                raise bad(f"header claims {header_len} bytes (limit {MAX_HEADER_BYTES})")
            if 8 + header_len > size:
                raise bad(f"header claims {header_len} bytes but the file has {size}")
            raw = f.read(header_len)
    except OSError as e:
        raise RankdownError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise bad("header is not UTF-8") from None
    except ValueError as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_len = size - 8 - header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} has a malformed entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise bad(f"tensor {name!r} has invalid data_offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if not 0 <= begin <= end <= data_len:
            raise bad(f"tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_len})")
        if end - begin != nbytes:
            raise bad(f"tensor {name!r} needs {nbytes} bytes for {dtype}{shape} but spans {end - begin}")
        entries[name] = TensorEntry(name, dtype, tuple(shape), begin, end)
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = "overlaps another tensor" if entry.begin < position else "leaves a gap before it"
            raise bad(f"tensor {entry.name!r} {what}")
        position = entry.end
    if position != data_len:
        raise bad(f"{data_len - position} trailing bytes after the last tensor")
    return entries
