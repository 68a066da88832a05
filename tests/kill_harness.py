"""Kill rankdown at seeded byte offsets inside each artifact write; report what the final paths held.

    python tests/kill_harness.py MODEL_DIR WORK_DIR POINTS SEED  ->  one JSON line on stdout

Run by tests/test_reliability_faults.py in a fresh interpreter. Each stage runs for real
(compress, then export to ONNX and ExecuTorch); at the call that writes an artifact (the
safetensors writer, onnx.save for optimum's graph, onnx_ir.save for the fused graph, the .pte
writer, the manifest writer) this process forks
POINTS children. Each child sets RLIMIT_FSIZE to a seeded random N below the size that
call writes, restores SIGXFSZ's default action (Python ignores it) and re-enters the real
write: the kernel kills it at byte N, like a SIGKILL, with no handler or ``finally`` run.
After each kill the parent records whether the final path is absent, the previous complete
output, or anything else; then removes what the child wrote and carries on. Forking at the
write keeps each kill point cheap: the export before it runs once.
"""

from __future__ import annotations

import functools
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path

os.environ["FORCE_ONNX_EXTERNAL_DATA"] = "1"  # optimum writes .onnx + .onnx_data, as for a model over 2 GB

import onnx
import onnx_ir
import torch

torch.set_num_threads(1)  # no thread pool alive across fork

import rankdown.checkpoint as checkpoint
import rankdown.export.executorch as et_format
import rankdown.export.pipeline as export_pipeline
from rankdown.checkpoint import open_checkpoint
from rankdown.compress.config import CompressConfig, Healing
from rankdown.compress.pipeline import compress
from rankdown.errors import RankdownError
from rankdown.export.config import ExportConfig
from rankdown.export.manifest import MANIFEST_FILE, Manifest, verify_files
from rankdown.export.pipeline import export


def _temporary_root(path: Path) -> Path | None:
    return next((parent for parent in path.parents if ".tmp-" in parent.name), None)


def _state_of_bundle(final: Path, previous: bytes) -> str:
    if not final.exists():
        return "absent"
    try:
        manifest = Manifest.read(final)
        verify_files(final, manifest)
    except RankdownError:
        return "incomplete"
    return "previous" if (final / MANIFEST_FILE).read_bytes() == previous else "new"


def _state_of_checkpoint(final: Path, previous: bytes) -> str:
    if not final.exists():
        return "absent"
    try:
        open_checkpoint(final)
        report = (final / "compression.json").read_bytes()
    except (RankdownError, OSError):
        return "incomplete"
    return "previous" if report == previous else "new"


def forking(real, path_index: int, stage: str, points: int, rng: random.Random, state_of, results: list,
            copy_args=lambda args: args, wanted=lambda path: True):
    """``real`` wrapped so that its first call with a wanted path forks ``points`` kill points."""
    armed = [True]

    def wrapper(*args, **kwargs):
        target = Path(args[path_index])
        if not armed[0] or not wanted(target):
            return real(*args, **kwargs)
        armed[0] = False
        scratch = Path(tempfile.mkdtemp(prefix="kill-scratch-"))
        trial = list(copy_args(args))
        trial[path_index] = str(scratch / target.name) if isinstance(args[path_index], str) else scratch / target.name
        real(*trial, **kwargs)
        size = max(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
        shutil.rmtree(scratch)
        temporary = _temporary_root(target)
        root = temporary or target.parent
        before = set(root.rglob("*"))
        for _ in range(points):
            offset = rng.randrange(0, size)
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
                resource.setrlimit(resource.RLIMIT_FSIZE, (offset, resource.RLIM_INFINITY))
                try:
                    real(*copy_args(args), **kwargs)
                finally:
                    os._exit(99)  # not killed: the write never reached the offset
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXFSZ
            results.append({"stage": stage, "offset": offset, "size": size, "killed": killed, "final": state_of(),
                            "under_temporary": temporary is not None})
            for leftover in sorted(set(root.rglob("*")) - before, reverse=True):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        return real(*args, **kwargs)

    return wrapper


def main(model_dir: Path, work: Path, points: int, seed: int) -> dict:
    rng = random.Random(seed)
    results: list[dict] = []
    small = dict(calib_tokens=1024, seq_len=32, healing=Healing(steps=0))
    def quiet(_message: str) -> None:
        pass

    ckpt = work / "ckpt"
    compress(model_dir, ckpt, CompressConfig(method="svd", ratio=0.3, **small), progress=quiet)
    previous_report = (ckpt / "compression.json").read_bytes()
    checkpoint.save_file = forking(checkpoint.save_file, 1, "checkpoint", points, rng,
                                   lambda: _state_of_checkpoint(ckpt, previous_report), results)
    compress(model_dir, ckpt, CompressConfig(method="svd", ratio=0.4, overwrite=True, **small), progress=quiet)
    checkpoint_after = _state_of_checkpoint(ckpt, previous_report)

    bundle = work / "bundle"
    # The previous bundle: ONNX only, which is cheap; the run under test writes both formats over it.
    export(ckpt, bundle, ExportConfig(formats="onnx", check=False, onnx_graph="optimum"), progress=quiet)
    previous_manifest = (bundle / MANIFEST_FILE).read_bytes()
    state = functools.partial(_state_of_bundle, bundle, previous_manifest)

    def copy_model(args):
        model = onnx.ModelProto()
        model.CopyFrom(args[0])  # onnx.save moves tensors to external data in place
        return (model, *args[1:])

    onnx.save = forking(onnx.save, 1, "onnx", points, rng, state, results, copy_args=copy_model,
                        wanted=lambda p: p.name == "model.onnx" and p.parent.name == "onnx")
    et_format.write_program = forking(et_format.write_program, 1, "pte", points, rng, state, results)
    export_pipeline.write_text_atomic = forking(export_pipeline.write_text_atomic, 0, "manifest", points, rng, state,
                                                results, wanted=lambda p: p.name == MANIFEST_FILE)
    # optimum's graph: its writer is onnx.save, where these kill points are.
    manifest = export(ckpt, bundle, ExportConfig(max_seq_len=32, parity_new_tokens=8, check=False, overwrite=True,
                                                 onnx_graph="optimum"), progress=quiet)
    # The fused graph (the model builder's) is written by onnx_ir.save: killed over the bundle just written.
    state = functools.partial(_state_of_bundle, bundle, (bundle / MANIFEST_FILE).read_bytes())
    onnx_ir.save = forking(onnx_ir.save, 1, "onnx-fused", points, rng, state, results,
                           wanted=lambda p: p.name == "model.onnx")
    fused = export(ckpt, bundle, ExportConfig(formats="onnx", check=False, overwrite=True), progress=quiet)
    return {"results": results, "checkpoint_after": checkpoint_after, "bundle_after": state(),
            "external_data": sorted(manifest.formats["onnx"].files),
            "fused_files": sorted(fused.formats["onnx"].files),
            "leftovers": sorted(p.name for p in work.iterdir() if p.name.startswith("."))}

if __name__ == "__main__":
    model, work, count, seed = sys.argv[1:5]
    print(json.dumps(main(Path(model), Path(work), int(count), int(seed))))
