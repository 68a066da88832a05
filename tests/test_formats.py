"""The format and backend registries: every stage reads them, and the device half stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rankdown.devices.runners import HARNESS_MODULES, harness_files
from rankdown.errors import RankdownError
from rankdown.export.config import Backend, ExportConfig, Format
from rankdown.export.et_backends import BACKENDS, check_backend
from rankdown.export.formats import FORMATS, by_format, by_runtime, decoder_modules, default_runtime_names, runtime_names
from rankdown.validate.config import Runtime, ValidateConfig
from rankdown.validate.environment import device_environment
from rankdown.validate.local_runner import LocalRunner
from rankdown.validate.report import DeviceEnvironment, Environment, HostEnvironment, Report, to_markdown


def test_enums_and_choices_are_the_registrations():
    assert [f.value for f in Format] == [s.name for s in FORMATS] == ["onnx", "executorch"]
    assert [r.value for r in Runtime] == runtime_names() == ["onnxruntime", "executorch", "onnxruntime-genai"]
    assert default_runtime_names() == [s.runtime for s in FORMATS] == ["onnxruntime", "executorch"]
    assert [b.value for b in Backend] == [b.name for b in BACKENDS] == ["xnnpack", "coreml", "qnn", "vulkan"]
    assert ExportConfig().formats == tuple(Format)
    assert by_runtime(Runtime.ONNXRUNTIME) is by_format("onnx") and by_format(Format.EXECUTORCH).takes_backend
    genai = by_runtime(Runtime.ONNXRUNTIME_GENAI)  # another runtime of the ONNX artifact
    assert (genai.name, genai.artifact, genai.runtime_module) == ("onnx", "onnx/model.onnx", "onnxruntime_genai")
    assert genai.needs == ("onnx/genai_config.json",) and by_format("onnx").needs == ()


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: s.name)
def test_each_format_module_has_its_hooks_and_its_artifact(spec):
    module = spec.module()
    for hook in ("preflight", "export", "check_file", "positions"):
        assert callable(getattr(module, hook)), f"{spec.implementation} lacks {hook}"
    assert f"{module.SUBDIR}/{module.MODEL_FILE}" == spec.artifact and spec.folder == module.SUBDIR
    assert spec.runtime_module.split(".")[0] in ("onnxruntime", "executorch")


def test_the_positions_hooks_read_what_each_format_holds(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "config.json").write_text('{"max_position_embeddings": 512}')
    assert by_format("onnx").module().positions(tmp_path / "onnx" / "model.onnx", {}) == 512
    assert by_format("executorch").module().positions(tmp_path / "x.pte", {"max_seq_len": 96}) == 96


def test_a_format_check_refuses_a_bad_file(tmp_path):
    pte = tmp_path / "model.pte"
    pte.write_bytes(b"\x00" * 64)
    with pytest.raises(RankdownError, match="not an ExecuTorch program"):
        by_format("executorch").module().check_file(pte, tmp_path)


def test_config_parsing_names_the_option_and_the_registered_choices():
    assert ExportConfig(formats="executorch,onnx,executorch").formats == (Format.EXECUTORCH, Format.ONNX)
    assert ValidateConfig(runtimes=["executorch"]).runtimes == (Runtime.EXECUTORCH,)
    with pytest.raises(RankdownError, match=r"unknown --backend 'metal': choose one of xnnpack, coreml, qnn, vulkan$"):
        ExportConfig(backend="metal")
    with pytest.raises(RankdownError, match=r"unknown --quantize 'int2': choose one of none, int8, int4$"):
        ExportConfig(quantize="int2")
    with pytest.raises(RankdownError, match="--format needs at least one of onnx, executorch"):
        ExportConfig(formats="")


def test_a_backend_carries_its_own_requirement(monkeypatch):
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    with pytest.raises(RankdownError, match=r"--backend qnn needs Qualcomm's QNN SDK .*; QNN_SDK_ROOT is not set$"):
        check_backend("qnn", will_run=False)
    check_backend(Backend.XNNPACK, will_run=False)  # its toolchain ships in the executorch wheel


def test_the_device_half_ships_the_table_and_every_decoder_without_torch(tmp_path):
    names = {m.__name__ for m in HARNESS_MODULES}
    assert {"rankdown.export.formats", "rankdown.validate.on_device"} <= names
    assert set(decoder_modules()) <= names and "rankdown.export.onnx_genai" in names
    # As a device sees it: only the shipped files on the path, and no torch imported by them.
    for name, path in harness_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(path.read_bytes())
    probe = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import importlib; "
             "import rankdown.validate.on_device; from rankdown.export.formats import decoder_modules; "
             "[importlib.import_module(m) for m in decoder_modules()]; "
             "outside = [n for n, m in sys.modules.items() if n.startswith('rankdown') "
             f"and not m.__file__.startswith({str(tmp_path)!r})]; "
             "print('torch' in sys.modules, outside)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "False []", result.stderr


def test_environment_names_the_device_and_keeps_the_host_beside_it():
    class Emulated:
        name, emulated, device = "arm64-emu", True, "arm64-emu"

    results = [{"machine": "aarch64", "system": "Linux", "cores": 2}] * 2
    device = device_environment(Emulated(), results)
    assert device == DeviceEnvironment("arm64-emu", "arm64-emu", "aarch64", "Linux", 2, True)
    assert device_environment(LocalRunner(), [{"machine": "x86_64"}]).name == "local"
    host = HostEnvironment("x86_64", "Linux", 16, {})
    report = Report(bundle="b", reference="r", data="d", runtimes={}, passed=True,
                    environment=Environment(device=device, host=host, threads=2))
    text = to_markdown(report)
    assert "runtimes ran on arm64-emu (aarch64 Linux, 2 cores) via arm64-emu (emulated" in text
    assert "host x86_64 Linux (16 cores)" in text
