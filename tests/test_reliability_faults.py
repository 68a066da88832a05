"""Faults: kills at any byte, a full disk, outputs that overlap inputs,
re-runs and concurrent runs never leave a partial or mixed output under a final name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import checkpoint_weight_bytes
from helpers import quiet
from safetensors import SafetensorError

import rankdown.atomic as atomic
import rankdown.checkpoint as checkpoint
from rankdown.compress.config import CompressConfig, Healing
from rankdown.compress.pipeline import compress
from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.manifest import Manifest, verify_files
from rankdown.export.pipeline import export
from rankdown.output_lock import lock_path, output_lock
from rankdown.validate.config import ValidateConfig
from rankdown.validate.harness import validate

SMALL = dict(ratio=0.3, calib_tokens=512, seq_len=32, healing=Healing(steps=0))  # healing has its own tests

HERE = Path(__file__).parent


def tree_digest(folder: Path) -> str:
    """One hash over every file's relative name and bytes: an input is unchanged iff this is."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _debris(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


# kill points -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kill_run(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("kills")
    before = tree_digest(tiny_model_dir)
    result = subprocess.run([sys.executable, str(HERE / "kill_harness.py"), str(tiny_model_dir), str(work), "20", "7"],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_digest(tiny_model_dir) == before
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", ["checkpoint", "onnx", "onnx-fused", "pte", "manifest"])
def test_a_kill_at_any_byte_leaves_the_previous_output(kill_run, stage):
    points = [r for r in kill_run["results"] if r["stage"] == stage]
    assert len(points) >= 20
    assert len({r["offset"] for r in points}) >= 15, "kill offsets should spread over the file"
    assert all(r["killed"] for r in points), "a child survived: the kill landed after the write"
    assert all(r["under_temporary"] for r in points), "an artifact was written under its final name"
    assert [r["final"] for r in points] == ["previous"] * len(points)


def test_after_the_kills_the_run_completes_and_leaves_nothing_behind(kill_run):
    assert kill_run["checkpoint_after"] == "new" and kill_run["bundle_after"] == "new"
    assert {"onnx/model.onnx", "onnx/model.onnx_data"} <= set(kill_run["external_data"])  # optimum's graph (kill_harness.py)
    assert {"onnx/model.onnx", "onnx/model.onnx.data", "onnx/genai_config.json"} <= set(kill_run["fused_files"])
    assert kill_run["leftovers"] == []


_COMMIT_PROBE = r"""
import json, os, shutil, signal, sys
from pathlib import Path
import rankdown.atomic as atomic
from rankdown.output_lock import output_lock

root = Path(sys.argv[1]); out = root / "out"
if sys.argv[2] == "no-exchange":
    atomic._exchange = lambda a, b: False  # a file system without renameat2 RENAME_EXCHANGE

def write(word):
    with atomic.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text(word)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(word * 1000)

def state():
    if not out.exists():
        return "absent"
    a, b = out / "a.txt", out / "sub" / "b.txt"
    if a.is_file() and b.is_file() and b.read_text() == a.read_text() * 1000:
        return a.read_text()
    return "incomplete"

STEPS = [(os, "fsync"), (os, "rename"), (atomic, "_exchange"), (shutil, "rmtree")]
calls = []
def counting(module, name, kill_at=None):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        calls.append(name)
        if kill_at is not None and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, name, wrapper)
    return real

write("old")
reals = [counting(m, n) for m, n in STEPS]
write("new")
total = len(calls)
for (m, n), real in zip(STEPS, reals):
    setattr(m, n, real)
write("old")
results = []
for k in range(1, total + 2):
    calls.clear()
    pid = os.fork()
    if pid == 0:
        for m, n in STEPS:
            counting(m, n, kill_at=k)
        write("new")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    after_kill = state()
    leftovers = len(list(root.glob(".out.*")))
    with output_lock(out):
        atomic.remove_stale_temporaries(out)
    results.append({"step": k, "killed": killed, "after_kill": after_kill, "leftovers": leftovers,
                    "after_cleanup": state(), "debris": sorted(p.name for p in root.iterdir() if p.name != "out")})
    write("old")
print(json.dumps({"total": total, "results": results}))
"""


@pytest.mark.parametrize("mode", ["exchange", "no-exchange"])
def test_a_kill_at_each_commit_step_keeps_a_complete_output(tmp_path, mode):
    """Every boundary of the commit (each fsync, rename, exchange, removal), killed with SIGKILL:
    the final path holds the previous or the new output, complete; the next run into it removes
    the debris (and, without an atomic exchange, puts a moved-aside previous output back)."""
    result = subprocess.run([sys.executable, "-c", _COMMIT_PROBE, str(tmp_path), mode], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)
    assert probe["total"] >= 5
    states = set()
    for r in probe["results"]:
        assert r["after_cleanup"] in ("old", "new"), r
        assert r["debris"] == [], r
        if mode == "exchange":
            assert r["after_kill"] in ("old", "new"), r
        states.add(r["after_kill"])
    assert sum(r["killed"] for r in probe["results"]) == probe["total"]
    assert {"old", "new"} <= states


def test_validate_refuses_what_a_killed_export_left(joint_bundle, tmp_path):
    """A temporary folder a kill left has no manifest (it is written last); a copy with the
    manifest but a file cut short does not match it. Both are refused."""
    _, bundle, _ = joint_bundle
    partial = tmp_path / ".b.tmp-killed"
    shutil.copytree(bundle, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(RankdownError, match="not a rankdown bundle"):
        validate(partial, ValidateConfig(latency=None), progress=quiet)
    cut = tmp_path / "cut"
    shutil.copytree(bundle, cut)
    data = (cut / "onnx" / "model.onnx").read_bytes()
    (cut / "onnx" / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(RankdownError, match="onnx/model.onnx does not match the manifest"):
        validate(cut, ValidateConfig(latency=None), progress=quiet)


# disk full ---------------------------------------------------------------------------------

def test_pre_flight_refuses_when_the_disk_cannot_hold_the_output(tiny_model_dir, compressed_tiny, tmp_path, monkeypatch):
    import rankdown.compress.pipeline as compress_pipeline
    import rankdown.export.pipeline as export_pipeline

    class Tiny:
        free = 4096

    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _p: Tiny)
    monkeypatch.setattr(compress_pipeline, "load_tokenizer", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(export_pipeline, "load_model", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(RankdownError, match=r"out: out of space: the compressed checkpoint needs about \d+ MiB, 0 MiB free"):
        compress(tiny_model_dir, tmp_path / "out", CompressConfig(**SMALL), progress=quiet)
    folder, _ = compressed_tiny["svd"]
    with pytest.raises(RankdownError, match=r"b: out of space: the bundle needs about \d+ MiB"):
        export(folder, tmp_path / "b", ExportConfig(formats="onnx"), progress=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_disk_full_while_writing_weights_is_one_clean_error(tiny_model_dir, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own error type (text as a real 64 KiB tmpfs gave it)."""
    def fills_the_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    before = tree_digest(tiny_model_dir)
    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    out = tmp_path / "out"
    with pytest.raises(RankdownError, match=r"out: out of space writing .*out/\S+\.safetensors$"):
        compress(tiny_model_dir, out, CompressConfig(**SMALL), progress=quiet)
    assert not out.exists() and _debris(out) == []
    assert tree_digest(tiny_model_dir) == before


@pytest.mark.parametrize("graph", ["fused", "optimum"])
def test_disk_full_while_writing_onnx_is_one_clean_error(compressed_tiny, tmp_path, monkeypatch, graph):
    """The fused graph is written by onnx_ir.save (the model builder), optimum's by onnx.save."""
    import onnx
    import onnx_ir

    writer = onnx_ir if graph == "fused" else onnx
    real_save = writer.save

    def fills_the_disk(model, path, *args, **kwargs):
        if str(path).endswith("model.onnx"):
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(model, path, *args, **kwargs)

    folder, _ = compressed_tiny["svd"]
    before = tree_digest(folder)
    monkeypatch.setattr(writer, "save", fills_the_disk)
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")  # optimum's onnx.save path, as for a large model
    out = tmp_path / "b"
    with pytest.raises(RankdownError, match=r"b: out of space writing .*b/onnx/model.onnx"):
        export(folder, out, ExportConfig(formats="onnx", check=False, onnx_graph=graph), progress=quiet)
    assert not out.exists() and _debris(out) == []
    assert tree_digest(folder) == before


# outputs that overlap inputs ----------------------------------------------------------------

def _overlapping(case: str, model: Path, tmp_path: Path) -> Path:
    if case == "equal":
        return model
    if case == "inside":
        return model / "out"
    if case == "containing":
        return model.parent
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    return link if case == "symlink to the input" else link / "out"


CASES = ["equal", "inside", "containing", "symlink to the input", "inside through a symlink"]


@pytest.mark.parametrize("case", CASES)
def test_output_overlapping_the_input_is_refused_before_any_write(tiny_model_dir, compressed_tiny, tmp_path, case):
    models = tmp_path / "models"
    models.mkdir()
    dense = shutil.copytree(tiny_model_dir, models / "dense")
    source, _ = compressed_tiny["svd"]
    compressed = shutil.copytree(source, tmp_path / "c" / "svd")
    for model, run in ((dense, lambda out: compress(dense, out, CompressConfig(overwrite=True, **SMALL), progress=quiet)),
                       (compressed, lambda out: export(compressed, out, ExportConfig(formats="onnx", overwrite=True),
                                                       progress=quiet))):
        before = tree_digest(model.parent)
        out = _overlapping(case, model, tmp_path)
        with pytest.raises(RankdownError, match="output must not be, contain, or lie inside the input"):
            run(out)
        assert tree_digest(model.parent) == before
        if (tmp_path / "link").is_symlink():
            (tmp_path / "link").unlink()


def test_validate_report_inside_the_bundle_is_refused(joint_bundle, tmp_path):
    _, bundle, _ = joint_bundle
    copy = shutil.copytree(bundle, tmp_path / "b")
    before = tree_digest(copy)
    with pytest.raises(RankdownError, match="must not be written into, or around, the bundle"):
        validate(copy, ValidateConfig(latency=None, report_dir=copy / "report"), progress=quiet)
    assert tree_digest(copy) == before


# re-runs -----------------------------------------------------------------------------------

def test_rerun_export_is_byte_identical_with_no_stale_files(compressed_tiny, tmp_path, monkeypatch):
    folder, _ = compressed_tiny["svd"]
    bundle = tmp_path / "b"
    cfg = ExportConfig(formats="onnx", check=False)
    first = export(folder, bundle, cfg, progress=quiet)
    files = {rel: (bundle / rel).read_bytes() for rel in first.all_files()}
    assert "onnx/model.onnx.data" in files  # the builder's external data: the file that could grow by appends
    with pytest.raises(RankdownError, match="already exists"):
        export(folder, bundle, cfg, progress=quiet)
    (bundle / "onnx" / "stale.onnx_data").write_bytes(b"old shard")
    second = export(folder, bundle, ExportConfig(formats="onnx", check=False, overwrite=True), progress=quiet)
    assert set(second.all_files()) == set(files)
    for rel, data in files.items():
        assert (bundle / rel).read_bytes() == data, f"{rel} differs on re-export"
    assert not (bundle / "onnx" / "stale.onnx_data").exists()
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == \
        sorted(set(files) | {"manifest.json"})
    verify_files(bundle, Manifest.read(bundle))


def test_rerun_compress_is_byte_identical(tiny_model_dir, tmp_path):
    out = tmp_path / "c"
    compress(tiny_model_dir, out, CompressConfig(method="whiten", **SMALL), progress=quiet)
    first = checkpoint_weight_bytes(out)
    (out / "stray.safetensors").write_bytes(b"x")
    compress(tiny_model_dir, out, CompressConfig(method="whiten", overwrite=True, **SMALL), progress=quiet)
    assert checkpoint_weight_bytes(out) == first
    assert not (out / "stray.safetensors").exists()


# concurrent runs ---------------------------------------------------------------------------

def test_a_second_run_into_a_locked_output_fails_fast(tiny_model_dir, tmp_path, monkeypatch):
    import rankdown.compress.pipeline as compress_pipeline

    out = tmp_path / "out"
    monkeypatch.setattr(compress_pipeline, "open_checkpoint", lambda *a: pytest.fail("the locked run started work"))
    with output_lock(out):
        with pytest.raises(RankdownError, match="another rankdown run is writing it"):
            compress(tiny_model_dir, out, CompressConfig(**SMALL), progress=quiet)
    assert not lock_path(out).exists() and not out.exists()


def test_two_cli_runs_into_one_output_never_mix(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rankdown.cli", "compress", str(tiny_model_dir), "--ratio", "0.3", "-o", str(out),
               "--heal-steps", "0"]
    with output_lock(out):  # a run in progress, in this process: the CLI must give up at once
        start = time.monotonic()
        blocked = subprocess.run(command + ["--method", "svd"], capture_output=True, text=True, timeout=300)
        assert blocked.returncode == 2 and "Traceback" not in blocked.stderr
        assert blocked.stderr.strip().splitlines()[-1].startswith("rankdown compress: error:")
        assert "another rankdown run is writing it" in blocked.stderr
        assert time.monotonic() - start < 60
    runs = [subprocess.Popen(command + ["--method", method], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for method in ("svd", "joint")]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for proc in runs:
        proc.stdout.close()
        proc.stderr.close()
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err for code, err in outcomes if code == 2)
    assert "another rankdown run is writing it" in loser or "already exists" in loser
    report = json.loads((out / "compression.json").read_text())
    winner = "svd" if outcomes[0][0] == 0 else "joint"
    assert report["method"] == winner
    assert _debris(out) == []


def test_a_terminated_run_removes_its_temporary_output_and_lock(tiny_model_dir, tmp_path):
    """SIGTERM (a `kill`, a scheduler's stop) mid-run ends it as Ctrl-C does: one line, status 143,
    and neither the half-written folder nor the lock left beside the output."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rankdown.cli", "compress", str(tiny_model_dir), "--ratio", "0.3", "-o", str(out),
               "--heal-steps", "5000"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(name.startswith(f".{out.name}.tmp-") for name in _debris(out)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing its output"
        time.sleep(0.05)
    assert lock_path(out).exists()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "rankdown compress: terminated; nothing was written"
    assert "Traceback" not in stderr
    assert not out.exists() and _debris(out) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_take_the_users_umask_not_the_temporaries_owner_only_modes(tmp_path: Path, mask: int):
    """mkdtemp/mkstemp and the safetensors writer create owner-only paths; an output folder, its
    files and a report file get what ``open``/``mkdir`` under the user's umask would give."""
    import torch
    from safetensors.torch import save_file

    previous = os.umask(mask)
    try:
        with atomic.atomic_folder(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            atomic.write_text_atomic(tmp / "manifest.json", "{}")
            (tmp / "onnx").mkdir(mode=0o700)
        atomic.write_text_atomic(tmp_path / "report.json", "{}")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
             for p in [out, out / "model.safetensors", out / "manifest.json", out / "onnx", tmp_path / "report.json"]}
    assert modes == {"out": 0o777 & ~mask, "out/model.safetensors": 0o666 & ~mask, "out/manifest.json": 0o666 & ~mask,
                     "out/onnx": 0o777 & ~mask, "report.json": 0o666 & ~mask}


def test_granting_modes_follows_no_link_and_keeps_a_shared_folders_setgid(tmp_path: Path):
    """A link inside the output is not followed (the file it names keeps its mode), and under a
    setgid folder the output keeps the bit, as mkdir there would give it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    secret = tmp_path / "secret.txt"
    secret.write_text("mine")
    secret.chmod(0o600)
    with atomic.atomic_folder(shared / "out") as tmp:
        (tmp / "link").symlink_to(secret)
        (tmp / "sub").mkdir()
    assert secret.stat().st_mode & 0o7777 == 0o600
    assert (shared / "out").stat().st_mode & 0o2000 and (shared / "out" / "sub").stat().st_mode & 0o2000
