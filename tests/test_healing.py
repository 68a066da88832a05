"""Healing (--heal-steps): a short distillation of every factor pair on the task's training split."""

import pytest
import torch
from helpers import quiet
from safetensors.torch import load_file

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.compress import healing
from rankdown.compress.calibration import calibration_windows
from rankdown.compress.config import BasisTuning, CompressConfig, CompressionReport, Healing, HealingReport
from rankdown.compress.pipeline import compress
from rankdown.compress.training_data import mean_loss, training_windows
from rankdown.errors import RankdownError
from rankdown.tasks import Split, load_task

SMALL = dict(calib_tokens=2048, seq_len=64)


def tensors(folder) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found |= load_file(shard)
    return found


@pytest.fixture(scope="module")
def shipped_pair(shipped_model_dir, tmp_path_factory):
    """The shipped model, svd at 0.6 for math with uniform ranks (far from dense: error ranks leave a KL of
    0.04 there, little to heal), unhealed and healed 24 steps (seed 0)."""
    root = tmp_path_factory.mktemp("heal")
    base = dict(method="svd", ratio=0.6, task="math", calib_tokens=4096, allocate="uniform")
    plain = compress(shipped_model_dir, root / "plain", CompressConfig(**base, healing=Healing(steps=0)), progress=quiet)
    healed = compress(shipped_model_dir, root / "healed",
                      CompressConfig(**base, healing=Healing(steps=24, batch=8, seq_len=64, lr=5e-4)), progress=quiet)
    return root / "plain", plain, root / "healed", healed


def test_healing_lowers_loss_on_unseen_task_text_and_reports_it(shipped_model_dir, shipped_pair):
    plain_dir, plain, healed_dir, healed = shipped_pair
    h = healed.healing
    assert plain.healing is None and h is not None and h.steps == 24
    assert h.loss_after < h.loss_before and h.kl_after < h.kl_before
    assert CompressionReport.read(healed_dir).healing == h
    # Judged independently on the task's calibration split, which healing never reads.
    tokenizer = load_tokenizer(shipped_model_dir)
    unseen = calibration_windows(tokenizer, load_task("math", Split.CALIBRATION).texts, 64, 4096, "math")
    losses = [mean_loss(load_model(open_checkpoint(d)), unseen) for d in (shipped_model_dir, plain_dir, healed_dir)]
    dense, before, after = losses
    assert after < before - 0.2 * (before - dense), losses  # at least a fifth of the gap to dense closed


def test_healing_trains_both_factors_and_keeps_ranks_and_everything_else(shipped_pair):
    plain_dir, plain, healed_dir, healed = shipped_pair
    assert healed.modules == plain.modules and healed.params_after == plain.params_after
    before, after = tensors(plain_dir), tensors(healed_dir)
    assert before.keys() == after.keys()
    factors = [k for k in before if k.endswith((".down.weight", ".up.weight"))]
    assert len(factors) == 2 * sum(m.rank is not None for m in plain.modules.values()) > 0
    assert all(not torch.equal(before[k], after[k]) for k in factors)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in factors)


def test_healing_is_on_by_default_and_heal_steps_zero_turns_it_off(tiny_model_dir, tmp_path):
    """The default is the measured best (256 steps at 1e-4 beside error ranks: SmolLM2 at 20% removed, docs/measurements.md); the
    ranks are the same either way, only the factors are trained."""
    default = compress(tiny_model_dir, tmp_path / "default", CompressConfig(ratio=0.3, **SMALL), progress=quiet)
    zero = compress(tiny_model_dir, tmp_path / "zero", CompressConfig(ratio=0.3, healing=Healing(steps=0), **SMALL),
                    progress=quiet)
    assert default.healing is not None and (default.healing.steps, default.healing.lr) == (256, 1e-4)
    assert default.healing.loss_after < default.healing.loss_before
    assert zero.healing is None and default.modules == zero.modules
    healed, plain = tensors(tmp_path / "default"), tensors(tmp_path / "zero")
    assert healed.keys() == plain.keys() and any(not torch.equal(healed[k], plain[k]) for k in healed)


@pytest.mark.parametrize("extra", [dict(method="whiten"), dict(method="basis", basis_mode="tuned", tuning=BasisTuning(steps=6, batch=2)),
                                   dict(method="svd", tied=True)])
def test_held_weights_written_after_healing_equal_the_direct_write(tiny_tokenizer, tiny_model_dir, tmp_path,
                                                                   monkeypatch, extra):
    """The healing path's writing (strategy -> memory -> model -> pieces) loses or changes nothing:
    with the training step stubbed out, its checkpoint holds the direct path's tensors exactly."""
    from conftest import write_tiny_model

    extra = dict(extra)
    model_dir = write_tiny_model(tmp_path / "tied", tiny_tokenizer, tie_word_embeddings=True) \
        if extra.pop("tied", False) else tiny_model_dir
    base = dict(ratio=0.4, **SMALL, **extra)
    compress(model_dir, tmp_path / "direct", CompressConfig(**base, healing=Healing(steps=0)), progress=quiet)
    monkeypatch.setattr(healing, "heal", lambda *a, **k: HealingReport(1, 1, 2, 1.0, 0.0, 1, 1, 0, 0, 0, 0, 0, 0))
    compress(model_dir, tmp_path / "held", CompressConfig(**base, healing=Healing(steps=1, held_back=2)), progress=quiet)
    direct, held = tensors(tmp_path / "direct"), tensors(tmp_path / "held")
    assert direct.keys() == held.keys() and all(torch.equal(direct[k], held[k]) for k in direct)


def test_healing_repeats_with_the_seed(tiny_model_dir, tmp_path):
    cfg = CompressConfig(ratio=0.4, method="svd", healing=Healing(steps=3, batch=2, seq_len=32, held_back=2), **SMALL)
    reports = [compress(tiny_model_dir, tmp_path / name, cfg, progress=quiet) for name in ("a", "b")]
    assert reports[0].healing.loss_after == reports[1].healing.loss_after
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs,message", [(dict(steps=-1), "--heal-steps must be at least 0, got -1"),
                                            (dict(steps=2, lr=0.0), "--heal-lr must be positive"),
                                            (dict(steps=1.5), "whole number")])
def test_bad_healing_settings_are_clear_errors(kwargs, message):
    with pytest.raises(RankdownError, match=message):
        CompressConfig(healing=Healing(**kwargs))


def test_negative_heal_steps_is_a_one_line_error_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    from rankdown.cli import main

    status = main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--ratio", "0.3", "--heal-steps", "-1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "--heal-steps must be at least 0, got -1" in lines[0]
    assert not (tmp_path / "o").exists()


def test_heal_lr_reaches_the_report_and_a_bad_one_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    from rankdown.cli import main

    out = tmp_path / "lr"
    assert main(["compress", str(tiny_model_dir), "-o", str(out), "--ratio", "0.3", "--method", "svd", "--task", "math",
                 "--calib-tokens", "2048", "--heal-steps", "1", "--heal-lr", "2e-4"]) == 0
    assert CompressionReport.read(out).healing.lr == 2e-4
    status = main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--ratio", "0.3", "--heal-steps", "1",
                   "--heal-lr", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "--heal-lr must be positive" in lines[-1]
    assert not (tmp_path / "o").exists()


def test_held_back_windows_do_not_depend_on_the_steps(tiny_model_dir, tiny_tokenizer):
    """Runs of different lengths are judged on the same text: the first windows, never trained on."""
    ckpt = open_checkpoint(tiny_model_dir)

    def config(steps: int) -> CompressConfig:
        return CompressConfig(ratio=0.3, healing=Healing(steps=steps, batch=2, seq_len=32, held_back=2), **SMALL)

    short, long = (healing.teacher_targets(ckpt, tiny_tokenizer, config(steps), quiet) for steps in (4, 8))
    assert short.held_back == long.held_back == 2 and long.windows.shape[0] > short.windows.shape[0]
    assert torch.equal(short.windows[-2:], long.windows[-2:]) and torch.equal(short.log_probs[-2:], long.log_probs[-2:])
    assert torch.equal(long.windows[-2:], training_windows(tiny_tokenizer, config(1), 32, 2 * 32))


def test_a_healed_half_precision_checkpoint_says_its_own_dtype(tiny_tokenizer, tmp_path):
    """Healing loads the dense model in float32 first; the written config.json must still name the
    stored dtype in both of transformers' keys (it reads ``dtype`` before ``torch_dtype``)."""
    import json

    from conftest import write_tiny_model

    dense = write_tiny_model(tmp_path / "bf16", tiny_tokenizer, dtype=torch.bfloat16)
    compress(dense, tmp_path / "out", CompressConfig(ratio=0.4, healing=Healing(steps=2, batch=2, seq_len=32, held_back=2),
                                                     **SMALL), progress=quiet)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config.get("dtype", "bfloat16") == "bfloat16"
    assert {t.dtype for t in tensors(tmp_path / "out").values() if t.is_floating_point()} == {torch.bfloat16}


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_hardware_multiplies_it(monkeypatch, native, expected):
    monkeypatch.setattr(healing, "bf16_native", lambda device: native)
    cpu = torch.device("cpu")
    assert healing.training_precision(Healing(), cpu).value == expected
    assert healing.training_precision(Healing(precision="fp32"), cpu).value == "fp32"
    assert healing.training_precision(Healing(precision="bf16"), cpu).value == "bf16"
    # healing for int4 follows the hardware too, and an explicit precision wins
    assert healing.training_precision(Healing(quantize="int4"), cpu) is healing.training_precision(Healing(), cpu)
    assert healing.training_precision(Healing(quantize="int4", precision="fp32"), cpu).value == "fp32"
    assert healing.training_precision(Healing(quantize="int4", precision="bf16"), cpu).value == "bf16"


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_healing_runs_its_products_in_the_precision_it_reports(tiny_model_dir, tmp_path, monkeypatch, precision):
    """bf16: the training passes' products and the dense teacher's (but for the held-back windows,
    which the report's KL is judged on) run in bfloat16 under autocast, while judging runs in float32
    and the trained weights and AdamW's state stay float32; fp32: everything in float32."""
    seen: dict[str, list] = {"teacher": [], "student": []}
    real_heal, real_step = healing.heal, torch.optim.AdamW.step

    def hooked(model, role):
        def record(module, args, output):
            seen[role].append((torch.is_grad_enabled(), args[0].shape[0], output.dtype))  # judging: no grad
        return [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def step(optimizer, *args, **kwargs):
        out = real_step(optimizer, *args, **kwargs)
        state = [t for p in optimizer.param_groups[0]["params"] for t in (p, *optimizer.state[p].values())
                 if t.is_floating_point() and t.dim() > 0]
        assert state and {t.dtype for t in state} == {torch.float32}
        return out

    def heal(model, *args, **kwargs):
        handles = hooked(model, "student")
        try:
            return real_heal(model, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def load_dense(ckpt):
        model = load_model(ckpt)
        hooked(model, "teacher")
        return model

    monkeypatch.setattr(healing, "heal", heal)
    monkeypatch.setattr(healing, "load_model", load_dense)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    report = compress(tiny_model_dir, tmp_path / "out", CompressConfig(
        ratio=0.4, method="svd", healing=Healing(steps=4, batch=2, seq_len=32, held_back=2, lr=5e-4, precision=precision),
        **SMALL), progress=quiet)
    assert report.healing.precision == precision and report.healing.loss_after < report.healing.loss_before
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    training = {dtype for grad, _, dtype in seen["student"] if grad}
    judging = {dtype for grad, _, dtype in seen["student"] if not grad}
    assert training == {low} and judging == {torch.float32}
    # the teacher's batches: the training windows' in the healing precision, the two held-back ones in float32
    held = [dtype for _, batch, dtype in seen["teacher"] if batch == 2]
    assert {dtype for _, batch, dtype in seen["teacher"] if batch != 2} == {low} and set(held) == {torch.float32}


def test_heal_precision_reaches_the_report_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    from rankdown.cli import main

    out = tmp_path / "p"
    assert main(["compress", str(tiny_model_dir), "-o", str(out), "--ratio", "0.3", "--method", "svd", "--task", "math",
                 "--calib-tokens", "2048", "--heal-steps", "1", "--heal-precision", "fp32"]) == 0
    assert CompressionReport.read(out).healing.precision == "fp32"
    import json

    raw = json.loads((out / "compression.json").read_text())
    assert raw["schema_version"] == 8
    raw["schema_version"] = 4
    del raw["healing"]["precision"]  # a version-4 report: healed in float32, the only arithmetic it had
    (out / "compression.json").write_text(json.dumps(raw))
    assert CompressionReport.read(out).healing.precision == "fp32"
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--ratio", "0.3", "--heal-precision", "fp8"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_teachers_pass_reports_once_a_minute_and_a_short_one_only_its_summary(tiny_model_dir, tiny_tokenizer,
                                                                                 monkeypatch):
    """SmolLM2's teacher pass takes 8 minutes in fp32 on 2 cores: it says where it is each minute."""
    ckpt = open_checkpoint(tiny_model_dir)
    cfg = CompressConfig(ratio=0.3, healing=Healing(steps=40, batch=2, seq_len=32, held_back=2), **SMALL)
    said: list[str] = []
    healing.teacher_targets(ckpt, tiny_tokenizer, cfg, said.append)
    assert len(said) == 1 and said[0].startswith("healing: dense top-32 log-probs (")
    clock = iter(range(0, 10**6, 61))  # every reading a minute and a second after the last
    monkeypatch.setattr(healing.time, "perf_counter", lambda: float(next(clock)))
    said = []
    targets = healing.teacher_targets(ckpt, tiny_tokenizer, cfg, said.append)
    steps = [m for m in said[:-1] if m.startswith("healing: dense top-32 log-probs, ")]
    done = [int(m.split(", ")[1].split("/")[0]) for m in steps]
    assert len(steps) == len(said) - 1 >= 2 and done == sorted(done) and done[-1] < targets.windows.shape[0]
    assert all(f"/{targets.windows.shape[0]} windows in " in m for m in steps)
    assert said[-1].startswith("healing: dense top-32 log-probs (")
