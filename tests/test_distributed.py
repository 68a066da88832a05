"""Compression over several worker processes (torch.distributed, gloo on loopback) and --device."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tensors
from helpers import quiet

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.compress.calibration import InputStats
from rankdown.compress.config import CompressConfig, CompressionReport, Healing
from rankdown.compress.distributed import Workers
from rankdown.compress.launch import worker_threads
from rankdown.compress.pipeline import compress
from rankdown.compress.units import BATCH
from rankdown.errors import RankdownError
from rankdown.evaluate import EvalConfig, evaluate
from rankdown.tasks import Split, load_task

# prose: more distinct tokens than the model's width, so no input covariance is singular and
# each truncation is unique (on math text the first layer's inputs span a few dozen embeddings,
# and factors past that rank are any basis of the null space).
SMALL = dict(task="prose", ratio=0.4, calib_tokens=2048, seq_len=64, healing=Healing(steps=0))
# error ranks with the default method (feature): both distributed passes (the dense profile that
# prices every rank, then the streaming pass that uniform ranks use too), the pooled covariance
# summed over workers, and ranks that move if any statistic does.
CHOSEN = SMALL | dict(allocate="error")
RANKDOWN = [sys.executable, "-m", "rankdown.cli"]


def _effective(tensors: dict, name: str) -> torch.Tensor:
    """A decoder linear's weight as the checkpoint computes it: up @ down, or the dense weight."""
    if f"{name}.weight" in tensors:
        return tensors[f"{name}.weight"].double()
    return tensors[f"{name}.up.weight"].double() @ tensors[f"{name}.down.weight"].double()


@pytest.fixture(scope="module")
def one_and_two(shipped_model_dir, tmp_path_factory):
    """The shipped model, compressed by one process and by two workers."""
    root = tmp_path_factory.mktemp("workers")
    # One process with the threads each worker gets: a sum split over other threads rounds otherwise.
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(2))
    try:
        one = compress(shipped_model_dir, root / "one", CompressConfig(**CHOSEN), progress=quiet)
    finally:
        torch.set_num_threads(threads)
    two = compress(shipped_model_dir, root / "two", CompressConfig(workers=2, **CHOSEN), progress=quiet)
    return root, one, two


def test_two_workers_give_the_one_process_ranks_factors_and_loss(one_and_two):
    root, one, two = one_and_two
    assert (one.workers, two.workers, two.device) == (1, 2, "cpu")
    assert {k: m.rank for k, m in one.modules.items()} == {k: m.rank for k, m in two.modules.items()}
    assert two.calibration_loss == pytest.approx(one.calibration_loss, rel=1e-6)  # summation order only
    assert two.allocation_check.keys() == one.allocation_check.keys()
    for key, value in one.allocation_check.items():
        assert two.allocation_check[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6))
    a, b = checkpoint_tensors(root / "one"), checkpoint_tensors(root / "two")
    assert a.keys() == b.keys()
    for name in one.modules:  # factor signs may differ between runs; their product may not
        # Summation order moves float32 statistics by ~1e-8 relative; a decomposition carries that
        # into single entries and the next layers, so the bound is on the whole matrix.
        difference = (_effective(b, name) - _effective(a, name)).norm() / _effective(a, name).norm()
        assert difference < 1e-4, (name, difference.item())
    for key in (k for k in a if k.endswith(".bias")):  # feature's bias comes from the summed means
        assert (b[key].double() - a[key].double()).norm() < 1e-4 * a[key].double().norm(), key
    for key in (k for k in a if "norm" in k or "embed" in k or "lm_head" in k):  # copied, not computed
        assert torch.equal(b[key], a[key]), key


def test_two_workers_keep_the_one_process_held_out_score(one_and_two):
    root, _, _ = one_and_two
    data = load_task("prose", Split.EVALUATION)
    scores = [evaluate(load_model(open_checkpoint(root / name)), load_tokenizer(root / name), data,
                       EvalConfig(max_tokens=2048, device="cpu")).perplexity for name in ("one", "two")]
    assert scores[1] == pytest.approx(scores[0], rel=1e-5)


def test_compression_json_records_workers_and_device(one_and_two):
    root, _, two = one_and_two
    read = CompressionReport.read(root / "two")
    assert read == two and read.workers == 2 and read.device == "cpu" and read.schema_version == 8
    assert read.config["workers"] == 2 and read.config["ratio"] == 0.4


def test_window_shares_are_whole_batches_that_sum_to_the_one_process_statistics():
    # Workers.sum_stats adds these same sums (the paired cross moment included) over the workers.
    windows = torch.arange(11 * BATCH + 3).unsqueeze(1)  # 12 batches, the last one short
    shares = [Workers(rank, 5).local_windows(windows) for rank in range(5)]
    assert torch.equal(torch.cat(shares), windows)
    assert all(s.shape[0] % BATCH == 0 for s in shares[:-1]) and all(s.shape[0] for s in shares)
    x = torch.randn(windows.shape[0], 4, 6, dtype=torch.float64) * torch.logspace(0, -2, 6)
    dense = x + 0.1 * x.flip(-1)  # the dense stream's inputs at the same positions (--correct-carried)
    whole, summed = InputStats(6, pooled=True, paired=True), InputStats(6, pooled=True, paired=True)
    for first in range(0, x.shape[0], BATCH):
        whole.add_group(x[first : first + BATCH], dense[first : first + BATCH])
    parts = []
    for share in shares:
        part = InputStats(6, pooled=True, paired=True)
        rows, dense_rows = x[share[:, 0]], dense[share[:, 0]]
        for first in range(0, rows.shape[0], BATCH):
            part.add_group(rows[first : first + BATCH], dense_rows[first : first + BATCH])
        parts.append(part)
    for field in ("xxt", "x_sum", "abs_sum", "pooled_cov_sum", "cross_sum"):
        setattr(summed, field, sum(getattr(p, field) for p in parts))
    summed.count, summed.groups = sum(p.count for p in parts), sum(p.groups for p in parts)
    assert (summed.count, summed.groups) == (whole.count, whole.groups)
    torch.testing.assert_close(summed.pooled_covariance, whole.pooled_covariance, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(summed.carried_correction, whole.carried_correction, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(summed.second_moment, whole.second_moment, rtol=1e-12, atol=1e-14)


def test_more_workers_than_batches_is_refused_in_one_line():
    with pytest.raises(RankdownError, match=r"^--workers 3: 16 calibration windows make only 2 batches"):
        Workers(0, 3).local_windows(torch.zeros(16, 4, dtype=torch.long))


@pytest.mark.parametrize("settings, message", [
    (dict(allocate="bayes"), r"^--workers 2: bayes ranks run in one process only \(distributed: uniform"),
    (dict(method="basis", basis_mode="tuned"), r"^--workers 2: tuned-basis ranks run in one process only"),
])
def test_strategies_that_run_in_one_process_refuse_workers_before_any_work(tiny_model_dir, tmp_path, settings,
                                                                          message):
    with pytest.raises(RankdownError, match=message):
        compress(tiny_model_dir, tmp_path / "out", CompressConfig(workers=2, **(SMALL | settings)), progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_workers_factor_and_one_process_heals_what_they_wrote(tiny_model_dir, tmp_path):
    """Healing trains the whole model, so with workers it runs once, in the process that started them,
    on the checkpoint they wrote beside the output; nothing of that staging folder is left."""
    base = SMALL | dict(workers=2)
    plain = compress(tiny_model_dir, tmp_path / "plain", CompressConfig(**base), progress=quiet)
    said: list[str] = []
    healed = compress(tiny_model_dir, tmp_path / "healed",
                      CompressConfig(**(base | dict(healing=Healing(steps=4, batch=2, seq_len=32, held_back=2)))),
                      progress=said.append)
    assert plain.healing is None and healed.healing is not None and healed.healing.steps == 4
    assert healed.workers == 2 and healed.modules == plain.modules
    assert healed.healing.loss_after < healed.healing.loss_before
    assert CompressionReport.read(tmp_path / "healed") == healed
    # the whole run's settings, not those of the workers' factoring stage (healing off, float32)
    assert healed.config["healing"]["steps"] == 4 and plain.config["healing"]["steps"] == 0
    a, b = checkpoint_tensors(tmp_path / "plain"), checkpoint_tensors(tmp_path / "healed")
    factors = [k for k in a if k.endswith((".down.weight", ".up.weight"))]
    assert factors and all(not torch.equal(a[k], b[k]) for k in factors)
    assert any(m.startswith("healing step 4/4") for m in said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed", "plain"]


def test_the_command_refuses_workers_with_bayes_in_one_line(tiny_model_dir, tmp_path):
    result = subprocess.run([*RANKDOWN, "compress", tiny_model_dir, "-o", tmp_path / "out", "--ratio", "0.4",
                             "--workers", "2", "--allocate", "bayes"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rankdown compress: error: --workers 2: bayes ranks run in one process only (distributed: uniform, error)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_workers_must_be_a_whole_number_of_at_least_one(value):
    with pytest.raises(RankdownError, match=r"^--workers must be a whole number of at least 1"):
        CompressConfig(workers=value)


def test_unknown_device_names_the_choices():
    with pytest.raises(RankdownError, match=r"^unknown --device 'gpu': choose one of auto, cpu, cuda$"):
        CompressConfig(device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal is for machines without CUDA")
def test_device_cuda_without_cuda_is_refused_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(RankdownError, match=r"^--device cuda: torch sees no CUDA GPU here"):
        compress(tiny_model_dir, tmp_path / "out", CompressConfig(device="cuda", **SMALL), progress=quiet)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RankdownError, match=r"^--device cuda: "):
        evaluate(load_model(open_checkpoint(tiny_model_dir)), load_tokenizer(tiny_model_dir),
                 load_task("prose", Split.EVALUATION), EvalConfig(device="cuda", max_tokens=64))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _is_worker(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "spawn_main" in command and "resource_tracker" not in command


def test_a_killed_worker_fails_the_run_in_one_line_and_leaves_nothing(shipped_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*RANKDOWN, "compress", shipped_model_dir, "-o", out, "--ratio", "0.4",
                             "--calib-tokens", "4096", "--workers", "2"],
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.stderr is not None
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("layer 1/"):  # worker 0 has begun writing its temporary folder
                workers = sorted(p for p in _children(proc.pid) if _is_worker(p))
                assert len(workers) == 2, workers
                os.kill(workers[-1], signal.SIGKILL)
                break
        lines += proc.stderr.read().splitlines()
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
    assert lines[-1].startswith("rankdown compress: error: worker "), lines[-3:]
    assert "killed by SIGKILL; the other workers were stopped and nothing was written" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder, no lock


def test_local_workers_are_refused_when_together_they_exceed_the_shared_memory_limit(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """Each worker checks its own estimate; workers started on one machine share its cgroup limit,
    so the launcher checks their sum before starting any."""
    import rankdown.compress.pipeline as pipeline
    import rankdown.memory as memory
    from rankdown.compress.pipeline import memory_estimate

    each = memory_estimate(open_checkpoint(tiny_model_dir), CompressConfig(workers=2, **SMALL))
    room = (int(1.5 * each), "the cgroup memory limit (test)")  # one worker fits, two do not
    monkeypatch.setattr(memory, "_cgroup_room", lambda: room)
    monkeypatch.setattr(pipeline, "launch", lambda *a: pytest.fail("workers were started"))
    with pytest.raises(RankdownError, match=r"compress with 2 workers on this machine needs about [\d.]+ GB of memory "
                                            r"together \([\d.]+ GB each\); the cgroup memory limit \(test\) leaves"):
        compress(tiny_model_dir, tmp_path / "out", CompressConfig(workers=2, **SMALL), progress=quiet)
    assert not (tmp_path / "out").exists()
