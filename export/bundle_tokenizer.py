"""The bundle's ``tokenizer.json``: one that the runtimes' own tokenizer libraries load, proven
to encode real prompts exactly as the model's tokenizer does.

App runtimes do not use Hugging Face ``tokenizers``: ExecuTorch's ``TextLLMRunner`` links
``pytorch_tokenizers``' C++ ``HFTokenizer``, which implements a subset of the format and
refuses some constructs that are identities, e.g. the empty normalizer ``Sequence`` that
transformers' GGUF conversion writes ("Missing normalizers for Normalizer of type
Sequence"). Those are rewritten to ``null``; anything else it cannot load, or encodes
differently, fails the export in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rankdown.atomic import write_text_atomic
from rankdown.errors import RankdownError
from rankdown.library_logs import native_stderr_without

TOKENIZER_FILE = "tokenizer.json"
# Components that pytorch_tokenizers builds from a list, and the list's key in each.
_SEQUENCE_LISTS = {"normalizer": "normalizers", "pre_tokenizer": "pretokenizers", "decoder": "decoders"}
# Text whose encoding is hard to get right: byte fallback, accents, CJK, emoji, runs of spaces and newlines, digits.
_EDGE_TEXT = "Héllo  wörld\t\t日本語 🙂 ×÷ 12345678 +3.5e-2\n\n    indented\r\n¿qué?"


def _without_empty_sequences(component):
    """``component`` with empty ``Sequence`` members dropped (they are identities); None when
    nothing is left. Returns the same object when there was nothing to drop."""
    if not isinstance(component, dict) or component.get("type") != "Sequence":
        return component
    key = next((k for k in _SEQUENCE_LISTS.values() if k in component), None)
    members = component.get(key) if key else None
    if not isinstance(members, list):
        return component
    kept = [m for m in (_without_empty_sequences(m) for m in members) if m is not None]
    if not kept:
        return None
    return component if kept == members else {**component, key: kept}


def runtime_readable(spec: dict) -> tuple[dict, list[str]]:
    """The tokenizer spec with identity constructs the runtime libraries refuse removed, and
    what was changed, in words."""
    fixed, changes = dict(spec), []
    for name in _SEQUENCE_LISTS:
        if name in fixed:
            new = _without_empty_sequences(fixed[name])
            if new is not fixed[name]:
                changes.append(f"{name}: empty Sequence removed" + (" (now null)" if new is None else ""))
                fixed[name] = new
    return fixed, changes


def check_texts() -> list[str]:
    """Real prompts of every built-in task plus one text of hard cases."""
    from rankdown.tasks import Split, load_task

    return [load_task("math", Split.EVALUATION).qa[0].prompt,
            load_task("code", Split.EVALUATION).texts[0][:2000],
            load_task("prose", Split.EVALUATION).texts[0][:2000],
            _EDGE_TEXT]


def _load_in_runtime_library(path: Path):
    """pytorch_tokenizers' C++ HFTokenizer loaded from ``path``, or the reason it refused, from
    the library's own log (it writes it to stderr and raises a generic error)."""
    with native_stderr_without():  # its import logs a line at Info level
        from pytorch_tokenizers import CppHFTokenizer

    tokenizer = CppHFTokenizer()
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            tokenizer.load(str(path))
            return tokenizer, None
        except RuntimeError as e:
            failure = str(e)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        lines = [line.split("] ", 1)[-1] for line in log.read().decode("utf-8", "replace").splitlines()]
    errors = [line for line in lines if "fail" in line.lower() or "unsupported" in line.lower()]
    return None, (errors[-1] if errors else failure)


def write_bundle_tokenizer(source: Path, bundle: Path, model_tokenizer, texts: list[str]) -> list[str]:
    """Write ``bundle/tokenizer.json`` from ``source``'s, made loadable by pytorch_tokenizers,
    then load it there and check it encodes ``texts`` as ``model_tokenizer`` (the model's fast
    tokenizer) does. Returns the changes made, in words."""
    src = Path(source) / TOKENIZER_FILE
    try:
        spec = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RankdownError(f"{src}: cannot read tokenizer: {e}") from None
    if not isinstance(spec, dict):
        raise RankdownError(f"{src}: not a tokenizer.json (expected a JSON object)")
    fixed, changes = runtime_readable(spec)
    dest = Path(bundle) / TOKENIZER_FILE
    if changes:
        write_text_atomic(dest, json.dumps(fixed, ensure_ascii=False, indent=2) + "\n")
    else:
        shutil.copy2(src, dest)
    runtime, reason = _load_in_runtime_library(dest)
    if runtime is None:
        raise RankdownError(f"{src}: ExecuTorch's tokenizer library (pytorch_tokenizers) cannot load it: {reason}")
    for text in texts:
        want = model_tokenizer(text, add_special_tokens=False)["input_ids"]
        got = list(runtime.encode(text, 0, 0))
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise RankdownError(f"{src}: pytorch_tokenizers encodes {text[:30]!r}... differently from the model's "
                                f"tokenizer (first difference at token {at}: {got[at:at + 3]} vs {want[at:at + 3]})")
    return changes
