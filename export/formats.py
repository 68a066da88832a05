"""The export formats, one registration each: export, validate, devices and the CLI read this table.

A format is one module (``export/onnx.py``, ``export/executorch.py``) with four functions:

    preflight(cfg)                                  refuse before any work (a missing toolchain)
    export(model, record, bundle, cfg, progress)    write the artifact and count its factor nodes:
                                                    -> (seconds, FactorNodes, delegation summary | None,
                                                        quantization summary | None)
    check_file(path, bundle)                        refuse a malformed artifact before a runtime
                                                    opens it; -> the other files it reads
    positions(path, options)                        positions the artifact holds (None: no limit)

and, where the format quantizes the PyTorch model before lowering it (ExecuTorch int4), a fifth:

    quantize(model, record, cfg, progress)          -> Quantized | None: the quantized model it will
                                                    lower; the self-check also holds the artifact
                                                    against it, and ``export`` takes it (``quantized=``)

or, where it quantizes the exported graph (ONNX int4), one that reads that model back from it:

    lowered_model(model, artifact, quantize, rounds) -> a module computing what the artifact holds, in
                                                    PyTorch, or None; held against as ``quantize``'s is
                                                    (``rounds``: a device's own answers to what the
                                                    runtime does with inputs, None for this machine's)

plus a decoder opener ``open(artifact, threads, native_runner) -> Decoder`` that imports
neither torch nor transformers at module level, because it runs on devices. The table names
them as ``"module:function"`` so that this file imports nothing heavy and ships to devices as
it is (``devices/runners.py`` sends it, and every decoder module, with the harness).

A format's artifact may run in more runtimes than its own: each ``OtherRuntime`` names its
module, its decoder opener and the files of the bundle it reads beside the artifact. ``validate``
runs those only when asked (``--runtime``); ``by_runtime`` gives the format as that runtime sees it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class MemoryModel:
    """Address space a format's export takes: per fp32 weight byte (traced graph, constant
    copies, serialized program) and for the exporter itself."""

    per_weight_byte: int
    fixed_bytes: int

    def bytes_for(self, weight_bytes: int) -> int:
        return self.per_weight_byte * weight_bytes + self.fixed_bytes


@dataclass(frozen=True)
class Quantized:
    """A format's quantized PyTorch model: what its artifact computes, in PyTorch."""

    model: Any
    record: Any  # its FactorRecord (int4 pads ranks)
    summary: dict  # the manifest's ``quantization`` entry


@dataclass(frozen=True)
class OtherRuntime:
    """Another runtime for a format's artifact (onnxruntime-genai for the ONNX graph)."""

    name: str  # --runtime value and report key
    runtime_module: str
    decoder: str  # "module:function", torch-free import, as FormatSpec.decoder
    needs: tuple[str, ...] = ()  # bundle files it reads besides the artifact; a bundle without them is refused


@dataclass(frozen=True)
class FormatSpec:
    name: str  # --format value and manifest key
    runtime: str  # --runtime value and report key: what runs the artifact
    runtime_module: str  # what must import where the artifact runs in Python
    artifact: str  # the artifact's path in the bundle; its folder holds every file of the format
    implementation: str  # the module with preflight / export / check_file / positions
    decoder: str  # "module:function": open(artifact, threads, native_runner) -> Decoder, torch-free import
    memory: MemoryModel
    takes_backend: bool = False  # lowered to an ExecuTorch delegate (--backend)
    other_runtimes: tuple[OtherRuntime, ...] = ()  # run only when asked for by name
    needs: tuple[str, ...] = ()  # bundle files the runtime reads besides the artifact (set by by_runtime)
    # the 95th-percentile position's |logit diff| from the artifact to its quantized PyTorch model that
    # the lowering check allows, x logit scale (export/config.py ``ParityThresholds.lowering``)
    lowering_p95: float = 0.35

    @property
    def folder(self) -> str:
        return self.artifact.split("/")[0]

    def module(self) -> ModuleType:
        return importlib.import_module(self.implementation)

    def open_decoder(self, artifact: Any, threads: int | None = None, native_runner: list[str] | None = None):
        module, _, function = self.decoder.partition(":")
        opener: Callable = getattr(importlib.import_module(module), function)
        return opener(artifact, threads, native_runner)


# Memory models fitted to the shipped model (26 MB of fp32 weights): its ONNX export grew the
# process by 353 MB, its ExecuTorch export by 381 MB.
FORMATS: tuple[FormatSpec, ...] = (
    FormatSpec("onnx", runtime="onnxruntime", runtime_module="onnxruntime", artifact="onnx/model.onnx",
               implementation="rankdown.export.onnx", decoder="rankdown.export.decoding:open_onnx",
               memory=MemoryModel(4, 260_000_000),
               # the app runtime for LLMs on Android, iOS and Windows: genai_config.json names the graph's I/O
               other_runtimes=(OtherRuntime("onnxruntime-genai", runtime_module="onnxruntime_genai",
                                            decoder="rankdown.export.onnx_genai:open_genai",
                                            needs=("onnx/genai_config.json",)),)),
    FormatSpec("executorch", runtime="executorch", runtime_module="executorch.runtime",
               artifact="executorch/model.pte", implementation="rankdown.export.executorch",
               decoder="rankdown.export.decoding:open_executorch", memory=MemoryModel(8, 210_000_000),
               takes_backend=True, lowering_p95=0.2),
)


def format_names() -> list[str]:
    return [spec.name for spec in FORMATS]


def runtime_names() -> list[str]:
    """Every runtime: each format's own, then the other runtimes of its artifact."""
    return [spec.runtime for spec in FORMATS] + [o.name for spec in FORMATS for o in spec.other_runtimes]


def default_runtime_names() -> list[str]:
    """The runtimes ``validate`` runs when none is named: each format's own."""
    return [spec.runtime for spec in FORMATS]


def decoder_modules() -> list[str]:
    """Every runtime's decoder module (what a device needs besides the harness)."""
    return list(dict.fromkeys(by_runtime(name).decoder.partition(":")[0] for name in runtime_names()))


def by_format(name: Any) -> FormatSpec:
    """The format ``name`` (an enum member or its text)."""
    return _find("name", getattr(name, "value", name))


def by_runtime(name: Any) -> FormatSpec:
    """The format the runtime ``name`` runs (an enum member or its text), as that runtime sees it:
    for another runtime of the artifact, its module, decoder and needed files in place of the format's own."""
    value = getattr(name, "value", name)
    for spec in FORMATS:
        for other in spec.other_runtimes:
            if other.name == value:
                return dataclasses.replace(spec, runtime=other.name, runtime_module=other.runtime_module,
                                           decoder=other.decoder, needs=other.needs)
    return _find("runtime", value)


def _find(key: str, value: str) -> FormatSpec:
    for spec in FORMATS:
        if getattr(spec, key) == value:
            return spec
    raise KeyError(f"no export format with {key} {value!r}")
