"""Library noise stays out of the user's terminal: checked in a fresh interpreter, since both the
root logger's configuration and the warning filters are per process."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import logging, sys, warnings
if sys.argv[1] == "quiet":
    from rankdown.library_logs import quiet_library_logs
    quiet_library_logs()
import onnxruntime.quantization.matmul_nbits_quantizer  # configures the root logger at INFO when first
logging.info("a library's info line")
# attributed as the libraries' own warnings are (the filters are scoped to those modules)
warnings.warn_explicit("_check_is_size will be removed in a future PyTorch release", FutureWarning,
                       "custom_ops.py", 317, module="executorch.extension.llm.custom_ops.custom_ops")
warnings.warn_explicit("Mutation on a buffer in the model is detected.", UserWarning, "_emitter.py", 1906,
                       module="executorch.exir.emit._emitter")
logging.getLogger("some.library").warning("a library's warning")
warnings.warn("a warning rankdown did not list", UserWarning)
warnings.warn_explicit("Mutation on a buffer in the model is detected (from elsewhere).", UserWarning,
                       "app.py", 1, module="someone.elses")
"""


def _stderr(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_library_info_lines_and_listed_warnings_are_quiet():
    loud, quiet = _stderr("loud"), _stderr("quiet")
    # the control: without the call, the libraries' lines reach the terminal
    assert "a library's info line" in loud and "_check_is_size" in loud and "Mutation on a buffer" in loud
    assert "a library's info line" not in quiet
    assert "_check_is_size" not in quiet and "Mutation on a buffer in the model is detected." not in quiet
    assert "(from elsewhere)" in quiet  # the same words from another module still show
    # what is not listed still shows: a warning, and a library's WARNING log line
    assert "a warning rankdown did not list" in quiet
    assert "a library's warning" in quiet


_NATIVE = """
import os, sys
from rankdown.library_logs import native_stderr_without
with native_stderr_without():
    os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\\n")
    os.write(2, b"E 00:00:00 method.cpp:1] a real error from C++\\n")
    print("a Python line", file=sys.stderr)
    os.write(2, b" [cpuinfo_utils.cpp:125] CPU info and manual query on # of cpus dont match.\\n")
print("after", file=sys.stderr)
"""


def test_native_stderr_keeps_all_but_the_listed_lines_in_order():
    done = subprocess.run([sys.executable, "-c", _NATIVE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["E 00:00:00 method.cpp:1] a real error from C++", "a Python line", "after"]


def test_the_bundle_tokenizer_check_keeps_pytorch_tokenizers_import_line_out():
    """pytorch_tokenizers logs "Registering override fallback regex" when imported, which every
    export printed before its first line of its own."""
    script = ("import sys; from pathlib import Path; from rankdown.export.bundle_tokenizer import _load_in_runtime_library;"
              "print(_load_in_runtime_library(Path(sys.argv[1]))[1])")
    from rankdown.shipped import SHIPPED_MODEL

    done = subprocess.run([sys.executable, "-c", script, str(SHIPPED_MODEL / "tokenizer.json")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    assert "tokenizers:regex.cpp" not in done.stderr
    loud = subprocess.run([sys.executable, "-c", "import pytorch_tokenizers"], capture_output=True, text=True, timeout=120)
    assert "tokenizers:regex.cpp" in loud.stderr  # the control: the library still says it by itself
