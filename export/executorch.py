"""ExecuTorch: torch.export with a static KV cache, lowered to a delegate (XNNPACK by default).

The stock transformers model attends through ExecuTorch's LLM kernels (``llama::update_cache``,
``llama::custom_sdpa``; export/et_attention.py), as ExecuTorch's and optimum-executorch's Llama
exports do; ``forward(tokens[1, n], input_pos[1])`` takes a prompt in one call. We add the
metadata methods ExecuTorch's LLM runner reads, int8 via the XNNPACK quantizer and int4 (8da4w)
via torchao (export/et_int4.py).
The format's hooks (export/formats.py): ``preflight``, ``export``, ``check_file``, ``positions``, ``quantize``;
its delegates are registered in export/et_backends.py.
"""

from __future__ import annotations

import contextlib
import operator
import time
from pathlib import Path

import torch

from rankdown.export.config import ExportConfig, Int4Scales, Quantize
from rankdown.export.decoding import DECODE_METHOD, program_data_file
from rankdown.export.et_attention import CustomOpsSignature, custom_attention
from rankdown.export.et_backends import backend_spec, check_backend
from rankdown.export.et_fused_inputs import fuse_inputs, fused_members
from rankdown.export.et_int4 import quantize_int4
from rankdown.export.et_norms import pooled_norms
from rankdown.export.et_rotary import matmul_rotary
from rankdown.export.et_views import drop_unit_reshapes, reshape_unit_permutes
from rankdown.export.factor_nodes import count_exported_program, fused_group, linear_weight_path
from rankdown.export.formats import Quantized
from rankdown.export.int4_gptq import GptqStatistics, gptq_record, gptq_round
from rankdown.export.manifest import FactorNodes
from rankdown.export.pte_file import check_pte_header
from rankdown.export.tied_embeddings import external_table_tag, tag_tied_table
from rankdown.factor_record import FactorRecord
from rankdown.int4_numerics import PER_CHANNEL, group_label

SUBDIR = "executorch"
MODEL_FILE = "model.pte"
DATA_FILE = "model.ptd"  # a tied table, stored once outside the program (export/tied_embeddings.py)


def preflight(cfg: ExportConfig) -> None:
    check_backend(cfg.backend, will_run=cfg.check)


def export(model, record: FactorRecord, bundle: Path, cfg: ExportConfig, progress=print,
           quantized: Quantized | None = None) -> tuple[float, FactorNodes, dict[str, int], dict | None]:
    return export_executorch(model, record, bundle, cfg, progress, quantized)


def quantize(model, record: FactorRecord, cfg: ExportConfig, progress=print,
             calibration: GptqStatistics | None = None) -> Quantized | None:
    """int4: the torchao-quantized copy of ``model`` that the export lowers (``model`` is left as it
    is), so the self-check can also run it in PyTorch; None for fp32 and int8 (int8 is quantized on
    the traced graph). ``calibration``: the float model's input statistics GPTQ rounding runs on
    (export/int4_gptq.py's ``GptqStatistics`` of ``model``), needed where GPTQ rounds the decoder or the
    head (``cfg.gptq_parts``)."""
    if cfg.quantize is not Quantize.INT4:
        return None
    quantized, plan = quantize_int4(model, record, cfg.group, cfg.head, hqq=cfg.scales is Int4Scales.HQQ)
    padded_to = "an even width" if cfg.group == PER_CHANNEL else "a multiple of the group"
    progress(f"  executorch: int4 scales {group_label(cfg.group)}, {cfg.scales.value}; {len(plan.padded)} factor "
             f"rank(s) padded to {padded_to} with zeros, {len(plan.int8_linears)} dense linear(s) kept 8-bit")
    decoder, head = cfg.gptq_parts
    rounding: dict = {"rounding": cfg.rounding.value, "head_rounding": cfg.head_rounds_by.value}
    if decoder or head:
        if calibration is None or calibration.model is not model:
            raise ValueError("GPTQ rounding needs the statistics of the model it quantizes")
        result = gptq_round(quantized, calibration, progress, decoder=decoder, head=head)
        progress(result.summary("executorch"))
        rounding["gptq"] = gptq_record(result)
    saved = fuse_inputs(quantized)
    if saved:
        progress(f"  executorch: the linears that read one input (q/k/v, gate/up) run as one GEMM each: "
                 f"{saved} fewer per token")
    return Quantized(quantized, plan.record, {"scheme": "torchao 8da4w", "scales": cfg.scales.value, **rounding,
                                              "head_bits": cfg.head,
                                              "padded_ranks": len(plan.padded), "int8_linears": len(plan.int8_linears),
                                              "fused_input_linears": saved})


def check_file(path: Path, bundle: Path) -> list[Path]:
    """The .pte's header, and its program data (a tied table's .ptd), which the runtime also reads."""
    check_pte_header(path)
    data = program_data_file(path)
    return [] if data is None else [data]


def positions(path: Path, options: dict) -> int:
    """The static KV cache's length, as exported."""
    return int(options["max_seq_len"])


def _is_mergeable(node) -> bool:
    """A pure op (no mutation, no randomness), so two with the same inputs compute the same:
    the linears, and the activation quantization in front of a quantized one."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    return not node.target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in node.target.tags


def _has_shared_downs(record: FactorRecord) -> bool:
    return any(spec.shares_down_with is not None for spec in record.modules.values())


def _run_shared_down_once(program, within: set | None = None) -> int:
    """Merge linears that apply the same weight to the same input (a shared-``down`` group's
    members each call the owner's ``down`` in eager mode), with their (de)quantization ops when
    quantized. ``within``: merge only these nodes. Returns how many linears were merged."""

    seen: dict[tuple, torch.fx.Node] = {}
    merged = 0
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if not _is_mergeable(node) or (within is not None and node not in within):
            continue
        key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += node.target is torch.ops.aten.linear.default
        else:
            seen[key] = node
    graph.lint()
    program.graph_module.recompile()
    return merged


def _fused_chains(program, fused: dict) -> set:
    """The linears whose weight is a fused one (export/et_fused_inputs.py), with the quantization
    ops between them and their input and weight: each member's call of the one fused linear, which
    ``_run_shared_down_once`` then merges into one. Nothing else, so no two different linears come
    to share an activation quantization (the one-pass partitioner would form cyclic partitions)."""
    params = dict(program.graph_signature.inputs_to_parameters)

    def is_fused(linear) -> bool:
        return fused_group(linear_weight_path(linear, params), fused) is not None

    def is_quant_op(node) -> bool:
        return node.op == "call_function" and (
            node.target is operator.getitem
            or getattr(node.target, "namespace", None) == "quantized_decomposed")

    chains: set = set()
    stack = [n for n in program.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.aten.linear.default and is_fused(n)]
    while stack:
        node = stack.pop()
        if node not in chains:
            chains.add(node)
            stack += [a for a in node.all_input_nodes if is_quant_op(a)]
    return chains


def trace(model, max_len: int, tokens: int | None = None, rotary_matmul: bool = False, norm_linear: bool = False):
    """``model`` as a torch.export program with the custom-ops attention and a static cache of
    ``max_len`` positions: ``forward(tokens[1, n], input_pos[1])``, n dynamic up to ``max_len - 1``,
    or exactly ``tokens`` (static shapes: the one-token method, ``DECODE_METHOD``).
    ``rotary_matmul``: the rotary's half swap as one linear (export/et_rotary.py): measured faster
    in int4 only (fp32 0.965x), and int8's quantizer, which takes every linear of the traced graph,
    would quantize that one's input too. ``norm_linear``: each RMSNorm's mean of squares as one linear
    (export/et_norms.py), for the same reason int4 only."""
    example = (torch.full((1, tokens or 8), model.config.bos_token_id or 0, dtype=torch.long), torch.tensor([0]))
    dynamic = None if tokens else {"tokens": {1: torch.export.Dim("seq", max=max_len - 1)}, "input_pos": None}
    rotary = matmul_rotary(model) if rotary_matmul else contextlib.nullcontext()
    with torch.no_grad(), custom_attention(model, max_len), pooled_norms(model, as_linear=norm_linear), rotary:
        # strict=True: with strict=False this torch fails later, in decomposition.
        program = torch.export.export(CustomOpsSignature(model, max_len), args=example, dynamic_shapes=dynamic,
                                      strict=True)
    if tokens:
        reshape_unit_permutes(program)
        drop_unit_reshapes(program)
    return program, example, dynamic


def _metadata(model, cfg: ExportConfig) -> dict:
    """Constant methods ExecuTorch's LLM runner (TextLLMRunner) reads from the program."""
    config = model.config
    eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return {
        "get_max_seq_len": cfg.max_seq_len,
        "get_max_context_len": cfg.max_seq_len,
        "get_vocab_size": config.vocab_size,
        "get_bos_id": config.bos_token_id if config.bos_token_id is not None else -1,
        "get_eos_ids": eos_ids,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": True,  # attention and cache update run as ExecuTorch's LLM kernels
    }


def export_executorch(model, record: FactorRecord, bundle: Path, cfg: ExportConfig, progress=print,
                      quantized: Quantized | None = None) -> tuple[float, FactorNodes, dict[str, int], dict | None]:
    """Write ``bundle/executorch/model.pte``, and ``model.ptd`` beside it for a tied fp32 model.
    Returns seconds, node counts, the delegation summary and, for int4, what was padded. ``quantized``:
    ``quantize``'s result for ``model`` when the caller already has it (int4)."""
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    start = time.perf_counter()
    length = cfg.max_seq_len
    quantization = None
    if quantized is None:
        quantized = quantize(model, record, cfg, progress)
    if quantized is not None:
        model, record, quantization = quantized.model, quantized.record, quantized.summary
    with torch.no_grad():
        rotary = cfg.quantize is Quantize.INT4
        programs = {"forward": trace(model, length, rotary_matmul=rotary, norm_linear=rotary)}
        # XNNPACK delegates a static slice (a fused linear's members, the rotary halves) but not a
        # dynamic one, so the one-token graph runs each layer in one delegate call between the
        # attention kernels, where forward needs several.
        if cfg.wants_decode_method():
            programs[DECODE_METHOD] = trace(model, length, tokens=1, rotary_matmul=rotary, norm_linear=rotary)
        # Merging also shares one activation quantization among the linears that read one input
        # (q/k/v, gate/up); XNNPACK's one-pass partitioner then forms cyclic partitions, so an int4
        # graph is merged only where a shared down needs it, and is then partitioned in two passes;
        # elsewhere only the repeated calls of a fused linear (export/et_fused_inputs.py) are merged.
        merge = cfg.quantize is not Quantize.INT4 or _has_shared_downs(record)
        fused = fused_members(model)
        lowered, counts = {}, {}
        external = False
        for name, (program, example, dynamic) in programs.items():
            if merge:
                _run_shared_down_once(program)
            elif fused:
                _run_shared_down_once(program, within=_fused_chains(program, fused))
            counts[name] = count_exported_program(record, program, f"{bundle / SUBDIR / MODEL_FILE} ({name} graph)",
                                                  fused)
            if cfg.quantize is Quantize.INT8:
                program = _quantize_int8(program, example, dynamic)
            # int8: the head's weight becomes its own int8 tensor, so the fp32 table is stored once anyway;
            # int4 with an 8-bit head: the lookup reads the head's int8 table, stored once the same way.
            external = cfg.quantize is not Quantize.INT8 and tag_tied_table(program, Path(DATA_FILE).stem)
            lowered[name] = program
        progress(f"  executorch: exported {' and '.join(lowered)} in {time.perf_counter() - start:.1f} s; "
                 f"lowering to {cfg.backend.value}")
        # As ExecuTorch's Llama export (LLMEdgeManager._get_edge_config) and optimum-executorch's
        # XNNPACK recipe: no dim-order ops (XNNPACK reverts them anyway), no IR re-verification.
        compile_config = (EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)
                          if backend_spec(cfg.backend).name == "xnnpack" else None)
        separate = cfg.quantize is Quantize.INT8 or (cfg.quantize is Quantize.INT4 and merge)
        edge = to_edge_transform_and_lower(lowered, partitioner=backend_spec(cfg.backend).partitioners(separate),
                                           constant_methods=_metadata(model, cfg), compile_config=compile_config)
        nodes, delegation = counts["forward"], dict[str, int]()
        for name in lowered:
            info = get_delegation_info(edge.exported_program(name).graph_module)
            suffix = "" if name == "forward" else f"_{name}"
            delegation |= {f"delegated_nodes{suffix}": int(info.num_delegated_nodes),
                           f"non_delegated_nodes{suffix}": int(info.num_non_delegated_nodes),
                           f"delegated_subgraphs{suffix}": int(info.num_delegated_subgraphs)}
        executorch_program = edge.to_executorch(_backend_config(external, cfg.quantize is Quantize.INT4,
                                                                shared_cache=len(lowered) > 1))
    write_program(executorch_program, bundle / SUBDIR / MODEL_FILE)
    return time.perf_counter() - start, nodes, delegation, quantization


def _backend_config(external_table: bool, int4: bool, shared_cache: bool):
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    # int4: the 8-bit embedding's dequantize + lookup becomes one quantized-lookup kernel.
    # shared_cache: forward and decode plan their KV caches into one shared arena (ExecuTorch's
    # multi-method LLM export does the same), so a prompt prefilled by one is read by the other.
    planning = ({"memory_planning_pass": MemoryPlanningPass(share_mutable_buffers=True),
                 "emit_mutable_buffer_names": True} if shared_cache else {})
    return ExecutorchBackendConfig(external_constants=external_table_tag if external_table else False,
                                   do_quant_fusion_and_const_prop=int4, **planning)


def write_program(executorch_program, path: Path) -> None:
    """The one place a .pte (and its program data file, if it has one) is written (the kill-point
    tests fork here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        executorch_program.write_to_file(f)
    executorch_program.write_tensor_data_to_file(str(path.parent))  # one <tag>.ptd per data tag, often none


def _quantize_int8(program, example, dynamic):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # Per-channel symmetric int8 weights, activations quantized dynamically per call:
    # XNNPACK's qd8-f32-qc8w kernels. Dynamic quantization needs no calibration data; the one
    # call below only runs the observers once.
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    prepared = prepare_pt2e(program.module(), quantizer)
    prepared(*example)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, args=example, dynamic_shapes=dynamic, strict=True)
