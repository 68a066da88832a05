"""Library logging that is not the user's business, quieted in every process that runs the stages."""

from __future__ import annotations

import logging
import warnings

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
