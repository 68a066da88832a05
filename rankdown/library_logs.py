"""Library logging that is not the user's business, quieted in every process that runs the stages."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

# Python warnings the libraries raise on every export, none of them about the user's input:
# (category, start of the message, the module the warning is attributed to).
LIBRARY_WARNINGS = (
    # torch 2.13 deprecates _check_is_size; executorch 1.5's custom ops and torch's own tracer still call it
    (FutureWarning, "_check_is_size will be removed", r"(torch|executorch)\."),
    # torch's pytree deprecation, raised while ExecuTorch deep-copies the exported program
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"(copyreg|copy|torch\.)"),
    # the KV cache is a mutated buffer by design; ExecuTorch's emitter says so once per program
    (UserWarning, "Mutation on a buffer in the model is detected", r"executorch\.exir\.emit"),
)


# Lines C++ libraries write to the process's stderr that say nothing about the user's input:
# ExecuTorch's threadpool probes /sys for an ARM core id when a program first loads, and logs each
# file it cannot open, at Info level, on every machine that is not a phone. pytorch_tokenizers logs
# at import that it registered its regex fallback.
NATIVE_NOISE = ("[cpuinfo_utils.cpp:", "I tokenizers:regex.cpp:")


@contextlib.contextmanager
def native_stderr_without(prefixes: tuple[str, ...] = NATIVE_NOISE) -> Iterator[None]:
    """The process's stderr (file descriptor 2, where C++ code writes) held while the block runs,
    then passed on without the lines that start with ``prefixes``; what else was written, an
    error included, still reaches the terminal, after the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to hold: nothing to filter either
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            marks = tuple(p.encode() for p in prefixes)
            kept = [line for line in held.read().splitlines(keepends=True) if not line.lstrip().startswith(marks)]
            if kept:
                os.write(2, b"".join(kept))


def quiet_library_logs() -> None:
    """torchao (pulled in by executorch) logs at import that its CUDA kernels cannot load on a
    CPU machine, and torch's pytree logs a deprecation for torchao's enums.

    onnxruntime's MatMulNBits quantizer calls ``logging.basicConfig(level=INFO)`` when imported,
    which turned every library's root-logger INFO line (executorch's custom-ops loader among them)
    into output: the root logger is configured first, at WARNING, so that later ``basicConfig``
    calls do nothing."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
