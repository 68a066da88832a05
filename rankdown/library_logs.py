"""Library logging that is not the user's business, quieted in every process that runs the stages."""

from __future__ import annotations

import logging


def quiet_library_logs() -> None:
    """torchao (pulled in by executorch) logs at import that its CUDA kernels cannot load on a
    CPU machine, and torch's pytree logs a deprecation for torchao's enums."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
