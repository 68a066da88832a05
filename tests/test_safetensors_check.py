import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from rankdown.errors import RankdownError
from rankdown.safetensors_check import read_header


def _raw(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.fixture()
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4)}, path)
    return path


def test_valid_file_is_read(good):
    entries = read_header(good)
    assert entries["a"].shape == (2, 3) and entries["b"].dtype == "F32"


CASES = {
    "zero bytes": b"",
    "header longer than file": struct.pack("<Q", 1000) + b"{}",
    "huge header": struct.pack("<Q", 2**40) + b"{}",
    "non utf8 header": struct.pack("<Q", 2) + b"\xff\xfe",
    "non json header": struct.pack("<Q", 3) + b"abc",
    "overlapping": _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
    "gap": _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
    "trailing bytes": _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(9)),
    "shape overflow": _raw({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, bytes(4)),
    "dtype size mismatch": _raw({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "beyond the end": _raw({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
    "negative shape": _raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
    "unknown dtype": _raw({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_files_are_clean_errors(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(CASES[case])
    with pytest.raises(RankdownError, match="bad.safetensors: not a valid safetensors file"):
        read_header(path)


def test_duplicate_keys_are_refused(tmp_path):
    blob = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4))
    with pytest.raises(RankdownError, match="duplicate key"):
        read_header(path)


def test_truncated_file_is_refused(good, tmp_path):
    data = good.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2 + 40])
    with pytest.raises(RankdownError, match=r"half\.safetensors: not a valid safetensors file: tensor .* lies outside the file"):
        read_header(path)
