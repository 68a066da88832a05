"""ONNX: the fused graph of onnxruntime-genai's model builder (export/onnx_builder.py; by default) or
optimum's text-generation-with-past export (``--onnx-graph optimum``), then onnxruntime's int8
quantizer (``quantize_dynamic``) or its 4-bit one (``MatMulNBitsQuantizer``, export/onnx_int4.py),
and the files onnxruntime-genai opens the folder with (export/onnx_genai.py).

The format's hooks (export/formats.py): ``preflight``, ``export``, ``check_file``, ``positions``, and
``lowered_model`` (int4: PyTorch with the graph's own 4-bit weights, export/onnx_int4_reference.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig, Int4Scales, OnnxGraph, Quantize
from rankdown.export.decoding import trained_positions
from rankdown.export.factor_nodes import count_onnx
from rankdown.export.manifest import FactorNodes
from rankdown.export.onnx_files import check_onnx_model, external_data_files, register_onnxruntime_schemas
from rankdown.export.onnx_genai import genai_encodings, write_genai_files
from rankdown.export.onnx_int4 import QUANTIZER, quantize_int4
from rankdown.factor_record import FactorRecord

SUBDIR = "onnx"
MODEL_FILE = "model.onnx"


def preflight(cfg: ExportConfig) -> None:
    """optimum and onnxruntime come with the pinned stack; int4 needs onnxruntime's quantizer to import
    (it imports ``onnx_ir``, which onnxruntime does not declare)."""
    if cfg.quantize is Quantize.INT4:
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: F401
        except ImportError as e:
            raise RankdownError(f"--quantize int4 for ONNX needs onnxruntime's MatMulNBitsQuantizer: {e}") from None


def export(model, record: FactorRecord, bundle: Path, cfg: ExportConfig,
           progress=print, calibration=None) -> tuple[float, FactorNodes, None, dict | None]:
    """``calibration``: the float model's input statistics GPTQ rounding runs on (export/int4_gptq.py's
    ``GptqStatistics`` of ``model``), needed for int4 where GPTQ rounds the decoder or the head (``cfg.gptq_parts``)."""
    seconds, nodes, quantization = export_onnx(model, record, bundle, cfg, calibration, progress)
    if quantization is not None:
        blocks = ", ".join(f"{count} in blocks of {block}" for block, count in
                           quantization["decoder_block_sizes"].items())
        rule = (f"each in the largest block up to {cfg.onnx_group} that divides its input width"
                if quantization["scheme"] == QUANTIZER else
                f"{quantization['scheme']}, each in its group (one per channel: in blocks of 16 to 256 by "
                "the input width, the scale repeated; MLAS runs fewer, padded blocks faster)")
        progress(f"  onnx: int4 MatMulNBits for {quantization['int4_matmuls']} matmul(s), {rule} "
                 f"({blocks}; {quantization['partial_last_block']} "
                 f"with a zero-padded last block); {quantization['fused_input_linears']} run as rows of "
                 f"another's node (first stages that read one input, stacked); head {quantization['head']}; "
                 f"embedding {quantization['embedding']}")
    # Beyond check_file's containment: onnx's checker and shape inference, once, at export.
    check_onnx_model(bundle / SUBDIR / MODEL_FILE, bundle)
    written = write_genai_files(bundle / SUBDIR, bundle, MODEL_FILE,
                               keep_config=cfg.onnx_graph is OnnxGraph.FUSED)
    _check_genai_tokenizer(bundle / SUBDIR)
    progress(f"  onnx: {', '.join(written)} for onnxruntime-genai; its tokenizer encodes the check texts as the model's")
    return seconds, nodes, None, quantization


def _check_genai_tokenizer(folder: Path) -> None:
    """onnxruntime-genai's own tokenizer (onnxruntime-extensions) must encode real prompts as the
    model's tokenizer does (both without BOS: genai's ``encode`` adds none)."""
    from tokenizers import Tokenizer

    from rankdown.export.bundle_tokenizer import check_texts

    model_tokenizer = Tokenizer.from_file(str(folder.parent / "tokenizer.json"))
    copy = Tokenizer.from_file(str(folder / "tokenizer.json"))  # genai_readable's rewrite, if any
    texts = check_texts()
    for text, got in zip(texts, genai_encodings(folder, texts)):
        want = model_tokenizer.encode(text, add_special_tokens=False).ids
        if copy.encode(text, add_special_tokens=False).ids != want or copy.decode(want) != model_tokenizer.decode(want):
            raise RankdownError(f"{folder / 'tokenizer.json'}: the copy for onnxruntime-genai encodes or decodes "
                                f"{text[:30]!r}... differently from the bundle's tokenizer.json")
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise RankdownError(f"{folder}: onnxruntime-genai's tokenizer encodes {text[:30]!r}... differently from "
                                f"the model's (first difference at token {at}: {got[at:at + 3]} vs {want[at:at + 3]})")


def check_file(path: Path, bundle: Path) -> list[Path]:
    """The external-data files the graph reads, each proven to lie inside the bundle."""
    return external_data_files(path, bundle)


def lowered_model(model, artifact: Path, quantize: Quantize, rounds=None):
    """int4: ``model`` with the weights the graph at ``artifact`` holds, read back from its
    MatMulNBits nodes (export/onnx_int4_reference.py); None for fp32 and int8, whose self-check
    holds the graph to the float model. ``rounds``: the running onnxruntime's int8 rounding, per
    kind of node (default: this machine's)."""
    if quantize is not Quantize.INT4:
        return None
    from rankdown.export.onnx_int4_reference import int4_reference

    return int4_reference(model, artifact, rounds=rounds)


def positions(path: Path, options: dict) -> int | None:
    """The model's trained context: the graph computes rotary angles for any position."""
    return trained_positions(Path(path).parent / "config.json")


def export_onnx(model, record: FactorRecord, bundle: Path, cfg: ExportConfig, calibration=None,
                progress=print) -> tuple[float, FactorNodes, dict | None]:
    """Write ``bundle/onnx/`` (model.onnx, its config, generation config). Returns seconds, node counts
    and, for int4, what the quantizer did. ``model``: the float model the graph is exported from,
    whose inputs' statistics (``calibration``, a ``GptqStatistics`` of it) GPTQ rounding runs on."""
    import onnx

    out = bundle / SUBDIR
    start = time.perf_counter()
    quantized = cfg.quantize is not Quantize.NONE
    stage = bundle / ".onnx-fp32" if quantized else out
    if cfg.onnx_graph is OnnxGraph.FUSED:
        _export_fused(model, stage)
    else:
        from optimum.exporters.onnx import onnx_export_from_model

        # optimum picks the graph's I/O names (input_ids, attention_mask, position_ids,
        # past_key_values.*, logits, present.*) that ORTModelForCausalLM and ORT GenAI expect,
        # and switches to external data on its own above 2 GB.
        onnx_export_from_model(model, output=stage, task="text-generation-with-past", do_validation=False,
                               no_post_process=False)
    fp32_path = stage / MODEL_FILE
    register_onnxruntime_schemas()  # the fused graph's first RMSNorm
    onnx.checker.check_model(str(fp32_path))  # path form: handles external data and > 2 GB
    nodes = count_onnx(record, fp32_path)
    summary = None
    if quantized:
        if cfg.quantize is Quantize.INT8:
            _quantize_int8(fp32_path, out / MODEL_FILE)
        else:
            # absmax: the checkpoint was healed through the export's own int4 (export/pipeline.py), which
            # the decoder's MatMulNBits then hold to the bit, in its group (per channel included).
            healed = cfg.group if cfg.scales is Int4Scales.ABSMAX else None
            summary = quantize_int4(fp32_path, out / MODEL_FILE, cfg.onnx_group, head_bits=cfg.head,
                                    healed_group=healed, reround=_gptq(model, cfg, calibration, progress)).as_dict()
            summary |= {"rounding": cfg.rounding.value, "head_rounding": cfg.head_rounds_by.value}
        for extra in stage.iterdir():
            if extra.suffix == ".json":
                shutil.copy2(extra, out / extra.name)
        shutil.rmtree(stage)
        onnx.checker.check_model(str(out / MODEL_FILE))
        requantized = count_onnx(record, out / MODEL_FILE)
        if requantized.found != nodes.found:
            raise RankdownError(f"{out / MODEL_FILE}: {cfg.quantize.value} quantization changed the factor node count "
                                f"({nodes.found} -> {requantized.found})")
        nodes = requantized
    return time.perf_counter() - start, nodes, summary


def _gptq(model, cfg: ExportConfig, calibration, progress):
    """The int4 graph's re-rounding where GPTQ picks the decoder's or the head's codes
    (export/onnx_int4_gptq.py, ``ExportConfig.gptq_parts``), else None."""
    decoder, head = cfg.gptq_parts
    if not (decoder or head):
        return None
    if calibration is None or calibration.model is not model:
        raise ValueError("GPTQ rounding needs the statistics of the model it quantizes")
    from rankdown.export.onnx_int4_gptq import gptq_round_graph

    def reround(graph):
        result = gptq_round_graph(graph, calibration, progress, decoder=decoder, head=head)
        progress(result.summary("onnx"))
        return result
    return reround


def _export_fused(model, stage: Path) -> None:
    """The builder's graph and genai_config.json, with the model's config.json and
    generation_config.json beside them (the decoder reads the trained context from config.json;
    the builder reads generation_config.json for genai_config.json's search settings)."""
    from rankdown.export.onnx_builder import build_fused_onnx

    stage.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(stage / "config.json"))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.to_json_file(str(stage / "generation_config.json"))
    build_fused_onnx(model, stage, generation_source=stage)


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    large = sum(p.stat().st_size for p in src.parent.iterdir()) > 1_800_000_000
    # Only MatMuls with a constant weight are quantized (ORT leaves activation x activation
    # attention products in float), so the factors and the head become 8-bit, nothing else.
    # Unsigned weights (U8U8): with signed ones (U8S8) an x86 CPU with AVX2 and no VNNI (AMD Zen 3,
    # Intel before Ice Lake) runs MLAS's VPMADDUBSW kernel, whose int16 pair sums saturate; on such a
    # CPU the shipped model's int8 exports failed their own self-check (top-1 73.9-75.4% < 80%), and
    # pass with U8U8 (MLAS widens unsigned weights to 16 bits there; no pair sum saturates).
    quantize_dynamic(src, dst, weight_type=QuantType.QUInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     use_external_data_format=large)
