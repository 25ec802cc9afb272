"""Building a page store: documents → a BPE tokenizer → fixed-length token pages on disk.

`prepare_dataset` turns documents (see `neurons.corpus`) into fixed-length token pages: a byte-level
BPE tokenizer is trained locally with `tokenizers` (or an existing `tokenizer.json` is used), every
document is tokenized and joined with an end-of-text token, and the stream is cut into pages of
`seq_len` tokens written as `.npy` shards plus `index.json` (read by `protocol.data.PageStore`).
About `heldout_fraction` of the pages (chosen by a hash of the page number, so spread over the whole
corpus) form the held-out split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurons.corpus import CorpusError
from protocol.data import EOT, INDEX_VERSION, PAGES_PER_SHARD, TOKENIZER_FILE, DatasetError
from protocol.hparams import HParams

TOKENIZER_SAMPLE_CHARS = 200_000_000  # characters a trained tokenizer sees (the corpus's first ones)


def _load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def train_tokenizer(documents: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


@dataclass(frozen=True)
class DatasetInfo:
    path: Path
    train_pages: int
    heldout_pages: int
    seq_len: int
    tokens: int

    @property
    def train_tokens(self) -> int:
        return self.train_pages * self.seq_len


def _is_heldout(page: int, fraction: float) -> bool:
    digest = hashlib.blake2b(page.to_bytes(8, "little"), digest_size=8, person=b"heldout").digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


Documents = Iterable[str] | Callable[[], Iterable[str]]


def _passes(documents: Documents) -> Callable[[], Iterable[str]]:
    """A way to read the documents again: a factory is called per pass (streaming), a list is reused."""
    if callable(documents):
        return documents
    if not isinstance(documents, (list, tuple)):
        documents = list(documents)  # a one-shot iterator: held in memory for the second pass
    return lambda: documents


class _ShardWriter:
    """Pages of one split, written to `.npy` shards as each fills (a corpus larger than memory)."""

    def __init__(self, out: Path, split: str, seq: int, dtype: np.dtype):
        self.out, self.split, self.seq, self.dtype = out, split, seq, dtype
        self.rows: list[np.ndarray] = []
        self.shards: list[dict] = []
        self.pages = 0

    def add(self, row: np.ndarray) -> None:
        self.rows.append(row.copy())  # a view would keep its whole batch's token stream alive until the flush
        if len(self.rows) == PAGES_PER_SHARD:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.split}-{len(self.shards):05d}.npy"
        np.save(self.out / name, np.stack(self.rows), allow_pickle=False)
        self.shards.append({"file": name, "pages": len(self.rows)})
        self.pages += len(self.rows)
        self.rows = []


def _batches(docs: Iterable[str], size: int, max_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Lists of at most `size` documents and (but for a single longer one) `max_chars` characters:
    token ids of a batch are held as Python ints, ~36 bytes each, so a batch is bounded by text too."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        if batch and chars + len(doc) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc)
        if len(batch) == size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def prepare_dataset(
    hp: HParams,
    out_dir: str | Path,
    documents: Documents,
    tokenizer_path: str | Path | None = None,
    progress: bool = False,
    tokenizer_chars: int | None = TOKENIZER_SAMPLE_CHARS,
) -> DatasetInfo:
    """Tokenize documents into train/held-out page shards under out_dir (overwrites).

    `documents`: a list, or a callable returning a fresh iterable per pass (two passes when the
    tokenizer is trained here: training, then tokenizing), so a corpus is never held whole in memory.
    A trained tokenizer sees the first `tokenizer_chars` characters only (None: all): the BPE trainer
    counts every distinct word it sees, so its memory grows with the corpus, while a few hundred
    million characters already fix a vocabulary of this size. Shards are written as they fill. A
    tokenizer failure is a DatasetError, never a bare exception.
    """

    read = _passes(documents)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is not None:
        try:
            tokenizer = _load_tokenizer(tokenizer_path)
        except Exception as exc:
            raise DatasetError(f"tokenizer {tokenizer_path}: cannot load ({exc})") from None
    else:
        seen = [0]

        def counted() -> Iterator[str]:
            budget = tokenizer_chars if tokenizer_chars is not None else float("inf")
            for doc in read():
                if budget <= 0:
                    return
                seen[0] += 1
                budget -= len(doc)
                yield doc

        try:
            tokenizer = train_tokenizer(counted(), hp.model.vocab_size)
        except (CorpusError, DatasetError):
            raise
        except Exception as exc:  # the Rust trainer raises several types on text it cannot take
            raise DatasetError(f"training the tokenizer failed: {type(exc).__name__}: {exc}") from None
        if seen[0] == 0:
            raise DatasetError("no documents to tokenize")
    if tokenizer.get_vocab_size() > hp.model.vocab_size:
        raise DatasetError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, model.vocab_size is {hp.model.vocab_size}"
        )
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise DatasetError(f"tokenizer has no {EOT} token")
    tokenizer.save(str(out / TOKENIZER_FILE))

    dtype = np.dtype(np.uint16 if hp.model.vocab_size <= 1 << 16 else np.uint32)
    seq = hp.model.seq_len
    for old in out.glob("*-*.npy"):
        old.unlink()
    (out / "index.json").unlink(missing_ok=True)  # no stale index over half-written shards
    writers = {split: _ShardWriter(out, split, seq, dtype) for split in ("train", "heldout")}
    carry = np.zeros(0, dtype=dtype)
    page_no = tokens = docs = 0
    batches: Iterable[list[str]] = _batches(read(), 256)
    if progress:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        bar = Progress(SpinnerColumn(), TextColumn("tokenizing {task.completed:,} documents"), TimeElapsedColumn())
        task = bar.add_task("tokenizing", total=None)
    with bar if progress else contextlib.nullcontext():
        for batch in batches:
            try:
                encodings = tokenizer.encode_batch(batch)
            except Exception as exc:  # the Rust tokenizer raises several types on text it cannot take
                raise DatasetError(f"tokenizing failed: {type(exc).__name__}: {exc}") from None
            docs += len(batch)
            if progress:
                bar.update(task, completed=docs)
            ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in encodings]
            stream = np.concatenate([carry, *ids])
            tokens += sum(len(x) for x in ids)
            full = len(stream) // seq
            for row in stream[: full * seq].reshape(full, seq):
                writers["heldout" if _is_heldout(page_no, hp.data.heldout_fraction) else "train"].add(row)
                page_no += 1
            carry = stream[full * seq :].copy()
    if docs == 0:
        raise DatasetError("no documents to tokenize")

    index: dict = {"version": INDEX_VERSION, "seq_len": seq, "vocab_size": hp.model.vocab_size,
                   "dtype": dtype.name, "tokens": tokens}
    for split, writer in writers.items():
        writer.flush()
        if not writer.pages:
            raise DatasetError(f"corpus too small: no {split} pages of {seq} tokens")
        index[split] = {"pages": writer.pages, "shards": writer.shards}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return DatasetInfo(out, writers["train"].pages, writers["heldout"].pages, seq, tokens)

