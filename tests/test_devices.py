"""devices/: profiles, and the ssh transport against a real sshd on loopback."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices.profile import PROFILE_DIR, Transport, find_profile, load_profile, shipped_profiles
from devices.runners import runner_for
from rankdown.errors import RankdownError
from runtime_tests.config import LatencyPlan, ValidateConfig
from runtime_tests.validate import validate

quiet = lambda _m: None  # noqa: E731


def test_shipped_profiles_load():
    profiles = shipped_profiles()
    assert {"local-cpu", "linux-board-ssh"} <= set(profiles)
    assert profiles["local-cpu"].transport.kind is Transport.LOCAL
    assert profiles["linux-board-ssh"].transport.kind is Transport.SSH
    assert find_profile("local-cpu") == profiles["local-cpu"]
    assert find_profile(str(PROFILE_DIR / "local-cpu.toml")).name == "local-cpu"


@pytest.mark.parametrize("text,pattern", [
    ("name = 'x'\n[transport\n", "not a valid TOML device profile"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\ncolour='red'\n[transport]\nkind='local'\n",
     "unknown keys ['colour']"),
    ("name='x'\narch='a'\nruntimes=['tflite']\nthreads=1\nmemory_mb=1\n[transport]\nkind='local'\n",
     "runtimes must be some of onnxruntime, executorch"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads='2'\nmemory_mb=1\n[transport]\nkind='local'\n",
     "threads must be a int"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\n[transport]\nkind='pigeon'\n",
     "transport kind 'pigeon' is not one of local, ssh"),
    ("name='x'\narch='a'\nruntimes=['onnxruntime']\nthreads=1\nmemory_mb=1\n[transport]\nkind='ssh'\n",
     "an ssh transport needs a host"),
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
    assert report.environment["runner"] == "ssh"
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
