"""Limits: models over 2 GiB, memory caps, dtypes, ranks and sequence
boundaries end in a result or a clean error, never a crash or a silent wrong answer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import checkpoint_tensors, update_tensors, write_tiny_model
from helpers import quiet
from onnx import TensorProto, helper

from rankdown.checkpoint import load_model, open_checkpoint, save_checkpoint
from rankdown.compress.config import CompressConfig, CompressionReport, Healing, Method
from rankdown.compress.methods import METHODS, MethodSpec
from rankdown.compress.pipeline import compress
from rankdown.errors import RankdownError
from rankdown.export.decoding import ExecuTorchDecoder, OnnxDecoder
from rankdown.export.onnx_files import check_onnx_model
from rankdown.info import format_info, model_info
from rankdown.safetensors_check import read_header
from rankdown.validate.local_runner import LocalRunner
from rankdown.validate.on_device import JOB_SCHEMA

SMALL = dict(ratio=0.3, calib_tokens=512, seq_len=32, healing=Healing(steps=0))  # healing has its own tests



# over 2 GiB --------------------------------------------------------------------------------

_LARGE_PROBE = r"""
import sys
from pathlib import Path
import onnx
from onnx import TensorProto, helper
from rankdown.export.onnx_files import check_onnx_model

root = Path(sys.argv[1])
sizes = {"big": 2**29 + 16, "second": 3 * 2**27}  # 2 GiB + 64 bytes, and 1.5 GiB more: 3.5 GiB in all
tensors, nodes, previous = [], [], "x"
for name, count in sizes.items():
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[count])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", name + ".bin"), ("offset", "0"), ("length", str(4 * count))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    with open(root / (name + ".bin"), "wb") as f:
        f.truncate(4 * count)  # sparse: no disk, no memory
    tensors.append(tensor)
    nodes.append(helper.make_node("ReduceSum", [name], [name + "_sum"], keepdims=0))
nodes.append(helper.make_node("Add", ["big_sum", "second_sum"], ["y"]))
graph = helper.make_graph(nodes, "large", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], tensors)
onnx.save(helper.make_model(graph), str(root / "model.onnx"))
files = check_onnx_model(root / "model.onnx", root)
print(sorted(p.name for p in files))
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) // 1024)
"""


def test_initializers_over_2_gib_are_checked_by_path_in_bounded_memory(tmp_path):
    """3.5 GiB of initializers (one tensor over 2 GiB) in external data: containment, the
    checker and shape inference all run by path, and the data is never read into memory."""
    result = subprocess.run([sys.executable, "-c", _LARGE_PROBE, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    files, peak_mb = result.stdout.strip().splitlines()[-2:]
    assert files == "['big.bin', 'second.bin']"
    assert int(peak_mb) < 1024, f"peak RSS {peak_mb} MB: the external data was read"


def test_an_empty_or_oversized_onnx_file_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(RankdownError, match="model.onnx: empty ONNX file"):
        check_onnx_model(tmp_path / "model.onnx", tmp_path)
    with open(tmp_path / "model.onnx", "wb") as f:
        f.truncate(2**31 + 1)  # sparse
    with pytest.raises(RankdownError, match="must keep its weights as external data"):
        check_onnx_model(tmp_path / "model.onnx", tmp_path)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([], "empty", [x], [x])), str(tmp_path / "model.onnx"))
    with pytest.raises(RankdownError, match="the ONNX graph has no nodes"):
        check_onnx_model(tmp_path / "model.onnx", tmp_path)


# memory caps --------------------------------------------------------------------------------

_MEMORY_PROBE = r"""
import resource, sys
from pathlib import Path
import rankdown.compress.pipeline, rankdown.export.pipeline  # the libraries are resident before the cap
from rankdown.cli import main

def vm_size():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

def cap(extra_mb):
    limit = vm_size() + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

shipped, tiny, compressed, out = sys.argv[1:5]
cap(100)
codes = [main(["compress", shipped, "--method", "feature", "--ratio", "0.4", "-o", out + "/shipped"]),
         main(["export", compressed, "--format", "onnx", "-o", out + "/bundle"])]
cap(1500)
from rankdown.compress.config import CompressConfig, Healing
rankdown.compress.pipeline.compress(tiny, out + "/tiny", CompressConfig(method="svd", ratio=0.3, calib_tokens=512, seq_len=32,
                                                                  healing=Healing(steps=0)), progress=lambda _m: None)
print(codes)
"""


def test_under_a_memory_cap_runs_fail_early_or_finish(shipped_model_dir, tiny_model_dir, compressed_tiny, tmp_path):
    compressed, _ = compressed_tiny["svd"]
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(shipped_model_dir), str(tiny_model_dir),
                             str(compressed), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[2, 2]"
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 2, result.stderr[-3000:]
    assert "rankdown compress: error:" in errors[0]
    from rankdown.compress.config import Healing

    assert f"compress with {Healing.steps} healing steps (--heal-steps 0 skips healing) needs about 0." in errors[0]
    assert "the ulimit -v limit" in errors[0]
    assert "rankdown export: error:" in errors[1] and "export needs about 0." in errors[1]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert CompressionReport.read(tmp_path / "tiny").peak_memory_mb > 0


def test_peak_rss_per_stage_is_in_the_manifest(joint_bundle):
    _, _, manifest = joint_bundle
    peaks = manifest.peak_rss_mb
    assert set(peaks) == {"load", "onnx", "executorch"}
    assert 0 < peaks["load"] <= peaks["onnx"] <= peaks["executorch"]


# dtypes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,stored", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_precision_checkpoints_compress_in_float64_and_round_trip_bit_exact(tiny_tokenizer, tmp_path, monkeypatch,
                                                                                 dtype, stored):
    seen = []
    real = METHODS[Method.WHITEN]

    def spy(unit):
        seen.extend([w.dtype for w in unit.weights] + [unit.stats.second_moment.dtype])
        return real.decompose(unit)

    monkeypatch.setitem(METHODS, Method.WHITEN, MethodSpec(spy, needs_data=True))
    folder = write_tiny_model(tmp_path / "half", tiny_tokenizer, dtype=dtype)
    out = tmp_path / "out"
    compress(folder, out, CompressConfig(method="whiten", **SMALL), progress=quiet)
    assert seen and set(seen) == {torch.float64}
    assert {entry.dtype for path in open_checkpoint(out).weight_files for entry in read_header(path).values()} == {stored}
    model = load_model(open_checkpoint(out), dtype=dtype)
    again = save_checkpoint(model, out, tmp_path / "again", dtype=dtype)
    first, second = checkpoint_tensors(out), checkpoint_tensors(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == dtype
        assert torch.equal(first[name].view(torch.int16), second[name].view(torch.int16)), name


# ranks -------------------------------------------------------------------------------------

@pytest.fixture()
def svd_copy(compressed_tiny, tmp_path):
    folder, _ = compressed_tiny["svd"]
    return shutil.copytree(folder, tmp_path / "svd")


def _set_rank(folder: Path, module: str, rank) -> None:
    record = json.loads((folder / "factorization.json").read_text())
    record["modules"][module]["rank"] = rank
    (folder / "factorization.json").write_text(json.dumps(record))


@pytest.mark.parametrize("rank", [0, -3, 2.5, "8", 65, True])
def test_impossible_ranks_in_a_checkpoint_are_clean_errors(svd_copy, rank):
    _set_rank(svd_copy, "model.layers.0.self_attn.o_proj", rank)
    with pytest.raises(RankdownError, match=r"factorization.json: (module model.layers.0.self_attn.o_proj has rank .* "
                                            r"outside 1\.\.64|invalid factorization record)"):
        open_checkpoint(svd_copy)


def test_a_factorization_naming_an_unknown_module_is_a_clean_error(svd_copy):
    record = json.loads((svd_copy / "factorization.json").read_text())
    record["modules"]["model.layers.7.mlp.up_proj"] = record["modules"]["model.layers.0.mlp.up_proj"]
    (svd_copy / "factorization.json").write_text(json.dumps(record))
    with pytest.raises(RankdownError, match="names model.layers.7.mlp.up_proj, which the model does not have"):
        open_checkpoint(svd_copy)


def test_a_rank_above_break_even_is_loaded_with_an_explicit_warning(svd_copy):
    module = "model.layers.0.self_attn.o_proj"  # 64 x 64: break-even rank 32
    _set_rank(svd_copy, module, 40)
    update_tensors(svd_copy, {f"{module}.down.weight": torch.randn(40, 64), f"{module}.up.weight": torch.randn(64, 40)})
    info = model_info(open_checkpoint(svd_copy))
    assert info.warnings == [f"{module}: rank 40 is above the break-even rank 32; the pair stores 5,120 parameters, "
                             "more than the dense layer's 4,096"]
    assert "warning: model.layers.0.self_attn.o_proj: rank 40" in format_info(info)


@pytest.mark.parametrize("method", [m.value for m in METHODS])
def test_reported_parameter_counts_match_the_files(compressed_tiny, method):
    """compression.json, ``info`` and the tensors on disk agree; no chosen rank is above break-even."""
    folder, report = compressed_tiny[method]
    stored = checkpoint_tensors(folder)
    on_disk = sum(t.numel() for n, t in stored.items()
                  if n.startswith("model.layers.") and (".self_attn." in n or ".mlp." in n) and "proj" in n)
    info = model_info(open_checkpoint(folder))
    assert on_disk == report.params_after == info.decoder_linear_params
    assert info.warnings == []
    for name, module in report.modules.items():
        shared = method == "joint" and name.endswith(("q_proj", "k_proj", "gate_proj", "up_proj"))
        if module.rank is not None and not shared:
            assert module.rank * (module.in_features + module.out_features) < module.in_features * module.out_features


# sequence boundaries -----------------------------------------------------------------------

def _torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def joint_model(joint_bundle):
    folder, bundle, _ = joint_bundle
    return load_model(open_checkpoint(folder)).eval(), bundle


@pytest.mark.parametrize("runtime", ["onnx", "executorch"])
def test_prefill_and_decode_at_the_boundaries_match_torch(joint_model, runtime):
    model, bundle = joint_model
    decoder = (OnnxDecoder(bundle / "onnx" / "model.onnx") if runtime == "onnx"
               else ExecuTorchDecoder(bundle / "executorch" / "model.pte"))
    limit = decoder.max_positions
    assert limit == (256 if runtime == "onnx" else 128)  # trained context / static cache
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, model.config.vocab_size, limit + 1)]
    for length in (1, 2, 37, limit - 1):  # the longest prompt leaves one position for a decode step
        np.testing.assert_allclose(decoder.prefill(tokens[:length]), _torch_logits(model, tokens[:length]), atol=1e-4)
    # decode at position limit - 1, the last one: parity with PyTorch over the whole sequence
    step = decoder.step(tokens[limit - 1])
    np.testing.assert_allclose(step, _torch_logits(model, tokens[:limit])[-1], atol=1e-4)
    with pytest.raises(ValueError, match=f"1 tokens at position {limit} exceed the artifact's {limit} positions"):
        decoder.step(tokens[limit])
    with pytest.raises(ValueError, match="exceed the artifact"):
        decoder.prefill(tokens[: limit + 1])
    # the refused calls left the decoder usable
    np.testing.assert_allclose(decoder.prefill(tokens[:5]), _torch_logits(model, tokens[:5]), atol=1e-4)


def test_a_job_past_the_limit_is_a_clean_error_from_the_runtime_child(joint_bundle):
    _, bundle, _ = joint_bundle
    job = {"schema_version": JOB_SCHEMA, "runtime": "onnxruntime", "artifact": "onnx/model.onnx",
           "parity": {"prompts": [list(range(3, 203))], "new_tokens": [100]}}
    with pytest.raises(RankdownError, match=r"onnx/model.onnx: onnxruntime failed \(exit status 1\): on_device: error: "
                                            r"ValueError: prompt of 200 \+ 100 new tokens exceeds the artifact's 256"):
        LocalRunner(timeout_s=120).run(job, bundle)
