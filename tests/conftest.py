"""Shared fixtures: a tiny random Llama (hidden 64, 2 layers, GQA) saved as a user would have it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rankdown.shipped import SHIPPED_MODEL
from rankdown.tasks import Split, load_task
from rankdown.train_shipped import train_tokenizer

torch.set_num_threads(int(os.environ.get("RANKDOWN_TEST_THREADS", "2")))


# The files that take longest, heaviest first: `make test` hands whole files to three workers
# (--dist loadfile), each taking the next as it runs low, in this order (--no-loadscope-reorder;
# xdist would otherwise order files by their number of tests). A heavy file started last is the
# run's tail: in the run of 2026-12-07 17:10 (pytest's wall per file under three workers on 2 cores,
# seconds: export 358, devices 184, int4_shipped 179, validate 151, head_rank 114, export_custom_ops
# 98, reliability_faults 97, cli 96, distributed 90, tied_embeddings 83, fake_quant 73,
# reliability_inputs 62, healing 39, onnx_int4 31) one worker had export and int4_shipped and ran
# 690 s while the others stopped at 515 and 564 s. The rest keep their collection order.
HEAVY_FIRST = ("test_export.py", "test_devices.py", "test_int4_shipped.py", "test_validate.py", "test_head_rank.py",
               "test_export_custom_ops.py", "test_reliability_faults.py", "test_cli.py", "test_distributed.py",
               "test_tied_embeddings.py", "test_fake_quant.py", "test_reliability_inputs.py", "test_healing.py",
               "test_onnx_int4.py")


def pytest_collection_modifyitems(config, items) -> None:
    stale = [name for name in HEAVY_FIRST if not (Path(__file__).parent / name).is_file()]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py: HEAVY_FIRST names files that are gone: {', '.join(stale)}")
    rank = {name: index for index, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def tiny_config(vocab_size: int, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    texts = list(load_task("math", Split.TRAIN).texts[:50]) + list(load_task("prose", Split.TRAIN).texts[:20])
    return train_tokenizer(texts, vocab_size=400)


def write_tiny_model(folder: Path, tokenizer, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), **overrides)).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tiny_tokenizer)


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    assert (SHIPPED_MODEL / "model.safetensors").is_file(), "the shipped model is missing from the checkout"
    return SHIPPED_MODEL


@pytest.fixture(scope="session")
def compressed_tiny(tiny_model_dir, tmp_path_factory):
    """Each method once at ratio 0.3 on the tiny model: method -> (folder, report)."""
    from rankdown.compress.config import CompressConfig, Healing
    from rankdown.compress.methods import METHODS
    from rankdown.compress.pipeline import compress

    root = tmp_path_factory.mktemp("compressed")
    out = {}
    for method in METHODS:
        folder = root / method.value
        report = compress(tiny_model_dir, folder,
                          CompressConfig(method=method, ratio=0.3, allocate="uniform", calib_tokens=2048, seq_len=64,
                                         healing=Healing(steps=0)),
                          progress=lambda _m: None)
        out[method.value] = (folder, report)
    return out


def _shared_dir(tmp_path_factory, worker_id: str) -> Path:
    """The folder every pytest-xdist worker of this run sees (the workers' temp folders' parent)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def _built_once(shared: Path, name: str, build) -> Path:
    """``shared / name``, filled by ``build(folder)`` in the first worker that asks for it; the
    others wait on its lock and reuse it. A worker that failed half-way leaves no marker."""
    from filelock import FileLock

    root = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (root / "built").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build(root)
            (root / "built").touch()
    return root


@pytest.fixture(scope="session")
def shipped_math_checkpoint(shipped_model_dir, tmp_path_factory, worker_id) -> Path:
    """The shipped model compressed for math (feature, 0.4, no healing), once per run."""
    from rankdown.compress.config import CompressConfig, Healing
    from rankdown.compress.pipeline import compress

    def build(root: Path) -> None:
        # uniform ranks: every decoder linear a factor pair, which the validator's tampering tests edit
        compress(shipped_model_dir, root / "ckpt",
                 CompressConfig(method="feature", ratio=0.4, task="math", allocate="uniform", healing=Healing(steps=0)),
                 progress=lambda _m: None)

    return _built_once(_shared_dir(tmp_path_factory, worker_id), "shipped-math-ckpt", build) / "ckpt"


@pytest.fixture(scope="session")
def shipped_math_bundle(shipped_math_checkpoint, tmp_path_factory, worker_id):
    """That checkpoint exported to both formats, fp32: the end-to-end artifact the slow tests share.
    Returns (checkpoint folder, bundle folder). Built once per run, not once per worker: the
    ExecuTorch lowering alone takes minutes on 2 cores, so a second worker waits on the lock for the
    first's; what needs only the checkpoint asks for ``shipped_math_checkpoint`` and does not wait."""
    from rankdown.export.config import ExportConfig
    from rankdown.export.pipeline import export

    def build(root: Path) -> None:
        # with the one-token method (off by default in fp32): TextLLMRunner is held to ignoring it
        export(shipped_math_checkpoint, root / "bundle", ExportConfig(decode_method=True), progress=lambda _m: None)

    shared = _shared_dir(tmp_path_factory, worker_id)
    return shipped_math_checkpoint, _built_once(shared, "shipped-math-bundle", build) / "bundle"


@pytest.fixture(scope="session")
def onnx_int4_bundles(compressed_tiny, tmp_path_factory):
    """The joint checkpoint (odd ranks, shared downs) to ONNX in fp32 and in int4: (folder, fp32, int4)."""
    from rankdown.export.config import ExportConfig
    from rankdown.export.pipeline import export

    folder, _ = compressed_tiny["joint"]
    root = tmp_path_factory.mktemp("onnx-int4")
    fp32 = export(folder, root / "fp32", ExportConfig(formats="onnx"), progress=lambda _m: None)
    int4 = export(folder, root / "int4", ExportConfig(formats="onnx", quantize="int4"), progress=lambda _m: None)
    return folder, (root / "fp32", fp32), (root / "int4", int4)


@pytest.fixture(scope="session")
def joint_bundle(compressed_tiny, tmp_path_factory, worker_id):
    """The joint (shared-down) checkpoint through both formats, fp32: the suite's one full export,
    with the one-token method (off by default in fp32) so that its tests have it to hold.
    Returns (checkpoint folder, bundle folder, manifest). Eight test files read it, so it is built
    once per run, not once per worker (half a minute of ExecuTorch lowering each time); the
    checkpoint it was exported from is copied beside it, so the pair stays one run's."""
    from rankdown.export.config import ExportConfig
    from rankdown.export.manifest import Manifest
    from rankdown.export.pipeline import export

    def build(root: Path) -> None:
        shutil.copytree(compressed_tiny["joint"][0], root / "ckpt")
        export(root / "ckpt", root / "bundle", ExportConfig(max_seq_len=128, decode_method=True), progress=lambda _m: None)

    root = _built_once(_shared_dir(tmp_path_factory, worker_id), "joint-bundle", build)
    return root / "ckpt", root / "bundle", Manifest.read(root / "bundle")


def checkpoint_tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint folder, single-file or sharded (compress writes shards)."""
    from safetensors.torch import load_file

    from rankdown.checkpoint import open_checkpoint

    tensors = {}
    for path in open_checkpoint(folder).weight_files:
        tensors.update(load_file(path))
    return tensors


def checkpoint_weight_bytes(folder: Path) -> dict[str, bytes]:
    """File name -> bytes of every weight file and the shard index, for byte-identical checks."""
    files = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.index.json"))
    return {p.name: p.read_bytes() for p in files}


def update_tensors(folder: Path, updates: dict) -> None:
    """Overwrite tensors in place, each in the file that holds it (new names go with the first).
    Reads the shard index itself: the folder may already be inconsistent on purpose."""
    import json

    from safetensors.torch import load_file, save_file

    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        home = {name: Path(folder) / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    else:
        home = {name: Path(folder) / "model.safetensors" for name in load_file(Path(folder) / "model.safetensors")}
    known = [home[n] for n in updates if n in home]
    default = known[0] if known else next(iter(home.values()))
    by_file: dict = {}
    for name, tensor in updates.items():
        by_file.setdefault(home.get(name, default), {})[name] = tensor
    for path, changed in by_file.items():
        tensors = load_file(path)
        tensors.update(changed)
        save_file(tensors, path, metadata={"format": "pt"})
