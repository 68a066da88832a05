"""ONNX: optimum's text-generation-with-past export, then onnxruntime's int8 quantizer.

The format's hooks (export/formats.py): ``preflight``, ``export``, ``check_file``, ``positions``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig, Quantize
from rankdown.export.decoding import trained_positions
from rankdown.export.factor_nodes import count_onnx
from rankdown.export.manifest import FactorNodes
from rankdown.export.onnx_files import check_onnx_model, external_data_files
from rankdown.factor_record import FactorRecord

SUBDIR = "onnx"
MODEL_FILE = "model.onnx"


def preflight(cfg: ExportConfig) -> None:
    """optimum and onnxruntime come with the pinned stack; int4 (MatMulNBits) is not built yet."""
    if cfg.quantize is Quantize.INT4:
        raise RankdownError("--quantize int4 is ExecuTorch-only for now (ONNX MatMulNBits is not implemented); "
                            "use --format executorch")


def export(model, record: FactorRecord, bundle: Path, cfg: ExportConfig, progress=print) -> tuple[float, FactorNodes, None]:
    seconds, nodes = export_onnx(model, record, bundle, cfg)
    # Beyond check_file's containment: onnx's checker and shape inference, once, at export.
    check_onnx_model(bundle / SUBDIR / MODEL_FILE, bundle)
    return seconds, nodes, None


def check_file(path: Path, bundle: Path) -> list[Path]:
    """The external-data files the graph reads, each proven to lie inside the bundle."""
    return external_data_files(path, bundle)


def positions(path: Path, options: dict) -> int | None:
    """The model's trained context: the graph computes rotary angles for any position."""
    return trained_positions(Path(path).parent / "config.json")


def export_onnx(model, record: FactorRecord, bundle: Path, cfg: ExportConfig) -> tuple[float, FactorNodes]:
    """Write ``bundle/onnx/`` (model.onnx, its config, generation config). Returns seconds and node counts."""
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    out = bundle / SUBDIR
    start = time.perf_counter()
    # optimum picks the graph's I/O names (input_ids, attention_mask, position_ids,
    # past_key_values.*, logits, present.*) that ORTModelForCausalLM and ORT GenAI expect,
    # and switches to external data on its own above 2 GB.
    stage = bundle / ".onnx-fp32" if cfg.quantize is Quantize.INT8 else out
    onnx_export_from_model(model, output=stage, task="text-generation-with-past", do_validation=False,
                           no_post_process=False)
    fp32_path = stage / MODEL_FILE
    onnx.checker.check_model(str(fp32_path))  # path form: handles external data and > 2 GB
    nodes = count_onnx(record, fp32_path)
    if cfg.quantize is Quantize.INT8:
        _quantize_int8(fp32_path, out / MODEL_FILE)
        for extra in stage.iterdir():
            if extra.suffix == ".json":
                shutil.copy2(extra, out / extra.name)
        shutil.rmtree(stage)
        onnx.checker.check_model(str(out / MODEL_FILE))
        quantized = count_onnx(record, out / MODEL_FILE)
        if quantized.found != nodes.found:
            raise RankdownError(f"{out / MODEL_FILE}: int8 quantization changed the factor node count "
                                f"({nodes.found} -> {quantized.found})")
        nodes = quantized
    return time.perf_counter() - start, nodes


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    large = sum(p.stat().st_size for p in src.parent.iterdir()) > 1_800_000_000
    # Only MatMuls with a constant weight are quantized (ORT leaves activation x activation
    # attention products in float), so the factors and the head become int8, nothing else.
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     use_external_data_format=large)
