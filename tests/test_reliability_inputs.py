"""Untrusted input: hostile model folders, tokenizers and bundles are refused
with one line naming the file, before anything outside the folder is read or anything is written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import pytest
import torch
from conftest import checkpoint_tensors
from helpers import quiet
from safetensors.torch import load_file, save_file
from test_safetensors_check import CASES as MALFORMED

from rankdown.checkpoint import MAX_TOKENIZER_BYTES, load_model, load_tokenizer, open_checkpoint
from rankdown.compress.config import CompressConfig, Healing
from rankdown.compress.pipeline import compress
from rankdown.errors import RankdownError
from rankdown.export.manifest import MANIFEST_FILE, sha256_file
from rankdown.safetensors_check import read_header
from rankdown.validate.config import ValidateConfig
from rankdown.validate.harness import validate
from rankdown.validate.local_runner import LocalRunner
from rankdown.validate.on_device import JOB_SCHEMA

SMALL = dict(ratio=0.3, calib_tokens=512, seq_len=32, healing=Healing(steps=0))  # healing has its own tests



def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _refused_by_compress(folder, out, pattern):
    # svd: the cases below break its decomposition (torch.linalg.svd, the method's registry entry).
    with pytest.raises(RankdownError, match=pattern) as info:
        compress(folder, out, CompressConfig(method="svd", **SMALL), progress=quiet)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "compress left something behind"
    assert "\n" not in str(info.value)
    return str(info.value)


class _Payload:
    """Unpickling this writes the sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


# pickle -----------------------------------------------------------------------------------

def test_stray_pickle_beside_safetensors_is_never_read(tiny_model_dir, tmp_path, monkeypatch):
    folder = _copy(tiny_model_dir, tmp_path)
    sentinel = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    (folder / "training_args.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    ckpt = open_checkpoint(folder)
    assert ckpt.weight_files == [folder / "model.safetensors"]
    load_model(ckpt)
    compress(folder, tmp_path / "out", CompressConfig(**SMALL), progress=quiet)
    assert not sentinel.exists()
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()


# remote code ------------------------------------------------------------------------------

def test_remote_code_is_never_imported_whatever_the_environment_says(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    sentinel = tmp_path / "remote-code-ran"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(f"open({str(sentinel)!r}, 'w').write({name!r})\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    modules = tmp_path / "hf-modules"
    env = dict(os.environ, TRUST_REMOTE_CODE="1", HF_TRUST_REMOTE_CODE="1", TRANSFORMERS_TRUST_REMOTE_CODE="1",
               HF_HUB_TRUST_REMOTE_CODE="1", HF_MODULES_CACHE=str(modules), PYTHONPATH=os.pathsep.join(
                   [os.environ.get("PYTHONPATH", ""), str(folder)]))
    result = subprocess.run([sys.executable, "-m", "rankdown.cli", "eval", str(folder), "--eval", str(data)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "exact match" in result.stdout
    assert not sentinel.exists(), "repository Python was imported"
    assert not modules.exists() or not any(modules.rglob("*.py"))


# malformed safetensors --------------------------------------------------------------------

def _raw(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


CORPUS = dict(MALFORMED) | {
    "reversed offsets": _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4)),
    "out of order": _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "duplicate keys": (lambda blob: struct.pack("<Q", len(blob)) + blob + bytes(4))(
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
}


@pytest.mark.parametrize("case", sorted(CORPUS) + ["truncated at 50%"])
def test_malformed_weights_are_refused_before_any_output(tiny_model_dir, tmp_path, case):
    folder = _copy(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    if case == "truncated at 50%":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(CORPUS[case])
    message = _refused_by_compress(folder, tmp_path / "out", "model.safetensors: not a valid safetensors file")
    assert str(weights) in message


def test_a_huge_header_claim_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 90 * 2**20) + b"{" + b" " * 1024)  # claims 90 MiB, has 1 KiB
    tracemalloc.start()
    with pytest.raises(RankdownError, match="header claims"):
        read_header(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated for a refused header"


# sharded index traversal ------------------------------------------------------------------

_TRAVERSAL_PROBE = r"""
import json, shutil, sys
from pathlib import Path
folder, outside = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)) and outside.name in str(args[0]):
        opened.append(str(args[0]))
sys.addaudithook(hook)
from rankdown.checkpoint import open_checkpoint
from rankdown.errors import RankdownError
names = json.loads(sys.argv[3])
results = {}
for label, target in json.loads(sys.argv[4]).items():
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
    try:
        open_checkpoint(folder)
        results[label] = "accepted"
    except RankdownError as e:
        results[label] = str(e)
print(json.dumps({"results": results, "opened": opened}))
"""


def test_shard_paths_out_of_the_folder_are_refused_before_opening(tiny_model_dir, tmp_path):
    """A valid file with a canary tensor sits outside the folder; no index entry may reach it,
    and (audited in a fresh interpreter) it is never even opened."""
    folder = _copy(tiny_model_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    outside_dir = tmp_path / "elsewhere"
    outside_dir.mkdir()
    canary = outside_dir / "canary.safetensors"
    save_file(dict(tensors) | {"canary": torch.ones(3)}, canary)
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    (folder / "link.safetensors").symlink_to(canary)
    (folder / "subdir").symlink_to(outside_dir, target_is_directory=True)
    targets = {"dotdot": "../elsewhere/canary.safetensors", "absolute": str(canary), "link": "link.safetensors",
               "linked folder": "subdir/canary.safetensors"}
    result = subprocess.run([sys.executable, "-c", _TRAVERSAL_PROBE, str(folder), str(canary), json.dumps(list(tensors)),
                             json.dumps(targets)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    for label, message in probe["results"].items():
        assert "outside the model folder" in message or "is a link" in message, (label, message)
    assert probe["opened"] == [], "a file outside the model folder was opened"


def test_a_tensor_in_two_shards_is_refused(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({n: tensors[n] for n in first + [second[0]]}, folder / "a.safetensors")
    save_file({n: tensors[n] for n in second}, folder / "b.safetensors")
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {n: "a.safetensors" for n in first} | {n: "b.safetensors" for n in second}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused_by_compress(folder, tmp_path / "out", f"tensor '{second[0]}' is also in")


# config vs weights ------------------------------------------------------------------------

CONFIG_LIES = {
    "hidden size": ({"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}, "has shape"),
    "layer count (more)": ({"num_hidden_layers": 3}, "model.layers.2.* is missing|'model.layers.2"),
    "layer count (fewer)": ({"num_hidden_layers": 1}, "not in the model the config describes"),
    "vocab": ({"vocab_size": 512}, "embed_tokens.weight' has shape"),
    "tied embeddings": ({"tie_word_embeddings": True}, "ties the embeddings, but tensor 'lm_head.weight' differs"),
    "rope type": ({"rope_scaling": {"rope_type": "bogus", "factor": 2.0}}, "rope_scaling type 'bogus'"),
    "rope factor": ({"rope_scaling": {"rope_type": "linear", "factor": 0.5}}, "factor must be a number >= 1"),
    "rope not an object": ({"rope_scaling": "yes"}, "rope_scaling must be an object"),
    "rope theta": ({"rope_theta": -1}, "rope_theta must be a positive number"),
    "model type": ({"model_type": "mistral"}, "unsupported model type 'mistral'"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_LIES))
def test_config_that_disagrees_with_weights_fails_pre_flight(tiny_model_dir, tmp_path, monkeypatch, case):
    import rankdown.compress.pipeline as pipeline

    changes, pattern = CONFIG_LIES[case]
    folder = _copy(tiny_model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    # The first real work after the checks: reading the tokenizer, then building the model.
    for name in ("load_tokenizer", "skeleton_model"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: pytest.fail("work began before the config was checked"))
    message = _refused_by_compress(folder, tmp_path / "out", pattern)
    assert "config.json" in message or "model.safetensors" in message or str(folder) in message


def test_tied_config_with_an_identical_stored_head_is_accepted(tiny_tokenizer, tmp_path):
    from conftest import write_tiny_model

    folder = write_tiny_model(tmp_path / "tied", tiny_tokenizer, tie_word_embeddings=True)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors")
    model = load_model(open_checkpoint(folder))
    assert model.lm_head.weight is model.model.embed_tokens.weight


# non-finite and degenerate weights ------------------------------------------------------------

def test_non_finite_weight_is_named_and_nothing_is_written(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"][1, 2] = float("inf")
    save_file(tensors, folder / "model.safetensors")
    _refused_by_compress(folder, tmp_path / "out", "model.layers.0.self_attn.v_proj.weight' contains NaN or Inf")


def test_svd_that_does_not_converge_names_the_module(tiny_model_dir, tmp_path, monkeypatch):
    def no_convergence(*_a, **_k):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", no_convergence)
    message = _refused_by_compress(tiny_model_dir, tmp_path / "out", "decomposition failed: SVD did not converge")
    assert message.startswith("model.layers.0.mlp.down_proj")  # the widest input is decomposed first


def test_factors_reshaped_after_the_decomposition_name_the_module(tiny_model_dir, tmp_path, monkeypatch):
    """Under error ranks (the default), whiten's factors are re-balanced at the chosen rank (an SVD after the
    decomposition): its failure names the unit too, and nothing is written."""
    import rankdown.compress.whitening as whitening

    def no_convergence(*_a, **_k):
        raise ValueError("SVD did not converge: linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(whitening, "balanced_pair", no_convergence)
    out = tmp_path / "out"
    with pytest.raises(RankdownError, match=r"^model\.layers\.\d+\.\S+: factors at rank \d+ failed: SVD did not converge"):
        compress(tiny_model_dir, out, CompressConfig(method="whiten", **SMALL), progress=quiet)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_non_finite_factors_are_never_written(tiny_model_dir, tmp_path, monkeypatch):
    from rankdown.compress.config import Method
    from rankdown.compress.decomposition import Decomposition
    from rankdown.compress.methods import METHODS, MethodSpec

    def poisoned(unit):
        n = unit.in_features
        a = torch.full((n, n), float("nan"), dtype=torch.float64)
        return Decomposition(a=a, bs=[torch.zeros(w.shape[0], n, dtype=torch.float64) for w in unit.weights],
                             biases=unit.biases, energies=torch.zeros(n, dtype=torch.float64))

    monkeypatch.setitem(METHODS, Method.SVD, MethodSpec(poisoned, needs_data=False))
    _refused_by_compress(tiny_model_dir, tmp_path / "out", "refusing to write tensor .* NaN or Inf")


@pytest.mark.parametrize("method", ["svd", "whiten"])  # plain SVD, and a Cholesky of the input covariance
def test_rank_deficient_weights_give_finite_factors(tiny_model_dir, tmp_path, method):
    folder = _copy(tiny_model_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"].zero_()
    w = tensors["model.layers.1.mlp.up_proj.weight"]
    w.copy_(torch.outer(w[:, 0], torch.ones(w.shape[1])))  # rank 1
    save_file(tensors, folder / "model.safetensors")
    compress(folder, tmp_path / "out", CompressConfig(method=method, **SMALL), progress=quiet)
    for name, tensor in checkpoint_tensors(tmp_path / "out").items():
        assert torch.isfinite(tensor).all(), name


# tokenizer files --------------------------------------------------------------------------

def test_tokenizer_payloads_neither_execute_nor_escape(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    sentinel = tmp_path / "template-ran"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ cycler.__init__.__globals__.os.popen('touch " + str(sentinel) + "').read() }}"
                               "{% for m in messages %}{{ m.content }}{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert load_tokenizer(folder).bos_token_id is not None
    compress(folder, tmp_path / "out", CompressConfig(**SMALL), progress=quiet)
    assert not sentinel.exists(), "the chat template was rendered"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["out"])
    # shipped as inert text inside the output, nowhere else
    assert "cycler" in (tmp_path / "out" / "tokenizer_config.json").read_text()


@pytest.mark.parametrize("value", ["../other/tokenizer.json", "/tmp/elsewhere/tokenizer.json", "sub/tokenizer.json"])
def test_tokenizer_config_cannot_name_files_elsewhere(tiny_model_dir, tmp_path, value):
    """transformers takes ``tokenizer_file`` from tokenizer_config.json: unchecked, it loads a
    tokenizer from any path on the machine."""
    folder = _copy(tiny_model_dir, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_file"] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RankdownError, match="tokenizer_config.json: tokenizer_file .* points outside the model folder"):
        load_tokenizer(folder)


def test_an_outside_tokenizer_is_not_picked_up(tiny_model_dir, tmp_path, monkeypatch):
    """A plain name passes the check, but transformers resolves it against the working
    directory, not the model folder: the folder's tokenizer.json is passed explicitly, so a
    canary tokenizer in the working directory is never loaded."""
    folder = _copy(tiny_model_dir, tmp_path)
    other = json.loads((folder / "tokenizer.json").read_text())
    next_id = 1 + max([t["id"] for t in other["added_tokens"]] + list(other["model"]["vocab"].values()))
    other["added_tokens"].append({"id": next_id, "content": "CANARY", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "other.json").write_text(json.dumps(other))
    monkeypatch.chdir(cwd)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_file"] = "other.json"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert "CANARY" not in load_tokenizer(folder).get_vocab()


def test_oversized_tokenizer_is_refused_unread(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path)
    with open(folder / "tokenizer.json", "r+b") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)  # sparse: no disk, and never read
    with pytest.raises(RankdownError, match="tokenizer.json: larger than"):
        load_tokenizer(folder)


# tampered ONNX external data ----------------------------------------------------------------

class _Reached(Exception):
    pass


class _StopRunner:
    """A runner that records that a runtime would have been started, and stops there."""

    name, emulated = "local", False

    def run(self, job, bundle):
        raise _Reached(job["artifact"])


def _rehash(bundle, rel, fmt):
    """Re-sign a file in the manifest, as an attacker who edits both would."""
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    path = bundle / rel
    raw["formats"][fmt]["files"][rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def external_data_bundle(joint_bundle, tmp_path_factory):
    """The joint bundle with its ONNX weights moved to external data (as optimum writes them over
    2 GB), manifest updated: a valid bundle to tamper with."""
    _, bundle, _ = joint_bundle
    copy = tmp_path_factory.mktemp("extdata") / "bundle"
    shutil.copytree(bundle, copy)
    path = copy / "onnx" / "model.onnx"
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=1024)
    _rehash(copy, "onnx/model.onnx", "onnx")
    _rehash(copy, "onnx/model.onnx_data", "onnx")
    return copy


def _validate_onnx(bundle):
    return validate(bundle, ValidateConfig(runtimes="onnxruntime", latency=None, max_examples=2, max_tokens=64),
                    progress=quiet, runner=_StopRunner())


def test_an_intact_external_data_bundle_reaches_the_runtime(external_data_bundle):
    with pytest.raises(_Reached):
        _validate_onnx(external_data_bundle)


def _tamper_location(bundle, tmp_path, location=None, offset=None, length=None):
    target = tmp_path / "t"
    shutil.copytree(bundle, target, symlinks=True)
    path = target / "onnx" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location" and location is not None:
            entry.value = location
        if entry.key == "offset" and offset is not None:
            entry.value = offset
        if entry.key == "length" and length is not None:
            entry.value = length
    onnx.save(model, str(path))
    _rehash(target, "onnx/model.onnx", "onnx")
    return target


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "linked folder", "negative offset",
                                  "oversized length", "offset past the end", "unlisted file"])
def test_tampered_external_data_is_refused_before_the_runtime(external_data_bundle, tmp_path, case):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(1 << 16))
    size = (external_data_bundle / "onnx" / "model.onnx_data").stat().st_size
    if case == "dotdot":
        bundle, pattern = _tamper_location(external_data_bundle, tmp_path, location="../../secret.bin"), "points outside"
    elif case == "absolute":
        bundle, pattern = _tamper_location(external_data_bundle, tmp_path, location=str(secret)), "points outside"
    elif case == "symlink":
        bundle = _tamper_location(external_data_bundle, tmp_path, location="weights.bin")
        (bundle / "onnx" / "weights.bin").symlink_to(secret)
        pattern = "is a link"
    elif case == "linked folder":
        bundle = _tamper_location(external_data_bundle, tmp_path, location="sub/secret.bin")
        (bundle / "onnx" / "sub").symlink_to(tmp_path, target_is_directory=True)
        pattern = "is a link"
    elif case == "negative offset":
        bundle, pattern = _tamper_location(external_data_bundle, tmp_path, offset="-4096"), "not a non-negative"
    elif case == "oversized length":
        bundle, pattern = _tamper_location(external_data_bundle, tmp_path, length=str(size * 4)), "length"
    elif case == "offset past the end":
        bundle, pattern = _tamper_location(external_data_bundle, tmp_path, offset=str(size)), "beyond the end"
    else:
        bundle = _tamper_location(external_data_bundle, tmp_path, location="extra.bin")
        shutil.copy(bundle / "onnx" / "model.onnx_data", bundle / "onnx" / "extra.bin")
        pattern = "extra.bin, is not listed in the manifest"
    with pytest.raises(RankdownError, match=pattern) as info:
        _validate_onnx(bundle)
    assert "model.onnx" in str(info.value) and "\n" not in str(info.value)


# tampered .pte ------------------------------------------------------------------------------

def _tampered_pte(joint_bundle, tmp_path, case):
    _, bundle, _ = joint_bundle
    target = tmp_path / "b"
    shutil.copytree(bundle, target)
    pte = target / "executorch" / "model.pte"
    data = bytearray(pte.read_bytes())
    if case == "bad magic":
        data[4:8] = b"PK\x03\x04"
    elif case == "newer schema":
        data[4:8] = b"ET99"
    elif case == "truncated":
        data = data[: len(data) * 3 // 4]
    else:  # the first half after the header overwritten with random bytes
        data[64: len(data) // 2] = np.random.default_rng(7).integers(0, 256, len(data) // 2 - 64, dtype=np.uint8).tobytes()
    pte.write_bytes(bytes(data))
    _rehash(target, "executorch/model.pte", "executorch")
    return target


@pytest.mark.parametrize("case,pattern", [("bad magic", "not an ExecuTorch program"),
                                          ("newer schema", "schema ET99; the installed runtime reads ET12"),
                                          ("truncated", "truncated")])
def test_damaged_pte_headers_are_refused_on_the_host(joint_bundle, tmp_path, case, pattern):
    bundle = _tampered_pte(joint_bundle, tmp_path, case)
    with pytest.raises(RankdownError, match=pattern):
        validate(bundle, ValidateConfig(runtimes="executorch", latency=None), progress=quiet, runner=_StopRunner())


@pytest.mark.parametrize("case", ["overwritten half", "newer schema"])
def test_damaged_pte_is_a_clean_error_in_the_runtime_child(joint_bundle, tmp_path, case):
    """Past (or without) the host's header check, the runtime itself loads the file with full
    verification in a child process: a one-line error naming the artifact, never a crash here."""
    bundle = _tampered_pte(joint_bundle, tmp_path, case)
    job = {"schema_version": JOB_SCHEMA, "runtime": "executorch", "artifact": "executorch/model.pte",
           "parity": {"prompts": [[0, 5, 9]], "new_tokens": [2]}}
    with pytest.raises(RankdownError, match=r"executorch/model.pte: executorch failed \((exit status|killed by)") as info:
        LocalRunner(timeout_s=120).run(job, bundle)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
