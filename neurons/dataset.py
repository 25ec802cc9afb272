"""Building a page store: documents → a BPE tokenizer → fixed-length token pages on disk.

`prepare_dataset` turns documents (see `neurons.corpus`) into fixed-length token pages: a byte-level
BPE tokenizer is trained locally with `tokenizers` (or an existing `tokenizer.json` is used), every
document is tokenized and joined with an end-of-text token, and the stream is cut into pages of
`seq_len` tokens written as `.npy` shards plus `index.json` (read by `protocol.data.PageStore`).
About `heldout_fraction` of the pages (chosen by a hash of the page number, so spread over the whole
corpus) form the held-out split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.data import EOT, INDEX_VERSION, PAGES_PER_SHARD, TOKENIZER_FILE, DatasetError
from protocol.hparams import HParams


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


def prepare_dataset(
    hp: HParams,
    out_dir: str | Path,
    documents: list[str],
    tokenizer_path: str | Path | None = None,
    progress: bool = False,
) -> DatasetInfo:
    """Tokenize documents into train/held-out page shards under out_dir (overwrites)."""
    from tokenizers import Tokenizer

    if not documents:
        raise DatasetError("no documents to tokenize")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is not None:
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise DatasetError(f"tokenizer {tokenizer_path}: cannot load ({exc})") from None
    else:
        tokenizer = train_tokenizer(documents, hp.model.vocab_size)
    if tokenizer.get_vocab_size() > hp.model.vocab_size:
        raise DatasetError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, model.vocab_size is {hp.model.vocab_size}"
        )
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise DatasetError(f"tokenizer has no {EOT} token")
    tokenizer.save(str(out / TOKENIZER_FILE))

    dtype = np.uint16 if hp.model.vocab_size <= 1 << 16 else np.uint32
    seq = hp.model.seq_len
    pages: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    carry = np.zeros(0, dtype=dtype)
    page_no = tokens = 0
    batch = 256
    steps = range(0, len(documents), batch)
    if progress:
        from rich.progress import track

        steps = track(steps, description="tokenizing", total=len(steps))
    for start in steps:
        encodings = tokenizer.encode_batch(documents[start : start + batch])
        ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in encodings]
        stream = np.concatenate([carry, *ids])
        tokens += sum(len(x) for x in ids)
        full = len(stream) // seq
        for row in stream[: full * seq].reshape(full, seq):
            pages["heldout" if _is_heldout(page_no, hp.data.heldout_fraction) else "train"].append(row)
            page_no += 1
        carry = stream[full * seq :]

    for old in out.glob("*-*.npy"):
        old.unlink()
    index: dict = {"version": INDEX_VERSION, "seq_len": seq, "vocab_size": hp.model.vocab_size,
                   "dtype": np.dtype(dtype).name, "tokens": tokens}
    for split, rows in pages.items():
        if not rows:
            raise DatasetError(f"corpus too small: no {split} pages of {seq} tokens")
        shards = []
        for i in range(0, len(rows), PAGES_PER_SHARD):
            name = f"{split}-{i // PAGES_PER_SHARD:05d}.npy"
            np.save(out / name, np.stack(rows[i : i + PAGES_PER_SHARD]), allow_pickle=False)
            shards.append({"file": name, "pages": len(rows[i : i + PAGES_PER_SHARD])})
        index[split] = {"pages": len(rows), "shards": shards}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return DatasetInfo(out, len(pages["train"]), len(pages["heldout"]), seq, tokens)
