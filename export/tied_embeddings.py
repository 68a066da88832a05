"""Tied embeddings (one V x H table for the token lookup and the output head) stored once.

ONNX: optimum's exporter (with ``accelerate``) rewrites the head to read the Gather's
initializer through a Transpose. ExecuTorch: XNNPACK packs a linear's weight into its own
blob (keyed by sha256 in the program's named data), while the token lookup stays on CPU
kernels with its own constant, so a tied table is written twice. The runtime resolves
program constants only from the constant segment or an external .ptd, never from the
named data, so the one way to a single copy inside one .pte is to give XNNPACK the head's
weight at run time (``force_non_static_weights_for_f32_linear``, XNNPACK's own option for
weights shared outside a partition) for that one linear. It costs decode time: XNNPACK
repacks the table on every call (measured in the module's commit message and the report).

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
    """The fp32 embedding table when the model's head reads it, else None."""
    embedding = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight is not embedding:
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
    """How many times ``table`` is stored in ``files``, as is or transposed, in fp32."""
    needles = [np.ascontiguousarray(table, dtype="<f4").tobytes(),
               np.ascontiguousarray(table.T, dtype="<f4").tobytes()]
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


def shared_weight_partitioners(quantize_int8: bool) -> list:
    """XNNPACK partitioners that claim, before the generic one, each fp32 linear whose weight
    another op also reads (a tied head), taking that weight as a run-time input so the program
    keeps one constant for both. Empty for int8: the head's weight becomes its own int8 tensor."""
    if quantize_int8:
        return []
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class SharedWeightLinearConfig(LinearConfig):
        def check_constraints(self, node, ep) -> bool:
            weight = node.args[1]
            shared = any(user.target != node.target for user in weight.users)
            return shared and super().check_constraints(node, ep)

    return [XnnpackPartitioner(configs=[SharedWeightLinearConfig], force_non_static_weights_for_f32_linear=True)]
