"""Where the text comes from: the offline default corpus and the user's own files.

Gauntlet's loss signal must mean something, so the devnet never trains on random tokens. Every
fresh machine with Python has a few tens of megabytes of real English and real code: the standard
library's documentation topics (`pydoc_data.topics`), its module docstrings and its source files.
The offline corpus is built from those, in a deterministic order, capped at `corpus_max_chars`.

For real runs the user passes their own `.txt`, `.jsonl` (a `text` field) or `.parquet` files (a
`text` column, needs pyarrow), or folders of them; every bad input is one clear `CorpusError`.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip"}


class CorpusError(ValueError):
    """An input that cannot be used as training text."""


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_docstring(source: str) -> str | None:
    try:
        return ast.get_docstring(ast.parse(source))
    except (SyntaxError, ValueError, RecursionError):
        return None


def stdlib_documents(max_chars: int) -> Iterator[str]:
    """English documentation first, then module docstrings interleaved with source files."""
    from pydoc_data.topics import topics

    budget = max_chars
    for key in sorted(topics):
        text = topics[key].strip()
        if text and budget > 0:
            budget -= len(text)
            yield text
    for path in _stdlib_sources():
        if budget <= 0:
            return
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        doc = _module_docstring(source)
        for text in (doc, source):
            if text and text.strip() and budget > 0:
                budget -= len(text)
                yield text


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise CorpusError(f"input not found: {path}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise CorpusError(f"input folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        elif path.suffix in TEXT_SUFFIXES:
            files.append(path)
        else:
            raise CorpusError(f"input {path}: unsupported file type (use {', '.join(TEXT_SUFFIXES)})")
    return files


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: no string 'text' field")
            if text.strip():
                yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path, columns=["text"])
    except Exception as exc:  # pyarrow raises many types for bad files
        raise CorpusError(f"{path}: cannot read a 'text' column: {exc}") from None
    for text in table.column("text").to_pylist():
        if isinstance(text, str) and text.strip():
            yield text


def file_documents(paths: list[Path], max_chars: int | None = None) -> Iterator[str]:
    """Documents from the user's files, in the given order; raises CorpusError on bad input."""
    budget = max_chars if max_chars is not None else float("inf")
    produced = 0
    for path in _expand(paths):
        if path.suffix == ".jsonl":
            docs: Iterator[str] = _jsonl_documents(path)
        elif path.suffix == ".parquet":
            docs = _parquet_documents(path)
        else:
            try:
                docs = iter([path.read_text(encoding="utf-8")])
            except (UnicodeDecodeError, OSError) as exc:
                raise CorpusError(f"{path}: unreadable as UTF-8 text ({exc})") from None
        for text in docs:
            if budget <= 0:
                return
            if text.strip():
                budget -= len(text)
                produced += 1
                yield text
    if produced == 0:
        raise CorpusError(f"inputs {', '.join(map(str, paths))} hold no text")
