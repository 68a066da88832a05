"""An ONNX file and its external data, checked by our own code before onnx or onnxruntime
opens the data: every external-data location must be a plain relative path to a regular file
inside the bundle, and every offset and length must lie inside that file.

A tampered bundle could otherwise point a tensor at ``../../etc/passwd`` or an absolute
path, and the runtime would read it into the model's weights. The model protobuf itself is
parsed without its external data, so nothing outside the .onnx file is read here.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from rankdown.errors import RankdownError

PROTOBUF_LIMIT = 2**31 - 1  # a single serialized protobuf cannot exceed 2 GiB
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
                  17: 1, 18: 1, 19: 1, 20: 1}  # onnx.TensorProto.DataType -> bytes per element


def _load_proto(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file() or path.is_symlink():
        raise RankdownError(f"{path}: missing, or not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise RankdownError(f"{path}: empty ONNX file")
    if size > PROTOBUF_LIMIT:
        raise RankdownError(f"{path}: {size} bytes; an ONNX file over 2 GiB must keep its weights as external data")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise RankdownError(f"{path}: not a valid ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not model.graph.node:
        raise RankdownError(f"{path}: the ONNX graph has no nodes")
    return model


def _graph_tensors(graph):
    """Every TensorProto a graph holds: initializers, sparse ones, and node attributes, recursively."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attributes):
    for attribute in attributes:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for sub in attribute.graphs:
            yield from _graph_tensors(sub)


def _all_tensors(model):
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node.attribute)


def _nonnegative(value: str | None, what: str, where: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise RankdownError(f"{where}: external data {what} {value!r} is not a non-negative integer")
    return int(value)


def external_data_files(model_path: Path, root: Path) -> list[Path]:
    """The external-data files ``model_path`` reads, each proven to lie inside ``root``, with every
    tensor's byte range inside its file. Raises a one-line RankdownError naming the tensor otherwise."""
    import onnx

    model_path, root = Path(model_path), Path(root).resolve()
    model = _load_proto(model_path)
    base = model_path.parent
    files: dict[Path, int] = {}
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = f"{model_path}: tensor {tensor.name!r}"
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        parts = Path(location).parts
        if (not location or "\x00" in location or "\\" in location or Path(location).is_absolute()
                or ".." in parts):
            raise RankdownError(f"{where}: external data location {location!r} points outside the bundle")
        path = base / location
        # No link anywhere on the way: a link inside the bundle may point anywhere.
        step = base
        for part in parts:
            step = step / part
            if step.is_symlink():
                raise RankdownError(f"{where}: external data location {location!r} is a link")
        if not path.resolve().is_relative_to(root):
            raise RankdownError(f"{where}: external data location {location!r} points outside the bundle")
        if not path.is_file():
            raise RankdownError(f"{where}: external data file {location!r} is missing")
        size = files.setdefault(path, path.stat().st_size)
        offset = _nonnegative(info.get("offset"), "offset", where) or 0
        length = _nonnegative(info.get("length"), "length", where)
        element = _ELEMENT_BYTES.get(tensor.data_type)
        needed = None if element is None else math.prod(tensor.dims) * element
        if length is None:
            length = needed if needed is not None else size - offset
        elif needed is not None and length != needed:
            raise RankdownError(f"{where}: external data length {length} but its shape {list(tensor.dims)} needs {needed}")
        if offset + length > size:
            raise RankdownError(f"{where}: external data bytes {offset}..{offset + length} lie beyond the end of "
                                f"{location!r} ({size} bytes)")
    return sorted(files)


def register_onnxruntime_schemas() -> None:
    """Teach onnx's checker the one onnxruntime op that lives in the default domain:
    ``SimplifiedLayerNormalization`` (RMSNorm, registered by onnxruntime under ai.onnx since
    version 1, and written by onnxruntime-genai's model builder for the first RMSNorm). Without
    it the checker refuses the fused graph ("No Op registered"). The schema follows onnxruntime's:
    X and scale in, Y and an optional inv_std_var out; no shape inference function."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("SimplifiedLayerNormalization"):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    schema = OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "V")],
        outputs=[OpSchema.FormalParameter("Y", "V"),
                 OpSchema.FormalParameter("inv_std_var", "U", param_option=OpSchema.FormalParameterOption.Optional)],
        type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
        attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, "", required=False),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False),
                    OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "", required=False)],
    )
    onnx.defs.register_schema(schema)


def check_onnx_model(model_path: Path, root: Path) -> list[Path]:
    """Containment, then onnx's checker and shape inference, both by path: the in-memory forms
    refuse models over 2 GiB. Returns the external-data files."""
    import onnx

    files = external_data_files(model_path, root)
    register_onnxruntime_schemas()
    try:
        onnx.checker.check_model(str(model_path))
        with tempfile.TemporaryDirectory(prefix="rankdown-shapes-") as scratch:
            onnx.shape_inference.infer_shapes_path(str(model_path), str(Path(scratch) / "inferred.onnx"))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RankdownError(f"{model_path}: fails the ONNX checker: {str(e).splitlines()[0]}") from None
    return files
