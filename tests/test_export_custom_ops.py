"""ExecuTorch export through ExecuTorch's LLM kernels (llama::custom_sdpa, llama::update_cache) and
4-bit (8da4w) weights: the ops are in the program, factor pairs stay two linears, parity holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import quiet

from rankdown.checkpoint import load_model, open_checkpoint
from rankdown.export.config import ExportConfig, Int4Scales
from rankdown.export.et_int4 import DecomposedQuantLinear, pad_ranks, quantize_int4
from rankdown.export.manifest import Manifest
from rankdown.export.pipeline import export
from rankdown.factor_record import FactorRecord
from rankdown.int4_numerics import PER_CHANNEL, group_for, group_option, padded_rank, parse_group

CUSTOM_OPS = (b"llama::custom_sdpa", b"llama::update_cache")


def _expected_nodes(record: FactorRecord) -> int:
    return sum(1 if spec.shares_down_with else 2 for spec in record.modules.values())


def test_attention_runs_as_executorch_custom_ops(joint_bundle):
    """The shared fp32 export: every attention goes through the kernels, pairs stay two linears,
    greedy identical to PyTorch (the export's own parity check)."""
    folder, bundle, manifest = joint_bundle
    pte = (bundle / "executorch" / "model.pte").read_bytes()
    for op in CUSTOM_OPS:
        assert op in pte, op
    assert b"aten::bmm" not in pte and b"aten::_softmax" not in pte  # no plain-aten attention left
    entry = manifest.formats["executorch"]
    assert entry.factor_nodes.found == entry.factor_nodes.expected == _expected_nodes(FactorRecord.read(folder))
    assert entry.parity.passed and entry.parity.greedy_match and entry.parity.max_abs_logit_diff < 1e-4


def test_norms_stay_inside_the_delegate_and_the_one_token_method_needs_fewer_delegate_calls(joint_bundle):
    """No norm's mean left outside XNNPACK (export/et_norms.py), and the one-token method beside
    forward, in fewer delegate calls than forward needs."""
    from rankdown.export.decoding import DECODE_METHOD, ExecuTorchDecoder

    _, bundle, manifest = joint_bundle
    pte = bundle / "executorch" / "model.pte"
    assert b"aten::mean" not in pte.read_bytes()
    assert ExecuTorchDecoder(pte).program.method_names >= {"forward", DECODE_METHOD}
    delegation = manifest.formats["executorch"].delegation
    assert delegation[f"delegated_subgraphs_{DECODE_METHOD}"] < delegation["delegated_subgraphs"]


def test_decode_step_reads_the_cache_forward_wrote(joint_bundle):
    """A prompt prefilled by forward, then each new token through the one-token method, gives
    forward's logits, in the Python runtime and in rankdown-et-runner (shared arenas), which says it
    runs that method."""
    import numpy as np

    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import DECODE_METHOD, ExecuTorchDecoder, NativeExecuTorchDecoder, greedy

    _, bundle, _ = joint_bundle
    pte = bundle / "executorch" / "model.pte"
    with_decode, forward_only = ExecuTorchDecoder(pte), ExecuTorchDecoder(pte)
    assert with_decode.decode is not None
    forward_only.decode = None
    prompt = [5, 9, 30, 7, 12]
    assert np.abs(with_decode.prefill(prompt) - forward_only.prefill(prompt)).max() < 1e-4
    token = 11
    for _ in range(6):
        a, b = with_decode.step(token), forward_only.step(token)
        assert np.abs(a - b).max() < 1e-4
        token = int(a.argmax())
    native = NativeExecuTorchDecoder(pte, [str(build_runner(progress=quiet) / "bin" / BINARY)], threads=1)
    assert native.one_token_method == DECODE_METHOD
    ours, theirs = greedy(native, prompt, 8), greedy(forward_only, prompt, 8)
    assert ours.tokens == theirs.tokens and np.abs(ours.step_logits - theirs.step_logits).max() < 1e-4
    native.close()


def test_native_runner_packs_the_weights_once_for_both_methods(shipped_math_bundle):
    """rankdown-et-runner turns on XNNPACK's weight cache: forward and the one-token method share one
    packed copy of the weights (without it each method packs its own), and the logits are the same
    bit for bit."""
    import numpy as np

    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import DECODE_METHOD, NativeExecuTorchDecoder, greedy

    bundle = shipped_math_bundle[1]
    pte = bundle / "executorch" / "model.pte"
    binary = str(build_runner(progress=quiet) / "bin" / BINARY)
    runs = {}
    for name, command in (("cache", [binary]), ("apart", [binary, "--no-weight-cache"])):
        decoder = NativeExecuTorchDecoder(pte, command, threads=1)
        assert decoder.one_token_method == DECODE_METHOD
        generation = greedy(decoder, [5, 9, 30, 7, 12], 8)
        runs[name] = (generation, decoder.close())
    (cached, cached_mb), (apart, apart_mb) = runs["cache"], runs["apart"]
    assert cached.tokens == apart.tokens and np.array_equal(cached.step_logits, apart.step_logits)
    # the one copy the cache saves: at least half the decoder linears' fp32 bytes
    weights_mb = 4 * Manifest.read(bundle).model.decoder_linear_params / 2**20
    assert cached_mb is not None and apart_mb is not None
    assert apart_mb - cached_mb > 0.5 * weights_mb, (apart_mb, cached_mb, weights_mb)


def test_native_runner_moves_the_weights_to_huge_pages_and_computes_the_same(shipped_math_bundle, monkeypatch):
    """Once loaded, the runner collapses its anonymous memory (XNNPACK's packed weights) into
    transparent huge pages where the kernel can (MADV_COLLAPSE, Linux 6.1+, THP not `never`) and
    says how much in its header; RANKDOWN_HUGE_PAGES=0 leaves 4 KiB pages; the logits do not depend
    on it."""
    import json
    import os
    import platform
    import re
    import struct
    import subprocess

    import numpy as np

    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import NativeExecuTorchDecoder, greedy

    pte = shipped_math_bundle[1] / "executorch" / "model.pte"
    binary = str(build_runner(progress=quiet) / "bin" / BINARY)
    data = ["--data", str(pte.with_suffix(".ptd"))] if pte.with_suffix(".ptd").is_file() else []

    def while_running(huge: str | None) -> tuple[int, int]:
        """The header's huge_pages_kb and the process's AnonHugePages kB, once loaded."""
        env = {k: v for k, v in os.environ.items() if k != "RANKDOWN_HUGE_PAGES"}
        if huge is not None:
            env["RANKDOWN_HUGE_PAGES"] = huge
        proc = subprocess.Popen([binary, str(pte), "1", *data], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env)
        assert proc.stdout is not None and proc.stdin is not None
        header = json.loads(proc.stdout.readline())
        found = re.search(r"AnonHugePages:\s+(\d+) kB", Path(f"/proc/{proc.pid}/smaps_rollup").read_text())
        proc.stdin.write(struct.pack("<i", 0))
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
        assert found is not None
        return header["huge_pages_kb"], int(found.group(1))

    (said, held), (said_off, held_off) = while_running(None), while_running("0")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = re.search(r"\[(\w+)\]", thp.read_text()) if thp.is_file() else None
    kernel = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    can = mode is not None and mode.group(1) != "never" and kernel >= (6, 1)
    if can:
        assert said > 0 and held > 0, (said, held)
    else:
        assert said == 0, (said, mode, kernel)
    assert said_off == 0
    if mode is not None and mode.group(1) == "madvise":
        assert held_off == 0, held_off  # nothing else asks for huge pages in that mode
    runs = []
    for huge in (None, "0"):
        if huge is None:
            monkeypatch.delenv("RANKDOWN_HUGE_PAGES", raising=False)
        else:
            monkeypatch.setenv("RANKDOWN_HUGE_PAGES", huge)
        decoder = NativeExecuTorchDecoder(pte, [binary], threads=1)
        runs.append(greedy(decoder, [5, 9, 30, 7, 12], 8))
        decoder.close()
    assert runs[0].tokens == runs[1].tokens and np.array_equal(runs[0].step_logits, runs[1].step_logits)


def test_native_runner_attention_paths_agree(shipped_math_bundle, monkeypatch):
    """The runner's custom_sdpa in AVX-512, AVX2 and the portable loop (RANKDOWN_ET_ATTENTION caps
    the path; where the CPU lacks one, the next one down runs): the same greedy tokens, logits
    within float summation order."""
    import numpy as np

    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import NativeExecuTorchDecoder, greedy

    pte = shipped_math_bundle[1] / "executorch" / "model.pte"
    binary = str(build_runner(progress=quiet) / "bin" / BINARY)
    runs = {}
    for cap in ("", "avx2", "portable"):
        monkeypatch.setenv("RANKDOWN_ET_ATTENTION", cap)
        decoder = NativeExecuTorchDecoder(pte, [binary], threads=2)
        runs[cap] = greedy(decoder, [5, 9, 30, 7, 12, 3, 44, 8], 24)
        decoder.close()
    import platform

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    x86 = platform.machine() in ("x86_64", "AMD64")
    ran = {"": x86 and bool({"avx512f", "avx2"} & flags), "avx2": x86 and {"avx2", "fma"} <= flags}
    for cap in ("", "avx2"):
        assert runs[cap].tokens == runs["portable"].tokens
        difference = np.abs(runs[cap].step_logits - runs["portable"].step_logits).max()
        assert difference < 1e-4
        # another summation order where that path exists on this CPU: the cap reached the kernel
        assert (difference > 0) == ran[cap], (cap, difference)


def test_decode_method_is_on_for_quantized_exports_and_off_in_fp32_unless_asked():
    """By default a quantized .pte gets the one-token method (int4 decodes 1.08-1.13x faster with it)
    and an fp32 one does not (no gain measured, a second copy of the packed weights);
    ``--decode-method`` / ``--no-decode-method`` decide either way."""
    from rankdown.cli import build_parser

    assert not ExportConfig(quantize="none").wants_decode_method()
    with pytest.raises(ValueError, match="auto until the export resolves it"):
        ExportConfig().wants_decode_method()  # auto: the checkpoint decides, so nothing may read it before
    assert ExportConfig(quantize="int4").wants_decode_method() and ExportConfig(quantize="int8").wants_decode_method()
    assert ExportConfig(decode_method=True).wants_decode_method()
    assert not ExportConfig(quantize="int4", decode_method=False).wants_decode_method()
    parse = build_parser().parse_args
    assert parse(["export", "m", "-o", "b"]).decode_method is None
    assert parse(["export", "m", "-o", "b", "--no-decode-method"]).decode_method is False
    assert parse(["export", "m", "-o", "b", "--decode-method"]).decode_method is True


def test_threads_reach_the_executorch_threadpool(joint_bundle):
    """``--threads`` sizes ExecuTorch's own threadpool (torch.set_num_threads alone left it at one
    thread per core)."""
    from executorch.extension.pybindings import portable_lib

    from rankdown.export.decoding import open_executorch

    _, bundle, _ = joint_bundle
    before, torch_before = portable_lib._threadpool_get_thread_count(), torch.get_num_threads()
    try:
        for threads in (1, 3):
            open_executorch(bundle / "executorch" / "model.pte", threads=threads)
            assert portable_lib._threadpool_get_thread_count() == threads
    finally:
        portable_lib._unsafe_reset_threadpool(before)
        torch.set_num_threads(torch_before)


def test_group_and_padding_rules():
    assert group_for(64, 32) == 32 and group_for(96, 64) == 32 and group_for(128, 128) == 128
    assert group_for(37, 32) is None and group_for(48, 16) == 16 and group_for(40, 32) is None
    assert padded_rank(37, 32) == 64 and padded_rank(40, 32) == 64 and padded_rank(20, 16) == 32
    # One scale per output channel: the whole row, an odd one padded by a zero column (QC4W_STEP).
    assert group_for(576, PER_CHANNEL) == 576 and group_for(38, PER_CHANNEL) == 38
    assert group_for(37, PER_CHANNEL) is None
    assert padded_rank(37, PER_CHANNEL) == 38 and padded_rank(38, PER_CHANNEL) == 38
    assert parse_group("channel") == PER_CHANNEL and parse_group("64") == 64
    assert all(parse_group(group_option(g)) == g for g in (PER_CHANNEL, 32, 128))
    with pytest.raises(ValueError):
        parse_group("columns")


def test_group_size_channel_is_checked_and_onnx_takes_blocks_of_32():
    from rankdown.cli import build_parser
    from rankdown.errors import RankdownError
    from rankdown.export.config import DEFAULT_GROUP

    args = build_parser().parse_args(["export", "m", "-o", "b", "--quantize", "int4", "--group-size", "channel"])
    cfg = ExportConfig(quantize="int4", group_size=args.group_size)
    assert (cfg.group, cfg.onnx_group) == (PER_CHANNEL, DEFAULT_GROUP)
    assert ExportConfig(quantize="int4", group_size=64).onnx_group == 64
    with pytest.raises(RankdownError, match="--group-size must be one of 16, 32, 64, 128, 256 or channel, got 48"):
        ExportConfig(quantize="int4", group_size=48)


def test_per_channel_int4_is_one_scale_a_row_and_lowers_whole_to_xnnpack(compressed_tiny):
    """``group_size=PER_CHANNEL``: every decoder linear (factors included, at their own ranks) holds
    4-bit codes with one float32 scale per output row, and such a linear lowers to XNNPACK whole
    (its qc4w kernels) computing what the PyTorch model computes. An odd rank is padded by one zero
    column: the same codes and scale one column short, an odd width, are what XNNPACK's qc4w
    kernels misread, on several tokens with two threads (if this lowering ever reads them right, the
    padding can go)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    def lowered(linear, x):
        program = to_edge_transform_and_lower(torch.export.export(linear, (x,)), partitioner=[XnnpackPartitioner()])
        left = [n.target for n in program.exported_program().graph.nodes
                if n.op == "call_function" and "delegate" not in str(n.target) and "getitem" not in str(n.target)]
        assert not left, left
        before = portable_lib._threadpool_get_thread_count()
        # One thread reads an odd width right, and the suite's runtimes run with one; XNNPACK takes the
        # pool when the method loads.
        portable_lib._unsafe_reset_threadpool(2)
        try:
            return Runtime.get().load_program(program.to_executorch().buffer).load_method("forward").execute([x])[0]
        finally:
            portable_lib._unsafe_reset_threadpool(before)

    record, model, ids = _joint_model(compressed_tiny)
    odd = {name: spec.rank for name, spec in record.modules.items() if spec.rank % 2}
    assert odd  # the joint checkpoint has odd ranks
    quantized, plan = quantize_int4(model, record, PER_CHANNEL, hqq=False)
    assert not plan.int8_linears
    assert {r for r, _ in plan.padded.values()} <= set(odd.values())
    assert all(padded == rank + 1 for rank, padded in plan.padded.values())
    four_bit = {n: m for n, m in quantized.model.layers.named_modules()
                if isinstance(m, DecomposedQuantLinear) and m.quant_range == (-8, 7)}
    assert four_bit and all(m.per_channel and m.scales.shape == (m.weight.shape[0],) for m in four_bit.values())
    assert all(m.weight.shape[1] % 2 == 0 for m in four_bit.values())
    padded = next(m for n, m in four_bit.items() if n.endswith(".up") and not m.weight[:, -1].any()
                  and m.weight.shape[1] % 32)
    x = torch.randn(1, 3, padded.weight.shape[1])
    x[..., -1] = 0.0  # what the padded ``down``'s zero row gives
    with torch.no_grad():
        expected = padded(x)
        torch.testing.assert_close(lowered(padded, x), expected, rtol=1e-4, atol=1e-4)
        short = DecomposedQuantLinear(padded.weight[:, :-1].clone(), padded.scales.clone(), padded.weight.shape[1] - 1,
                                      padded.quant_range)
        torch.testing.assert_close(short(x[..., :-1]), expected, rtol=1e-5, atol=1e-5)
        assert (lowered(short, x[..., :-1].contiguous()) - expected).abs().max() > 0.1 * expected.abs().max()


def test_validate_names_a_pte_exported_with_odd_per_channel_ranks(compressed_tiny):
    """A bundle exported before odd ranks were padded per channel (its manifest counts fewer padded
    ranks than the rebuild pads) gets one warning line saying to export again; one exported today,
    or in groups, none."""
    from types import SimpleNamespace

    from rankdown.validate.config import Runtime
    from rankdown.validate.harness import _lowered_model

    record, model, _ = _joint_model(compressed_tiny)
    odd = sum(spec.rank % 2 for spec in record.modules.values())
    options = {"quantize": "int4", "balance": False, "int4_rounding": "nearest"}
    for group, exported, warned in ((PER_CHANNEL, 0, True), (PER_CHANNEL, odd, False), (32, 0, False)):
        said: list[str] = []
        manifest = SimpleNamespace(options=options | {"group_size": group},
                                   formats={"executorch": SimpleNamespace(quantization={"padded_ranks": exported})})
        _lowered_model(model, record, manifest, Runtime("executorch"), Path("b"), progress=said.append)
        assert said == ([f"warning: b/executorch/model.pte: {odd} factor rank(s) 4-bit per channel at an odd width, "
                         "which XNNPACK's qc4w kernels misread (exported before rankdown padded them to even, "
                         "2026-12-07): export the checkpoint again"] if warned else []), (group, exported)


def _joint_model(compressed_tiny):
    """The joint checkpoint (odd ranks, shared downs): its record, its model and a prompt."""
    folder, _ = compressed_tiny["joint"]
    return FactorRecord.read(folder), load_model(open_checkpoint(folder)).eval(), torch.tensor([[3, 14, 15, 92, 65, 35]])


def test_padded_ranks_compute_the_same_model(compressed_tiny):
    """Zero rows in down and zero columns in up (shared downs once): the same logits, bit for bit
    up to float summation order, and every pair's rank a multiple of the smallest group."""
    record, model, ids = _joint_model(compressed_tiny)
    with torch.no_grad():
        before = model(ids).logits
        padded_record, padded = pad_ranks(model, record, 32)
        after = model(ids).logits
    assert padded and all(r % 32 for r, _ in padded.values())
    assert all(spec.rank % 32 == 0 for spec in padded_record.modules.values())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_a_4bit_head_moves_the_logits_more_than_an_8bit_one(compressed_tiny):
    """head_bits=4 quantizes the head to 4-bit groups (8da4w), 8 per channel otherwise: the decoder is
    the same in both, so the 4-bit head's logits are the further from the unquantized model's."""
    record, model, ids = _joint_model(compressed_tiny)
    with torch.no_grad():
        reference = model(ids).logits
        error = {bits: (quantize_int4(model, record, 32, head_bits=bits)[0](ids).logits - reference).abs().mean()
                 for bits in (8, 4)}
    assert error[4] > 1.2 * error[8] > 0


def test_the_eager_int4_model_is_the_decomposed_ops_bit_for_bit_and_the_trace_keeps_them(compressed_tiny):
    """Run eagerly (the self-check's and validate's reference), the quantized linears and the 8-bit
    lookup compute code x scale in one pass, bit for bit what the decomposed ops give; traced, they
    still emit those ops, which XNNPACK's partitioner and the quantized lookup kernel match."""
    from rankdown.export.et_int4 import ByteEmbedding

    record, model, ids = _joint_model(compressed_tiny)
    quantized, _ = quantize_int4(model, record, 32, head_bits=8)
    ops = torch.ops.quantized_decomposed
    linears = [m for m in quantized.modules() if isinstance(m, DecomposedQuantLinear)]
    assert {m.per_channel for m in linears} == {True, False}  # the 8-bit head and the 4-bit groups
    for m in linears:
        assert torch.equal(m.dequantized(), m.decomposed_weight())
    lookup = quantized.model.embed_tokens
    assert isinstance(lookup, ByteEmbedding)
    with torch.no_grad():
        assert torch.equal(lookup(ids), ops.embedding_byte.default(lookup.weight, lookup.scales, None, -128, 127, ids))

    class LookupThenLinears(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lookup, self.head, self.grouped = lookup, quantized.lm_head, next(m for m in linears if not m.per_channel)

        def forward(self, tokens):
            hidden = self.lookup(tokens)
            return self.head(hidden), self.grouped(hidden[..., : self.grouped.weight.shape[1]])

    program = torch.export.export(LookupThenLinears(), (ids,), strict=True)
    targets = {str(node.target) for node in program.graph.nodes}
    for op in ("embedding_byte", "dequantize_per_channel.", "dequantize_per_channel_group"):
        assert any(op in target for target in targets), (op, targets)
    assert not {t for t in targets if t.startswith("aten.mul") or t.startswith("aten.sub")}, targets


@pytest.fixture(scope="session")
def joint_int4_bundle(compressed_tiny, tmp_path_factory):
    folder, _ = compressed_tiny["joint"]
    bundle = tmp_path_factory.mktemp("bundles") / "joint-int4"
    return folder, bundle, export(folder, bundle, ExportConfig(formats="executorch", max_seq_len=64, quantize="int4"),
                                  progress=quiet)


def test_int4_quantizes_odd_rank_pairs_and_keeps_top1(joint_int4_bundle, joint_bundle):
    """Ranks that are not multiples of the group are padded, not refused; shared downs still run
    once; the int4 self-check holds the .pte against the quantized PyTorch model it lowered (top-1
    >= 85%, |logit diff| <= 0.25 x scale), far closer than against the float model (top-1 >= 60%)."""
    folder, bundle, manifest = joint_int4_bundle
    record = FactorRecord.read(folder)
    assert any(spec.rank % 32 for spec in record.modules.values())
    entry = manifest.formats["executorch"]
    assert entry.quantize == "int4" and entry.parity.passed and entry.parity.top1_agreement >= 0.6
    lowering = entry.lowering
    assert lowering is not None and lowering.passed and lowering.top1_agreement >= 0.85
    # top-1 there counts near-ties; the same-token agreement is kept beside it, the float floor is strict
    assert lowering.top1_tie == 0.05 and 0.6 <= lowering.strict_top1_agreement <= lowering.top1_agreement
    assert entry.parity.top1_tie == 0.0 and entry.parity.strict_top1_agreement is None
    assert lowering.max_abs_logit_diff < 0.5 * entry.parity.max_abs_logit_diff
    assert entry.factor_nodes.found == entry.factor_nodes.expected == _expected_nodes(record)
    pte = (bundle / "executorch" / "model.pte").read_bytes()
    for op in CUSTOM_OPS:
        assert op in pte, op
    fp32 = sum(f.bytes for f in joint_bundle[2].formats["executorch"].files.values())
    assert sum(f.bytes for f in entry.files.values()) < 0.5 * fp32


def _group_linears(model) -> dict[str, DecomposedQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DecomposedQuantLinear) and not m.per_channel}


def test_int4_scales_are_hqq_by_default_symmetric_either_way_and_validate_rebuilds_the_same(compressed_tiny):
    """torchao's HQQ scale search by default, max |w| / 7.5 on request: both symmetric with codes in
    [-8, 7] (XNNPACK's kernels take no zero point), with different scales; validate rebuilds the
    model the .pte was lowered from with the scales the manifest records (absmax for a bundle made
    before the option)."""
    from types import SimpleNamespace

    from rankdown.validate.config import Runtime
    from rankdown.validate.harness import _lowered_model

    record, model, _ = _joint_model(compressed_tiny)
    assert ExportConfig().scales is Int4Scales.HQQ
    built = {hqq: _group_linears(quantize_int4(model, record, 32, hqq=hqq)[0]) for hqq in (True, False)}
    assert built[True].keys() == built[False].keys() and built[True]
    for linears in built.values():
        for layer in linears.values():
            assert not layer.zeros.any() and layer.weight.min() >= -8 and layer.weight.max() <= 7
    assert any(not torch.equal(built[True][n].scales, built[False][n].scales) for n in built[True])
    for options, hqq in (({"int4_scales": "hqq"}, True), ({"int4_scales": "absmax"}, False), ({}, False)):
        manifest = SimpleNamespace(options={"quantize": "int4", "group_size": 32, "balance": False} | options,
                                   formats={"executorch": SimpleNamespace(quantization={})})
        rebuilt = _group_linears(_lowered_model(model, record, manifest, Runtime("executorch"), None))
        assert all(torch.equal(rebuilt[n].scales, built[hqq][n].scales) for n in built[hqq]), options
