"""Where the text comes from: the offline default corpus and the user's own files.

Gauntlet's loss signal must mean something, so the devnet never trains on random tokens. Every
fresh machine with Python has a few tens of megabytes of real English and real code: the standard
library's documentation topics (`pydoc_data.topics`), its module docstrings and its source files.
The offline corpus is built from those, in a deterministic order, capped at `corpus_max_chars`.

For real runs the user passes their own `.txt`, `.jsonl` (a `text` field) or `.parquet` files (a
`text` column, needs pyarrow), or folders of them. Files are read as a stream (a `.txt` file in
line-aligned pieces of at most `MAX_RECORD_CHARS`), so a corpus larger than memory can be prepared.

Text that is not clean is cleaned and counted in a `CorpusReport`, never passed on to the tokenizer:
bytes that are not UTF-8 (a latin-1 line in a UTF-8 file, a stray byte) and lone UTF-16 surrogates
(`"\\ud83d"` in JSON) become U+FFFD; empty records are skipped; a record longer than
`MAX_RECORD_CHARS` is cut into pieces at line breaks. Input that is not text at all (a NUL byte: a
binary file), a JSON line that does not parse, or a record without a string `text` is refused with
file and line (`CorpusError`).
"""

from __future__ import annotations

import ast
import codecs
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip"}


MAX_RECORD_CHARS = 1 << 20  # a longer record is cut at line breaks into pieces of at most this many characters
_READ_BYTES = 1 << 20  # a .txt file is read in pieces of this many bytes (then cut at a line break)
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


class CorpusError(ValueError):
    """An input that cannot be used as training text."""


@dataclass
class CorpusReport:
    """What reading the corpus cleaned: counts, and where the first of each kind was (file:line)."""

    documents: int = 0
    chars: int = 0
    invalid_bytes: int = 0  # bytes that were not UTF-8, each replaced by U+FFFD
    surrogates: int = 0  # lone UTF-16 surrogates (from JSON escapes), each replaced by U+FFFD
    empty_records: int = 0  # records with no text but whitespace, skipped
    split_records: int = 0  # records longer than MAX_RECORD_CHARS, cut into pieces
    first: dict[str, str] = field(default_factory=dict)  # kind -> "file:line" of its first occurrence
    capped_at: str | None = None  # "file:line" where a --max-chars cap stopped reading (None: read to the end)

    def _note(self, kind: str, count: int, where: str) -> None:
        if count:
            setattr(self, kind, getattr(self, kind) + count)
            self.first.setdefault(kind, where)

    def lines(self) -> list[str]:
        """One line per kind of cleaning that happened (none for a clean corpus)."""
        what = {
            "invalid_bytes": "bytes not valid UTF-8 replaced by U+FFFD",
            "surrogates": "lone UTF-16 surrogates replaced by U+FFFD",
            "empty_records": "empty records skipped",
            "split_records": f"records longer than {MAX_RECORD_CHARS:,} characters cut at line breaks",
        }
        lines = [f"cleaned: {getattr(self, k):,} {text} (first at {self.first[k]})"
                 for k, text in what.items() if getattr(self, k)]
        if self.capped_at is not None:
            lines.append(f"stopped at the --max-chars cap ({self.chars:,} characters read) at {self.capped_at}; "
                         "the rest of the input was not used")
        return lines


def clean_text(text: str, report: CorpusReport | None = None, where: str = "", *, decoded: bool = True) -> str:
    """`text` with every lone surrogate (and surrogate-escaped byte) replaced by U+FFFD, counted.

    `decoded`: `text` came from bytes decoded with surrogateescape, so U+DC80..U+DCFF are bytes that were
    not UTF-8; False (a JSON string, a parquet value) counts every lone surrogate as a surrogate."""
    if not _SURROGATE.search(text):
        return text
    if report is not None:
        escaped = len(_ESCAPED_BYTE.findall(text)) if decoded else 0
        report._note("invalid_bytes", escaped, where)
        report._note("surrogates", len(_SURROGATE.findall(text)) - escaped, where)
    return _SURROGATE.sub("\ufffd", text)


def _split(text: str, limit: int = MAX_RECORD_CHARS) -> Iterator[str]:
    """Pieces of at most `limit` characters, cut after a newline where there is one."""
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit) + 1 or limit
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


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
        text = clean_text(topics[key].strip())
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
                yield clean_text(text)  # a docstring may hold a lone surrogate escape


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


def _binary(path: Path, lineno: int, raw: bytes) -> CorpusError:
    line = lineno + raw[: raw.index(b"\0")].count(b"\n")
    return CorpusError(f"{path}:{line}: binary data (a NUL byte), not UTF-8 text; remove the file from the inputs")


def _jsonl_documents(path: Path, report: CorpusReport) -> Iterator[tuple[str, str]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if b"\0" in raw:
                raise _binary(path, lineno, raw)
            line = clean_text(raw.decode("utf-8", "surrogateescape"), report, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an integer too long
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else (
                    "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0])
                raise CorpusError(f"{where}: not JSON ({msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{where}: no string 'text' field")
            yield clean_text(text, report, where, decoded=False), where


def _parquet_documents(path: Path, report: CorpusReport) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(columns=["text"], batch_size=1024)
        row = 0
        for batch in batches:
            for text in batch.column(0).to_pylist():
                row += 1
                if isinstance(text, str):
                    where = f"{path}:row {row}"
                    yield clean_text(text, report, where, decoded=False), where
                elif text is not None:
                    raise CorpusError(f"{path}:row {row}: 'text' is not a string")
    except CorpusError:
        raise
    except Exception as exc:  # pyarrow raises many types for bad files
        raise CorpusError(f"{path}: cannot read a 'text' column: {exc}") from None


def _text_documents(path: Path, report: CorpusReport) -> Iterator[tuple[str, str]]:
    """A text file as line-aligned pieces, decoded incrementally (bad bytes counted, NUL refused)."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    lineno, pending = 1, ""
    try:
        with path.open("rb") as fh:
            while True:
                raw = fh.read(_READ_BYTES)
                if b"\0" in raw:
                    raise _binary(path, lineno, raw)
                where = f"{path}:{lineno}"
                text = pending + clean_text(decoder.decode(raw, final=not raw), report, where)
                if not raw:
                    if text:
                        yield text, where
                    return
                cut = text.rfind("\n") + 1
                if len(text) - cut > MAX_RECORD_CHARS:  # no line break for a long way: cut anyway
                    cut = len(text)
                done, pending = text[:cut], text[cut:]
                if len(done) >= MAX_RECORD_CHARS:
                    yield done, where
                else:
                    pending = done + pending
                lineno += raw.count(b"\n")
    except OSError as exc:
        raise CorpusError(f"{path}: unreadable ({exc.strerror or exc})") from None


def file_documents(paths: list[Path], max_chars: int | None = None,
                   report: CorpusReport | None = None) -> Iterator[str]:
    """Documents from the user's files, in the given order, streamed and cleaned (counted in `report`).

    Raises CorpusError with file:line on input that is not text."""
    report = report if report is not None else CorpusReport()
    budget = max_chars if max_chars is not None else float("inf")
    produced = 0
    for path in _expand(paths):
        if path.suffix == ".jsonl":
            docs = _jsonl_documents(path, report)
        elif path.suffix == ".parquet":
            docs = _parquet_documents(path, report)
        else:
            docs = _text_documents(path, report)
        for text, where in docs:
            if budget <= 0:
                report.capped_at = where
                return
            if not text.strip():
                report._note("empty_records", 1, where)
                continue
            if len(text) > MAX_RECORD_CHARS:
                report._note("split_records", 1, where)
            for piece in _split(text):
                budget -= len(piece)
                produced += 1
                report.documents += 1
                report.chars += len(piece)
                yield piece
    if produced == 0:
        raise CorpusError(f"inputs {', '.join(map(str, paths))} hold no text")
