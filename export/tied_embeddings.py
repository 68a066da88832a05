"""Tied embeddings (one V x H table for the token lookup and the output head) stored once.

ONNX: optimum's exporter (with ``accelerate``) rewrites the head to read the Gather's
initializer through a Transpose. ExecuTorch: XNNPACK packs a linear's weight into its own
blob while the token lookup stays on CPU kernels with its own constant, so inside one .pte a
tied table is written twice. ExecuTorch's program-data separation stores it once: the lookup's
constant (``external_constants``) and XNNPACK's copy of the head weight (named data with an
external tag) both go to one .ptd beside the .pte, and the NamedDataStore keeps one buffer per
distinct content, so the two names share one segment. XNNPACK still packs the head once, at
load; giving it the weight at run time instead (``force_non_static_weights_for_f32_linear``)
also stored the table once but repacked it on every call, doubling decode time.

Whatever the exporter did, ``table_copies`` counts the table's bytes in the written files,
as stored or transposed, and the export fails if a tied table was stored more than once.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from rankdown.errors import RankdownError

_PROBE = 64  # bytes searched for before a whole candidate table is compared


def tied_table(model) -> np.ndarray | None:
    """The fp32 embedding table when the model's head reads it (a factored tied head's V x r
    table, which its ``up`` reads), else None."""
    from rankdown.factor_record import factored_table

    factored = factored_table(model)
    if factored is not None:
        return factored.table.weight.detach().float().numpy()
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if not hasattr(head, "weight") or head.weight is not embedding:
        return None
    return embedding.detach().float().numpy()


def _probe_offset(needle: bytes) -> int:
    """A window of the table varied enough that a hit is rare outside the table itself
    (a zero row, e.g. a padding token's, would match every run of zeros)."""
    for start in range(0, len(needle) - _PROBE + 1, _PROBE):
        if len(set(needle[start:start + _PROBE])) >= 16:
            return start
    return 0


def _count_in_file(path: Path, needle: bytes) -> int:
    if path.stat().st_size < len(needle):
        return 0
    offset = _probe_offset(needle)
    probe = needle[offset:offset + _PROBE]
    found, at = 0, 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        while (hit := data.find(probe, at)) != -1:
            start = hit - offset
            if start >= 0 and data[start:start + len(needle)] == needle:
                found += 1
                at = start + len(needle)
            else:
                at = hit + 1
    return found


def table_copies(files: list[Path], table: np.ndarray) -> int:
    """How many times ``table`` is stored in ``files``, as is or transposed: in fp32 for a float
    table, as its own integers for a quantized one."""
    dtype = "<f4" if table.dtype.kind == "f" else table.dtype
    needles = [np.ascontiguousarray(table, dtype=dtype).tobytes(),
               np.ascontiguousarray(table.T, dtype=dtype).tobytes()]
    return sum(_count_in_file(Path(p), needle) for p in files for needle in needles)


def check_stored_once(files: list[Path], table: np.ndarray | None, where: Path) -> int | None:
    """The number of copies of a tied table in one format's files (None for an untied model);
    more than one is an export error."""
    if table is None:
        return None
    copies = table_copies(files, table)
    if copies > 1:
        raise RankdownError(f"{where}: the tied embedding table ({table.shape[0]} x {table.shape[1]}) is stored "
                            f"{copies} times; it must be stored once")
    return copies


_TAG_KEY = "delegate_constant_tag"  # the key XNNPACK's node visitor reads (executorch 1.5)


def tag_tied_table(program, data_tag: str) -> bool:
    """Mark the parameter that both a token lookup and a linear read (a tied table) for the
    program data file ``data_tag``: XNNPACK's node visitor reads ``delegate_constant_tag`` from
    the weight's node, and ``external_table_tag`` moves the lookup's constant. Returns whether
    a tied table was found.

    The same for an int4 export's 8-bit tied table (export/et_int4.py ``ByteEmbedding.from_head``):
    the int8 parameter read by the ``embedding_byte`` lookup and by the head's per-channel dequantize,
    which is the node XNNPACK's visitor reads the tag from for a quantized weight."""
    import torch

    params = program.graph_signature.inputs_to_parameters
    decomposed = getattr(torch.ops, "quantized_decomposed", None)
    found = False
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in params:
            continue
        targets = {user.target for user in node.users}
        if {torch.ops.aten.embedding.default, torch.ops.aten.linear.default} <= targets:
            node.meta.setdefault("custom", {})[_TAG_KEY] = data_tag
            found = True
        elif decomposed is not None and {decomposed.embedding_byte.default,
                                         decomposed.dequantize_per_channel.default} <= targets:
            node.meta.setdefault("custom", {})[_TAG_KEY] = data_tag
            for user in node.users:
                if user.target == decomposed.dequantize_per_channel.default:
                    user.meta.setdefault("custom", {})[_TAG_KEY] = data_tag
            found = True
    return found


def external_table_tag(node) -> str | None:
    """``ExecutorchBackendConfig.external_constants``: the program data file for a constant the
    runtime kernels read, set only on the tied table by ``tag_tied_table``."""
    return (node.meta.get("custom") or {}).get(_TAG_KEY)
