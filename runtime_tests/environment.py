"""``report.json``'s ``environment``: the device the runtimes ran on, and the host beside it."""

from __future__ import annotations

import os
import platform

from rankdown.validate.report import DeviceEnvironment, Environment, HostEnvironment
from rankdown.versions import package_versions

_VERSIONED = ("rankdown", "torch", "onnxruntime", "onnxruntime-genai", "executorch", "numpy")


def host_environment() -> HostEnvironment:
    return HostEnvironment(machine=platform.machine(), system=platform.system(), cores=os.cpu_count(),
                           versions=package_versions(_VERSIONED))


def device_environment(runner, results: list[dict]) -> DeviceEnvironment:
    """From the runner (its device's name, transport, emulation) and what the device half reported
    about the machine it ran on (one result per runtime; a device is one machine)."""

    def seen(key: str) -> str:
        return ", ".join(dict.fromkeys(str(r[key]) for r in results if r.get(key) is not None)) or "unknown"

    cores = [r["cores"] for r in results if isinstance(r.get("cores"), int)]
    return DeviceEnvironment(name=getattr(runner, "device", runner.name), transport=runner.name,
                             machine=seen("machine"), system=seen("system"), cores=cores[0] if cores else None,
                             emulated=bool(runner.emulated))


def environment(runner, results: list[dict], threads: int | None) -> Environment:
    return Environment(device=device_environment(runner, results), host=host_environment(), threads=threads)
