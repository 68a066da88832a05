"""ExecuTorch delegates, one registration each: its partitioners and what this machine must have.

A backend is two functions, ``partitioners(separate_quantized) -> list`` (imports the delegate's toolchain
only when called) and ``missing() -> str | None`` (what this machine lacks to compile for it,
None when nothing), plus a ``BackendSpec`` line in ``BACKENDS``. Only XNNPACK's toolchain
ships in the executorch wheel; the others are refused with what they need.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from rankdown.errors import RankdownError
from rankdown.schema import name_enum


@dataclass(frozen=True)
class BackendSpec:
    name: str  # --backend value
    runtime_name: str  # the backend's name in the runtime's registry
    needs: str  # what this machine must have, in words
    # whether dynamically quantized linears must be claimed first, each on its own (int8's pt2e
    # graph, an int4 graph whose activation quantization is shared) -> the partitioners, in order
    partitioners: Callable[[bool], list]
    missing: Callable[[], str | None]


def _xnnpack(separate_quantized: bool) -> list:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner,
        XnnpackPartitioner,
    )

    # There, dynamically quantized linears must be claimed first, whole; the generic partitioner
    # would otherwise split choose_qparams from its matmul and form cyclic partitions. But each
    # is then its own delegate call: one pass (as optimum-executorch lowers 8da4w) lets a linear
    # share a delegate with the ops around it (SmolLM2 40% int4: 334 delegate calls -> 154).
    return ([XnnpackDynamicallyQuantizedPartitioner()] if separate_quantized else []) + [XnnpackPartitioner()]


def _coreml(separate_quantized: bool) -> list:
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    return [CoreMLPartitioner()]


def _qnn(separate_quantized: bool) -> list:
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner

    return [QnnPartitioner()]


def _vulkan(separate_quantized: bool) -> list:
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

    return [VulkanPartitioner()]


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("xnnpack", "XnnpackBackend", "nothing beyond the executorch wheel", _xnnpack, lambda: None),
    BackendSpec("coreml", "CoreMLBackend", "macOS with coremltools (Core ML compiles and runs only there)", _coreml,
                lambda: None if os.uname().sysname == "Darwin" else "this is not macOS"),
    BackendSpec("qnn", "QnnBackend", "Qualcomm's QNN SDK (QNN_SDK_ROOT) and a Snapdragon device to run on", _qnn,
                lambda: None if os.environ.get("QNN_SDK_ROOT") else "QNN_SDK_ROOT is not set"),
    BackendSpec("vulkan", "VulkanBackend", "the glslc shader compiler and an executorch runtime built with Vulkan",
                _vulkan, lambda: None if shutil.which("glslc") else "glslc is not on PATH"),
)

Backend = name_enum("Backend", [b.name for b in BACKENDS], __name__)


def backend_spec(backend) -> BackendSpec:
    name = getattr(backend, "value", backend)
    return next(b for b in BACKENDS if b.name == name)


def check_backend(backend, will_run: bool) -> None:
    """Fail before any work when the backend's toolchain (or, for the self-check, runtime) is missing."""
    spec = backend_spec(backend)
    missing = spec.missing()
    if missing is None and will_run:
        from executorch.runtime import Runtime

        registered = Runtime.get().backend_registry.registered_backend_names
        if spec.runtime_name not in registered:
            missing = f"this machine's executorch runtime has no {spec.runtime_name} (it has {', '.join(registered)})"
    if missing:
        raise RankdownError(f"--backend {spec.name} needs {spec.needs}; {missing}")
