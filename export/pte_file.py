"""A .pte's fixed header, checked on the host before an ExecuTorch runtime is asked to load it.

The runtime verifies the whole flatbuffer (``Verification.InternalConsistency``), in a child
process; this check only turns the common damage (another file type, a newer schema, a
truncated download) into a one-line error that names the file, and is cheap enough to run
on every bundle. Layout: u32 root offset, the 4-byte schema identifier, then the extended
header ``eh00``: u32 length, u64 program size, u64 segment base offset, u64 segment size.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from rankdown.errors import RankdownError

SCHEMA_IDENTIFIER = b"ET12"  # executorch/schema/program.fbs: file_identifier of the installed runtime
_EXTENDED_MAGIC = b"eh00"
_HEAD_BYTES = 64


def check_pte_header(path: Path) -> None:
    """Refuse a file that is not an ExecuTorch program this runtime reads, or is cut short."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        raise RankdownError(f"{path}: cannot read: {e.strerror}") from None
    if len(head) < 8:
        raise RankdownError(f"{path}: not an ExecuTorch program: {size} bytes")
    identifier = head[4:8]
    if not re.fullmatch(rb"ET\d\d", identifier):
        raise RankdownError(f"{path}: not an ExecuTorch program (schema identifier {identifier!r}, "
                            f"expected {SCHEMA_IDENTIFIER.decode()})")
    if identifier != SCHEMA_IDENTIFIER:
        raise RankdownError(f"{path}: ExecuTorch program schema {identifier.decode()}; the installed runtime "
                            f"reads {SCHEMA_IDENTIFIER.decode()} (re-export it with this executorch)")
    (root,) = struct.unpack("<I", head[0:4])
    if not 8 <= root < size:
        raise RankdownError(f"{path}: ExecuTorch program root offset {root} lies outside its {size} bytes")
    if head[8:12] != _EXTENDED_MAGIC or len(head) < 32:
        return  # the extended header is optional in the format
    length, program_size, segment_base = struct.unpack("<IQQ", head[12:32])
    segment_size = struct.unpack("<Q", head[32:40])[0] if length > 24 and len(head) >= 40 else 0
    if program_size > size:
        raise RankdownError(f"{path}: truncated: the program needs {program_size} bytes, the file has {size}")
    if segment_base and segment_base + segment_size > size:
        raise RankdownError(f"{path}: truncated: weight segments end at byte {segment_base + segment_size}, "
                            f"the file has {size}")
