"""The reference loss curve: a tiny SparseLoCo run whose held-out losses are stored and re-checked.

The network's training is deterministic by design: θ_0 comes from a private RNG
(`protocol.model.build_model`), sample assignment is a keyed permutation (`protocol.data.assign`)
and the aggregate is summed in float64 in sorted peer order (`protocol.codec_aggregate`). So a
short run of `bench.convergence_methods.run_sparseloco` gives the same numbers every time, and any
change to the model, the inner loop, the codec, the wire reader, the aggregation or the outer step
shows up as a changed curve (torchtitan keeps such curves in `tests/assets/losses/`).
`tests/test_reference_loss.py` re-runs it and compares with `tests/assets/losses/tiny_sparseloco.json`.

The data must not depend on the machine either, so the run does not use the offline stdlib corpus
(its text changes with the Python version) nor a trained BPE tokenizer (its merges may change with
the `tokenizers` version). It uses a synthetic language instead: a first-order Markov chain over
`vocab_size - 1` words, each word with four successors drawn by blake2b with probabilities
1/2, 1/4, 1/8, 1/8, so there is structure to learn and the held-out loss falls from ln(vocab) ≈ 8.3.
The words go through a fixed word-level `tokenizers` tokenizer and the real `prepare_dataset`, so
pages are cut and split into train/held-out exactly as for real data.

When a change is *meant* to alter training, regenerate the file and commit it with the change:

    .venv/bin/crucible bench reference-loss --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.convergence import _workload
from bench.convergence_methods import Settings, run_sparseloco
from neurons.dataset import EOT, prepare_dataset
from protocol.data import PageStore
from protocol.hparams import HParams, load_hparams

ASSET = Path(__file__).resolve().parent.parent / "tests" / "assets" / "losses" / "tiny_sparseloco.json"
REGENERATE = ".venv/bin/crucible bench reference-loss --write"

# The run: small enough for a couple of CPU seconds per window, long enough for the loss to move.
PRESET = "tiny"
# 4 inner steps × batch 8 = 32 samples per peer per window; 5 % held out gives ~20 held-out pages.
OVERRIDES = ["inner.steps=4", "data.heldout_fraction=0.05"]
PEERS = 2
WINDOWS = 4
SEED = 0  # the peers' identities (so their assigned samples), as `crucible bench convergence --seed`
HELDOUT_PAGES = 16
THREADS = 2
CORPUS_TOKENS = 60_000  # ≈ 470 pages of 128 tokens
CORPUS_SEED = b"crucible-reference-loss-v1"


def _draw(*parts: int) -> int:
    """A 64-bit integer from blake2b over the parts: the same on every machine and Python version."""
    data = b"".join(p.to_bytes(8, "little") for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=CORPUS_SEED).digest(), "little")


def synthetic_documents(tokens: int, words: int) -> list[str]:
    """Documents of `w{i}` words from a fixed Markov chain (i in [1, words]), about `tokens` words in all."""
    docs: list[str] = []
    total = doc = 0
    while total < tokens:
        length = 40 + _draw(0, doc) % 200
        word = 1 + _draw(1, doc) % words
        out = []
        for pos in range(length):
            out.append(f"w{word}")
            r = _draw(2, doc, pos) % 8  # successor 0 with p 1/2, 1 with 1/4, 2 and 3 with 1/8 each
            choice = 0 if r < 4 else 1 if r < 6 else 2 if r == 6 else 3
            word = 1 + _draw(3, word, choice) % words
        docs.append(" ".join(out))
        total += length + 1
        doc += 1
    return docs


def word_tokenizer(vocab_size: int):
    """A fixed word-level tokenizer: EOT is id 0, `w{i}` is id i. Nothing is trained."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOT: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def reference_hparams() -> HParams:
    return load_hparams(PRESET, overrides=list(OVERRIDES))


def settings() -> dict:
    """Everything that defines the run; stored beside the losses so a mismatch is visible."""
    return {
        "preset": PRESET, "overrides": list(OVERRIDES), "revision": reference_hparams().revision(),
        "peers": PEERS, "windows": WINDOWS, "seed": SEED, "heldout_pages": HELDOUT_PAGES,
        "corpus": {"kind": "markov-words", "tokens": CORPUS_TOKENS, "seed": CORPUS_SEED.decode()},
        "method": "bench.convergence_methods.run_sparseloco", "outer_lr": "preset", "device": "cpu",
    }


def run_reference(threads: int = THREADS) -> dict:
    """Run the reference SparseLoCo training on the CPU with `threads` torch threads; return the record."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hp = reference_hparams()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="crucible-reference-loss-") as scratch:
            folder = Path(scratch)
            word_tokenizer(hp.model.vocab_size).save(str(folder / "words.json"))
            docs = synthetic_documents(CORPUS_TOKENS, hp.model.vocab_size - 1)
            prepare_dataset(hp, folder / "data", docs, tokenizer_path=folder / "words.json")
            store = PageStore(folder / "data", hp)
            work = _workload(hp, store, PEERS, WINDOWS, SEED, HELDOUT_PAGES, torch.device("cpu"))
            result = run_sparseloco(work, Settings(outer_lr=hp.outer.lr), lambda *_: None)
            pages = {"train": store.num_train, "heldout": store.num_heldout}
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return {
        "settings": {**settings(), "dataset_pages": pages},
        "heldout_loss": result.curve,  # after 0, 1, ..., WINDOWS windows
        "train_loss": result.train_curve,  # mean inner loss per window, over peers and steps
        "tokens": result.tokens,
        "made_with": {"torch": torch.__version__, "python": platform.python_version(), "threads": threads,
                      "seconds": round(seconds, 1)},
    }


def load_reference(path: Path = ASSET) -> dict:
    return json.loads(path.read_text())


def write_reference(record: dict, path: Path = ASSET) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", action="store_true",
                        help=f"overwrite {ASSET.relative_to(ASSET.parents[3])} with this run's losses")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch CPU threads (default {THREADS})")


def run_cli(args: argparse.Namespace) -> int:
    record = run_reference(args.threads)
    if args.write:
        write_reference(record)
        print(f"wrote {ASSET}", file=sys.stderr)
    print(json.dumps(record, indent=1))
    return 0
