"""User data: ``.txt``, ``.jsonl`` ({"text"} or {"prompt", "answer"} per line), or a folder of them."""

from __future__ import annotations

import json
from pathlib import Path

from rankdown.errors import RankdownError
from rankdown.tasks import QAExample, TaskData

SUFFIXES = (".txt", ".jsonl")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RankdownError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise RankdownError(f"{path}: cannot read: {e.strerror}") from None


def _jsonl(path: Path) -> tuple[list[str], list[QAExample]]:
    texts, qa = [], []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise RankdownError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(row, dict):
            raise RankdownError(f"{path}:{number}: not a JSON object")
        if isinstance(row.get("text"), str) and row["text"]:
            texts.append(row["text"])
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str) and row["prompt"]:
            qa.append(QAExample(row["prompt"], row["answer"].strip()))
        else:
            raise RankdownError(f'{path}:{number}: expected {{"text": ...}} or {{"prompt": ..., "answer": ...}}')
    return texts, qa


def load_data(path: Path | str) -> TaskData:
    """Texts and question/answer pairs from a user file or folder; empty data is an error."""
    path = Path(path)
    if not path.exists():
        raise RankdownError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise RankdownError(f"{path}: folder holds no .txt or .jsonl files")
    elif path.suffix in SUFFIXES:
        files = [path]
    else:
        raise RankdownError(f"{path}: unsupported data file (use .txt, .jsonl, or a folder of them)")
    texts: list[str] = []
    qa: list[QAExample] = []
    for file in files:
        if file.suffix == ".txt":
            text = _read(file)
            if text.strip():
                texts.append(text)
        else:
            more_texts, more_qa = _jsonl(file)
            texts += more_texts
            qa += more_qa
    if not texts and not qa:
        raise RankdownError(f"{path}: no data (empty file or only blank lines)")
    return TaskData(name=path.stem, texts=tuple(texts), qa=tuple(qa))
