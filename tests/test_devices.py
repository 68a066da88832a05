"""devices/: profiles, and the ssh transport against a real sshd on loopback."""

from __future__ import annotations

import dataclasses
import getpass
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import quiet

from rankdown.devices.profile import PROFILE_DIR, ExecuTorchRunner, Transport, find_profile, load_profile, shipped_profiles
from rankdown.devices.runners import runner_for
from rankdown.errors import RankdownError
from rankdown.export.manifest import Manifest
from rankdown.validate.config import LatencyPlan, ValidateConfig
from rankdown.validate.harness import validate


def test_shipped_profiles_load():
    profiles = shipped_profiles()
    assert {"local-cpu", "linux-board-ssh", "arm64-emu", "android-arm64-adb"} <= set(profiles)
    assert profiles["local-cpu"].transport.kind is Transport.LOCAL
    native = profiles["local-cpu-native"]
    assert (native.transport.kind, native.executorch_runner, native.runtimes) == \
        (Transport.LOCAL, ExecuTorchRunner.NATIVE, ("executorch",))
    assert profiles["linux-board-ssh"].transport.kind is Transport.SSH
    assert profiles["arm64-emu"].transport.kind is Transport.ARM64_EMU
    assert (profiles["arm64-emu"].transport.cpu, profiles["arm64-emu-a72"].transport.cpu) == (None, "cortex-a72")
    assert profiles["android-arm64-adb"].transport.kind is Transport.ADB
    assert profiles["android-arm64-adb"].transport.remote_dir == "/data/local/tmp/rankdown"
    assert profiles["android-arm64-adb"].executorch_runner is ExecuTorchRunner.NATIVE
    assert find_profile("local-cpu") == profiles["local-cpu"]
    assert find_profile(str(PROFILE_DIR / "local-cpu.toml")).name == "local-cpu"


@pytest.mark.parametrize("text,pattern", [
    ("name = 'x'\n[transport\n", "not a valid TOML device profile"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\ncolour='red'\n[transport]\nkind='local'\n",
     "unknown keys ['colour']"),
    ("name='x'\narch='a'\nruntimes=['tflite']\nthreads=1\nmemory_mb=1\n[transport]\nkind='local'\n",
     "runtimes: 'tflite' is not one of ['onnxruntime', 'executorch', 'onnxruntime-genai']"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads='2'\nmemory_mb=1\n[transport]\nkind='local'\n",
     "threads: expected int, got str"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\n[transport]\nkind='pigeon'\n",
     "transport.kind: 'pigeon' is not one of ['local', 'ssh', 'adb', 'arm64-emu']"),
    ("name='x'\narch='a'\nruntimes=['executorch']\nthreads=1\nmemory_mb=1\nexecutorch_runner='jit'\n[transport]\nkind='local'\n",
     "executorch_runner: 'jit' is not one of ['python', 'native']"),
    ("name='x'\narch='a'\nruntimes=['executorch']\nthreads=1\nmemory_mb=1\nexec_wrapper=[1]\n[transport]\nkind='local'\n",
     "exec_wrapper: expected str, got int"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\n[transport]\nkind='ssh'\n",
     "an ssh transport needs a host"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\n[transport]\nkind='ssh'\nhost='h'\ncpu='cortex-a72'\n",
     "transport.cpu applies to an arm64-emu transport only"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\n[transport]\nkind='arm64-emu'\ncpu='z80'\n",
     "transport.cpu 'z80' is not one of cortex-a72"),
    ("arch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\n[transport]\nkind='local'\n", "missing keys ['name']"),
])
def test_bad_profiles_are_clear_errors(tmp_path, text, pattern):
    path = tmp_path / "dev.toml"
    path.write_text(text)
    with pytest.raises(RankdownError, match=pattern.replace("[", r"\[").replace("]", r"\]")) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_unknown_device_names_the_choices():
    with pytest.raises(RankdownError, match="unknown device 'pixel-99': choose one of .*local-cpu"):
        find_profile("pixel-99")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real OpenSSH server on loopback, key authentication only, for this module."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    assert Path(binary).exists(), "openssh-server is needed (make test installs it)"
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
                      f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
                      f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
                      f"PidFile {root / 'sshd.pid'}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory sshd insists on
    server = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert server.poll() is None, server.stderr.read().decode()
        time.sleep(0.1)
    profile = root / "loopback.toml"
    remote_dir = root / "remote"
    profile.write_text(
        "name = 'loopback-ssh'\ndescription = 'this machine through sshd'\narch = 'host'\n"
        "runtimes = ['onnxruntime']\nthreads = 2\nmemory_mb = 4096\n[transport]\nkind = 'ssh'\n"
        f"host = '127.0.0.1'\nport = {port}\nuser = '{getpass.getuser()}'\nidentity = '{root / 'client_key'}'\n"
        f"python = '{sys.executable}'\nremote_dir = '{remote_dir}'\n"
        "options = { StrictHostKeyChecking = 'no', UserKnownHostsFile = '/dev/null', LogLevel = 'ERROR' }\n")
    yield profile, remote_dir
    server.terminate()
    server.wait(timeout=10)


def test_ssh_transport_round_trips_a_bundle_and_report(sshd, joint_bundle):
    profile_path, remote_dir = sshd
    _, bundle, _ = joint_bundle
    profile = load_profile(profile_path)
    report = validate(bundle, ValidateConfig(runtimes=profile.runtimes, threads=profile.threads, max_examples=5,
                                             max_tokens=256, latency=LatencyPlan(prompt_lengths=(8,), decode_tokens=4,
                                                                                 repeats=1)),
                      progress=quiet, runner=runner_for(profile))
    assert report.passed, report.failures
    device = report.environment.device
    assert (device.name, device.transport, device.emulated) == ("loopback-ssh", "ssh", False)
    r = report.runtimes["onnxruntime"]
    assert r.parity.greedy_match and r.latency.decode_tokens_per_s.median > 0
    assert list(remote_dir.iterdir()) == []  # the device is left clean


def test_cli_validate_on_a_device_profile(sshd, joint_bundle):
    profile_path, _ = sshd
    _, bundle, _ = joint_bundle
    result = subprocess.run([sys.executable, "-m", "rankdown.cli", "validate", str(bundle), "--device",
                             str(profile_path), "--no-latency", "--max-examples", "3"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "device: loopback-ssh" in result.stdout and "passed" in result.stdout


def test_unreachable_ssh_device_is_one_clear_error(tmp_path, joint_bundle):
    _, bundle, _ = joint_bundle
    path = tmp_path / "gone.toml"
    path.write_text("name='gone'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\n[transport]\n"
                    f"kind='ssh'\nhost='127.0.0.1'\nport={_free_port()}\n")
    with pytest.raises(RankdownError, match="ssh 127.0.0.1: pushing the bundle failed"):
        validate(bundle, ValidateConfig(runtimes="onnxruntime", latency=None, max_examples=1, max_tokens=64),
                 progress=quiet, runner=runner_for(load_profile(path)))


# --- the C++ ExecuTorch runner, the arm64-emu device and adb -----------------------------------

SMALL = dict(max_examples=3, max_tokens=256, latency=None)


def _profile(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"name = '{name}'\n{body}")
    return path


def test_native_runner_matches_the_python_runtime(joint_bundle):
    """Same tokens; logits equal up to float summation order (the runner carries its own kernels
    for ExecuTorch's attention ops, devices/et_runner/llm_kernels.cpp)."""
    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import ExecuTorchDecoder, NativeExecuTorchDecoder, greedy

    _, bundle, _ = joint_bundle
    pte = bundle / "executorch" / "model.pte"
    native = NativeExecuTorchDecoder(pte, [str(build_runner(progress=quiet) / "bin" / BINARY)], threads=1)
    python = ExecuTorchDecoder(pte)
    assert native.max_positions == python.max_positions == 128
    for prompt in ([5], [5, 9, 30, 7, 12, 40, 3]):
        a, b = greedy(native, prompt, 12), greedy(python, prompt, 12)
        assert a.tokens == b.tokens
        assert np.abs(a.prompt_logits - b.prompt_logits).max() < 1e-4
        assert np.abs(a.step_logits - b.step_logits).max() < 1e-4
    assert native.close() > 1.0  # its own peak RSS, in MB


def test_native_runner_feeds_each_position_layout(tmp_path):
    """rankdown's forward takes input_pos[1] (the first position), optimum-executorch's cache_position[n]
    (every position of the call); the runner tells them apart by the input's size, as ExecuTorch's LLM
    runner does. Each program here answers token * 1000 + the position it was given, per token."""
    import torch
    from executorch.exir import to_edge

    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import NativeExecuTorchDecoder

    class Echo(torch.nn.Module):
        def forward(self, tokens, positions):
            return (tokens.float() * 1000 + positions.float()).unsqueeze(-1)

    n = torch.export.Dim("n", max=16)
    layouts = {"input_pos": ((torch.ones(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)),
                             ({1: n}, None)),
               "cache_position": ((torch.ones(1, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
                                  ({1: n}, {0: n}))}
    expected = {"input_pos": ([7000, 8000, 9000], 5003), "cache_position": ([7000, 8001, 9002], 5003)}
    runner = [str(build_runner(progress=quiet) / "bin" / BINARY)]
    for name, (args, shapes) in layouts.items():
        pte = tmp_path / f"{name}.pte"
        pte.write_bytes(to_edge(torch.export.export(Echo(), args, dynamic_shapes=shapes)).to_executorch().buffer)
        decoder = NativeExecuTorchDecoder(pte, runner)
        assert decoder.prefill([7, 8, 9])[:, 0].tolist() == expected[name][0], name
        assert decoder.step(5).tolist() == [expected[name][1]], name
        decoder.close()


def test_native_runner_refuses_a_broken_pte_in_one_line(tmp_path, joint_bundle):
    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import NativeExecuTorchDecoder

    _, bundle, _ = joint_bundle
    bad = tmp_path / "model.pte"
    bad.write_bytes((bundle / "executorch" / "model.pte").read_bytes()[:5000])
    with pytest.raises(RuntimeError, match=r"rankdown-et-runner: error: .*model.pte: not a loadable ExecuTorch program"):
        NativeExecuTorchDecoder(bad, [str(build_runner(progress=quiet) / "bin" / BINARY)])


def test_both_executorch_decoders_refuse_a_one_token_method_named_decode(tmp_path):
    """The name rankdown gave it before 2026-12-04, which TextLLMRunner misreads (export/decoding.py)."""
    import torch
    from executorch.exir import to_edge

    from rankdown.devices.native_runner import BINARY, build_runner
    from rankdown.export.decoding import ExecuTorchDecoder, NativeExecuTorchDecoder

    class Step(torch.nn.Module):
        def forward(self, tokens, position):
            return tokens.float() + position.float()

    args = (torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    programs = {name: torch.export.export(Step(), args) for name in ("forward", "decode")}
    pte = tmp_path / "model.pte"
    pte.write_bytes(to_edge(programs).to_executorch().buffer)
    with pytest.raises(ValueError, match=r"model.pte: its one-token method is named 'decode' .* export the bundle again$"):
        ExecuTorchDecoder(pte)
    with pytest.raises(RuntimeError, match=r"model.pte: its one-token method is named 'decode' .* export the bundle again$"):
        NativeExecuTorchDecoder(pte, [str(build_runner(progress=quiet) / "bin" / BINARY)])
    # the same program without that name opens
    pte.write_bytes(to_edge({"forward": programs["forward"]}).to_executorch().buffer)
    assert ExecuTorchDecoder(pte).decode is None


def test_local_profile_with_the_native_runner_validates(tmp_path, joint_bundle):
    _, bundle, _ = joint_bundle
    profile = load_profile(_profile(tmp_path, "local-native", "arch='host'\nruntimes=['executorch']\nthreads=1\n"
                                    "memory_mb=512\nexecutorch_runner='native'\n[transport]\nkind='local'\n"))
    report = validate(bundle, ValidateConfig(runtimes=profile.runtimes, threads=1, **SMALL), progress=quiet,
                      runner=runner_for(profile))
    assert report.passed, report.failures
    assert report.runtimes["executorch"].parity.greedy_match
    assert report.environment.device.name == "local-native"  # the profile, not the transport


@pytest.fixture(scope="session")
def arm64_root():
    """The arm64-emu device; `make test` builds it first (make arm64-emu), this only checks."""
    from rankdown.devices.arm64_emu import build

    return build(progress=quiet)  # a no-op when built; builds it when the prerequisites are installed


@pytest.mark.slow
def test_arm64_emu_runs_both_runtimes_on_arm(arm64_root, joint_bundle):
    _, bundle, _ = joint_bundle
    profile = find_profile("arm64-emu")
    runner = runner_for(profile)
    runs = arm64_root.path / "tmp" / "rankdown"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    report = validate(bundle, ValidateConfig(runtimes=profile.runtimes, threads=2, **SMALL), progress=quiet,
                      runner=runner)
    assert report.passed, report.failures
    device, host = report.environment.device, report.environment.host
    # The device is the arm64 root, whatever the host is; the host stays beside it.
    assert (device.name, device.transport, device.machine, device.emulated) == ("arm64-emu", "arm64-emu", "aarch64", True)
    assert host.machine == platform.machine() and device.system == "Linux"
    for name in ("onnxruntime", "executorch"):
        r = report.runtimes[name]
        assert r.parity.greedy_match and r.parity.max_abs_logit_diff < 1e-3
        assert r.executed_on.startswith("aarch64")  # the harness reports the CPU it really ran on
    assert report.runtimes["executorch"].executed_on == "aarch64, rankdown-et-runner (C++)"
    assert set(runs.iterdir()) == before  # the device is left clean


@pytest.mark.slow
def test_validate_asks_the_device_how_its_onnxruntime_rounds_int4_inputs(arm64_root, onnx_int4_bundles):
    """An x86 host and a Neoverse round a MatMulNBits input to int8 (MLAS's CompInt8 kernels); a
    Cortex-A72 has no dot product and runs it on the float input. The int4 reference must follow
    the device the graph runs on, not the host that builds it."""
    from rankdown.checkpoint import load_model, open_checkpoint
    from rankdown.export.config import Quantize
    from rankdown.export.onnx import lowered_model
    from rankdown.export.onnx_int4_reference import int8_input_kinds, onnxruntime_rounds_int8_inputs
    from rankdown.validate.harness import _device_rounding

    folder, _, (bundle, _) = onnx_int4_bundles
    artifact = bundle / "onnx" / "model.onnx"
    kinds = int8_input_kinds(artifact)
    assert kinds
    neoverse = _device_rounding(runner_for(find_profile("arm64-emu")), artifact)
    a72_profile = find_profile("arm64-emu-a72")
    a72 = _device_rounding(runner_for(a72_profile), artifact)
    assert neoverse is not None and a72 is not None
    assert [neoverse(*k) for k in kinds] == [True] * len(kinds)
    assert [a72(*k) for k in kinds] == [False] * len(kinds)
    model = load_model(open_checkpoint(folder)).eval()
    here = lowered_model(model, artifact, Quantize.INT4)
    there = lowered_model(model, artifact, Quantize.INT4, rounds=a72)
    assert there.rounded_inputs == 0
    assert (here.rounded_inputs > 0) == any(onnxruntime_rounds_int8_inputs(*k) for k in kinds)  # this machine's own
    lines: list[str] = []
    report = validate(bundle, ValidateConfig(runtimes=["onnxruntime"], threads=1, **SMALL), progress=lines.append,
                      runner=runner_for(a72_profile))
    assert report.passed, report.failures
    assert report.runtimes["onnxruntime"].executed_on.startswith("aarch64")
    assert any("0 linear input(s) rounded to int8 as arm64-emu-a72's onnxruntime does" in line for line in lines), lines


def test_arm64_emu_really_is_arm(arm64_root):
    probe = subprocess.run(arm64_root.python(["-c", "import platform; print(platform.machine())"]),
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "aarch64", probe.stderr
    binary = (arm64_root.runner / "bin" / "rankdown-et-runner").read_bytes()
    assert binary[:4] == b"\x7fELF" and int.from_bytes(binary[18:20], "little") == 183  # EM_AARCH64


@pytest.fixture()
def stand_in_adb(tmp_path, arm64_root):
    """A `adb` on a temporary PATH that plays an arm64 phone (tests/stand_in_adb.py)."""
    import shlex

    from rankdown.devices.arm64_emu import PYTHON

    shims = tmp_path / "shims"
    shims.mkdir()
    here = Path(__file__).parent
    (shims / "adb").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {here / 'stand_in_adb.py'} \"$@\"\n")
    (shims / "python3").write_text("#!/bin/sh\nexec " + " ".join(map(shlex.quote, arm64_root.command(
        [str(arm64_root.path) + PYTHON]))) + ' "$@"\n')
    # The phone runs the arm64 runner directly; here one more qemu has to, from the device path.
    (shims / "arm64-exec").write_text(f"#!/bin/sh\np=\"$1\"; shift\nexec {' '.join(map(shlex.quote, arm64_root.exec_prefix()))} "
                                      f"{arm64_root.path}\"$p\" \"$@\"\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    log = tmp_path / "adb.log"
    env = {"STAND_IN_ADB_ROOT": str(arm64_root.path), "STAND_IN_ADB_LOG": str(log),
           "STAND_IN_ADB_SERIAL": "emulator-5554", "STAND_IN_ADB_SHIMS": str(shims)}
    profile = _profile(tmp_path, "stand-in-phone",
                       "arch='aarch64'\nruntimes=['onnxruntime', 'executorch']\nthreads=2\nmemory_mb=1024\n"
                       f"executorch_runner='native'\nexec_wrapper=['{shims / 'arm64-exec'}']\n[transport]\nkind='adb'\n"
                       f"adb='{shims / 'adb'}'\nserial='emulator-5554'\npython='python3'\n"
                       "remote_dir='/data/local/tmp/rankdown'\npythonpath='/opt/rankdown/site'\n")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield profile, log
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.slow
def test_adb_transport_round_trips_through_a_stand_in_phone(stand_in_adb, arm64_root, joint_bundle):
    import json

    profile_path, log = stand_in_adb
    _, bundle, _ = joint_bundle
    profile = load_profile(profile_path)
    runs = arm64_root.path / "data/local/tmp/rankdown"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    # The .pte only: it needs the most of the transport (the runner pushed and made executable);
    # both runtimes already ran on this arm64 root in test_arm64_emu_runs_both_runtimes_on_arm.
    report = validate(bundle, ValidateConfig(runtimes=("executorch",), threads=2, **SMALL), progress=quiet,
                      runner=runner_for(profile))
    assert report.passed, report.failures
    assert (report.environment.device.transport, report.environment.device.machine) == ("adb", "aarch64")
    assert report.runtimes["executorch"].executed_on == "aarch64, rankdown-et-runner (C++)"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(c[:2] == ["-s", "emulator-5554"] for c in calls)
    verbs = [c[2] for c in calls]
    assert verbs.count("push") == 1 and verbs.count("pull") == 1
    pushed = [c for c in calls if c[2] == "push"]
    assert all(c[-1].startswith("/data/local/tmp/rankdown/") for c in pushed)
    assert any(c[2] == "shell" and "chmod 755" in c[3] for c in calls)  # the native runner, for the .pte
    assert set(runs.iterdir()) == before


def test_adb_without_the_device_is_one_clear_error(stand_in_adb, joint_bundle, tmp_path):
    profile_path, _ = stand_in_adb
    _, bundle, _ = joint_bundle
    text = profile_path.read_text().replace("serial='emulator-5554'", "serial='R58M12345'")
    other = tmp_path / "other.toml"
    other.write_text(text)
    with pytest.raises(RankdownError, match="adb R58M12345: creating the run folder failed .*device 'R58M12345' not found"):
        validate(bundle, ValidateConfig(runtimes="onnxruntime", **SMALL), progress=quiet,
                 runner=runner_for(load_profile(other)))


# --- rankdown fit ------------------------------------------------------------------------------

@pytest.mark.slow
def test_fit_picks_a_smaller_model_for_a_smaller_budget(tmp_path, shipped_model_dir):
    import dataclasses
    import json

    from rankdown.devices.fit import fit, rank_candidates
    from rankdown.devices.fit_config import FitConfig

    profile = load_profile(_profile(tmp_path, "small-phone", "arch='host'\nruntimes=['onnxruntime']\nthreads=2\n"
                                    "memory_mb=4096\n[transport]\nkind='local'\n"))
    cfg = FitConfig(method="svd", ratios=(0.0, 0.6), max_examples=30, max_memory_mb=12, heal_steps=0)
    report = fit(shipped_model_dir, tmp_path / "fit", profile, cfg, progress=quiet)
    dense_fp32 = next(c for c in report.candidates if c.ratio == 0 and c.quantize == "none")
    assert not dense_fp32.fits and dense_fp32.memory_mb > 12
    assert report.chosen.fits and report.chosen.memory_mb <= 12 and report.validation_passed
    # What was measured agrees with the estimate: the exported file and the KV cache fit the budget.
    onnx_bytes = sum(f.stat().st_size for f in (tmp_path / "fit" / "bundle" / "onnx").iterdir())
    assert onnx_bytes / 2**20 <= report.chosen.memory_mb
    assert json.loads((tmp_path / "fit" / "fit.json").read_text())["chosen"]["ratio"] == report.chosen.ratio
    assert (tmp_path / "fit" / "validation" / "report.json").is_file()
    # With room for everything, the same candidates put the dense fp32 model first.
    roomy = [dataclasses.replace(c, fits=True) for c in report.candidates]
    assert rank_candidates(roomy)[0] == dataclasses.replace(dense_fp32, fits=True)
    assert report.chosen.memory_mb < dense_fp32.memory_mb


def test_fit_counts_the_second_packed_copy_of_executorch_s_python_runtime(tmp_path, shipped_model_dir):
    """ExecuTorch's Python runtime packs a quantized .pte's weights once for forward and once for
    decode_step; rankdown-et-runner shares one copy, and ONNX has none to share."""
    from rankdown.checkpoint import load_model, open_checkpoint
    from rankdown.devices.fit import memory_mb, packs_twice
    from rankdown.export.config import Quantize

    body = "arch='host'\nruntimes=[{}]\nthreads=2\nmemory_mb=4096\n{}[transport]\nkind='local'\n"
    python = load_profile(_profile(tmp_path, "py", body.format("'onnxruntime', 'executorch'", "")))
    native = load_profile(_profile(tmp_path, "native", body.format("'executorch'", "executorch_runner='native'\n")))
    onnx = load_profile(_profile(tmp_path, "onnx", body.format("'onnxruntime'", "")))
    assert packs_twice(python, Quantize.INT4) and packs_twice(python, Quantize.INT8)
    assert not packs_twice(python, Quantize.NONE)  # an fp32 .pte has no decode_step by default
    assert not packs_twice(native, Quantize.INT4) and not packs_twice(onnx, Quantize.INT4)
    model = load_model(open_checkpoint(shipped_model_dir))
    extra = {}
    for q in (Quantize.INT8, Quantize.INT4):
        once = memory_mb(model, q, 256)
        extra[q] = memory_mb(model, q, 256, packed_twice=True) - once
        assert 0 < extra[q] < once
    assert extra[Quantize.INT4] < extra[Quantize.INT8]


def test_fit_takes_int4_where_only_int4_fits(tmp_path, shipped_model_dir):
    """int4 candidates rank after fp32 and int8 at the same score, so they are chosen where only they
    fit; the estimate bounds what the exported 4-bit files and the cache take."""
    from rankdown.devices.fit import fit, rank_candidates
    from rankdown.devices.fit_config import FitConfig

    profile = load_profile(_profile(tmp_path, "tiny-phone", "arch='host'\nruntimes=['onnxruntime']\nthreads=2\n"
                                    "memory_mb=4096\n[transport]\nkind='local'\n"))
    report = fit(shipped_model_dir, tmp_path / "fit", profile,
                 FitConfig(method="svd", ratios=(0.0,), max_examples=30, max_memory_mb=8, heal_steps=0), progress=quiet)
    need = {c.quantize: c for c in report.candidates}
    assert set(need) == {"none", "int8", "int4"}
    assert need["int4"].memory_mb <= 8 < need["int8"].memory_mb < need["none"].memory_mb
    assert report.chosen == need["int4"] and report.tried[0].startswith("ratio 0.0 int4: ")
    assert Manifest.read(tmp_path / "fit" / "bundle").options["quantize"] == "int4"
    onnx_bytes = sum(f.stat().st_size for f in (tmp_path / "fit" / "bundle" / "onnx").iterdir())
    assert onnx_bytes / 2**20 <= need["int4"].memory_mb
    # at one score, fp32 before int8 before int4, whatever their sizes
    roomy = [dataclasses.replace(c, fits=True) for c in report.candidates]
    assert [c.quantize for c in rank_candidates(roomy)] == ["none", "int8", "int4"]

def test_fit_goes_on_past_a_candidate_whose_export_fails_its_self_check(tmp_path, shipped_model_dir, monkeypatch):
    """An artifact the export's self-check refuses (a quantized one that misses its float floor, say)
    is a failed candidate, not a failed fit: the next one is exported and validated. When the export
    refuses every candidate, one line says so and nothing is left."""
    import rankdown.devices.fit as fit_module
    from rankdown.devices.fit import fit
    from rankdown.devices.fit_config import FitConfig
    from rankdown.errors import ParityError

    profile = load_profile(_profile(tmp_path, "laptop", "arch='host'\nruntimes=['onnxruntime']\nthreads=2\n"
                                    "memory_mb=4096\n[transport]\nkind='local'\n"))
    real_export = fit_module.export
    asked = []

    def refuse(first_only: bool):
        def export(model, bundle, cfg, progress=print):
            asked.append(cfg.quantize)
            if len(asked) == 1 or not first_only:
                raise ParityError(f"{bundle}: onnx export failed its parity self-check against the float model: "
                                  "top-1 agreement 50.0% < 80.0%",
                                  reason="onnx against the float model: top-1 agreement 50.0% < 80.0%")
            return real_export(model, bundle, cfg, progress=progress)
        return export

    cfg = FitConfig(method="svd", ratios=(0.0,), max_examples=10, heal_steps=0)
    monkeypatch.setattr(fit_module, "export", refuse(first_only=True))
    report = fit(shipped_model_dir, tmp_path / "fit", profile, cfg, progress=quiet)
    assert [q.value for q in asked] == ["none", "int8"]  # the dense fp32 model ranks first, then int8
    assert report.tried[0] == ("ratio 0.0 none: FAILED the export's self-check: onnx against the float model: "
                               "top-1 agreement 50.0% < 80.0%")  # the reason, not the removed work folder's path
    assert report.tried[1] == "ratio 0.0 int8: passed" and report.validation_passed
    assert report.chosen is not None and report.chosen.quantize == "int8"
    assert Manifest.read(tmp_path / "fit" / "bundle").options["quantize"] == "int8"
    asked.clear()
    monkeypatch.setattr(fit_module, "export", refuse(first_only=False))
    with pytest.raises(RankdownError, match=r"no candidate for laptop passed the export's self-check \(3 tried; "
                                            r"the first: ratio 0.0 none: FAILED"):
        fit(shipped_model_dir, tmp_path / "again", profile, cfg, progress=quiet)
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))

def test_fit_with_an_impossible_budget_is_one_clear_error(tmp_path, shipped_model_dir):
    from rankdown.devices.fit import fit
    from rankdown.devices.fit_config import FitConfig

    profile = load_profile(_profile(tmp_path, "watch", "arch='host'\nruntimes=['onnxruntime']\nthreads=1\n"
                                    "memory_mb=1\n[transport]\nkind='local'\n"))
    with pytest.raises(RankdownError, match=r"no candidate for watch: nothing fits 1 MB \(the smallest candidate needs"):
        fit(shipped_model_dir, tmp_path / "fit", profile, FitConfig(method="svd", ratios=(0.0,), max_examples=5),
            progress=quiet)
    assert not (tmp_path / "fit").exists() and not list(tmp_path.glob(".fit*"))
