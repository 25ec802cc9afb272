"""`crucible data prepare | publish | train`: build the tokenized page store, publish it, train on it.

`publish` uploads a prepared page store to a bucket with its manifest (transport.dataset) and prints
the hparams lines that pin it: `data.manifest_hash` and the bucket's endpoint, name and read key.

`prepare` builds the offline corpus (or reads the user's files), trains or loads a tokenizer, and
writes the page shards. `train` is the smallest end-to-end check of the model and the data: one
process, the tiny model, a few windows of inner steps, held-out loss printed as it falls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from neurons.node_config import HPARAMS_FLAGS


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    prep = sub.add_parser("prepare", help="build the tokenizer and tokenized pages")
    HPARAMS_FLAGS.add_to(prep)
    prep.add_argument("--out", required=True, type=Path, help="output folder")
    prep.add_argument("--input", action="append", type=Path, default=[],
                      help="your own .txt/.jsonl/.parquet file or folder (repeatable); default: offline corpus")
    prep.add_argument("--tokenizer", type=Path, help="use this tokenizer.json instead of training one")
    prep.add_argument("--tokenizer-chars", type=int, default=None,
                      help="characters the trained tokenizer sees, the corpus's first ones "
                           "(default 200,000,000; its memory grows with what it sees; 0: all)")
    prep.add_argument("--max-chars", type=int,
                      help="cap on corpus characters (default: the whole --input; the offline corpus: from hparams)")
    pub = sub.add_parser("publish", help="upload a prepared dataset with its manifest; print the hparams that pin it")
    HPARAMS_FLAGS.add_to(pub)
    pub.add_argument("--data", required=True, type=Path, help="a prepared dataset folder")
    for name, what in (("endpoint", "S3 endpoint URL"), ("region", "signing region (default auto)"),
                       ("name", "bucket name")):
        pub.add_argument(f"--bucket.{name}", dest=f"bucket_{name}", help=f"{what} (or $CRUCIBLE_BUCKET_{name.upper()})")
    pub.add_argument("--bucket.allow-private", dest="bucket_allow_private", action="store_true",
                     help="allow a plain http or private endpoint (your own MinIO; a devnet)")
    pub.epilog = ("keys come from the environment only: CRUCIBLE_BUCKET_WRITE_KEY/_WRITE_SECRET upload, "
                  "CRUCIBLE_BUCKET_READ_KEY/_READ_SECRET are what nodes read with (printed as data.read_key/_secret)")
    train = sub.add_parser("train", help="train the model on one process and print held-out loss")
    HPARAMS_FLAGS.add_to(train)
    train.add_argument("--data", required=True, type=Path, help="a prepared dataset folder")
    train.add_argument("--windows", type=int, default=6, help="windows of inner steps to run")
    train.add_argument("--device", default="cpu", help="torch device")


def _fail(command: str, message: str) -> int:
    """One line on stderr, exit code 1."""
    print(f"crucible data {command}: {message}", file=sys.stderr)
    return 1


def _prepare(args: argparse.Namespace) -> int:
    from neurons.corpus import CorpusError, CorpusReport, file_documents, stdlib_documents
    from neurons.dataset import TOKENIZER_SAMPLE_CHARS, prepare_dataset
    from protocol.data import DatasetError

    hp = HPARAMS_FLAGS.parse(args).hparams()
    if args.tokenizer_chars is not None and args.tokenizer_chars < 0:
        return _fail("prepare", f"--tokenizer-chars {args.tokenizer_chars}: must be 0 (all) or more")
    if args.max_chars is not None and args.max_chars <= 0:
        return _fail("prepare", f"--max-chars {args.max_chars}: must be 1 or more")
    max_chars = args.max_chars if args.input else (args.max_chars or hp.data.corpus_max_chars)
    started = time.perf_counter()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail("prepare", f"--out {args.out}: cannot create the folder: {exc.strerror or exc}")
    reports: list[CorpusReport] = []

    def documents():  # one fresh, streamed pass over the inputs per call (training, then tokenizing)
        reports.append(CorpusReport())
        if args.input:
            return file_documents(args.input, max_chars, reports[-1])
        return _counted(stdlib_documents(max_chars), reports[-1])

    source = ", ".join(map(str, args.input)) if args.input else \
        "offline corpus (Python stdlib docs, docstrings and sources)"
    try:
        if args.tokenizer is not None and not args.tokenizer.is_file():
            raise DatasetError(f"tokenizer not found: {args.tokenizer}")
        sample = TOKENIZER_SAMPLE_CHARS if args.tokenizer_chars is None else (args.tokenizer_chars or None)
        info = prepare_dataset(hp, args.out, documents, args.tokenizer, progress=True, tokenizer_chars=sample)
    except (CorpusError, DatasetError) as exc:
        return _fail("prepare", str(exc))
    except OSError as exc:  # writing pages or the tokenizer: a full disk, a read-only folder
        return _fail("prepare", f"{exc.filename or args.out}: {exc.strerror or exc}")
    seconds = time.perf_counter() - started
    report = reports[-1]  # the last pass read everything the pages hold
    print(f"source: {source}: {report.documents:,} documents, {report.chars:,} characters")
    for line in report.lines():
        print(line)
    print(f"wrote {info.tokens:,} tokens: {info.train_pages:,} train pages ({info.train_tokens:,} tokens) and "
          f"{info.heldout_pages:,} held-out pages of {info.seq_len} tokens to {info.path} in {seconds:.1f} s")
    return 0


def _counted(docs, report):
    for doc in docs:
        report.documents += 1
        report.chars += len(doc)
        yield doc


def _train(args: argparse.Namespace) -> int:
    from neurons.training import inner_train, make_inner_optimizer, mean_loss
    from protocol.data import DatasetError, PageStore, assign
    from protocol.model import build_model, count_params

    hp = HPARAMS_FLAGS.parse(args).hparams()
    try:
        store = PageStore(args.data, hp)
    except DatasetError as exc:
        return _fail("train", f"--data {args.data}: {exc}")
    model = build_model(hp, args.device)
    optimizer = make_inner_optimizer(model, hp)
    heldout = store.pages(range(min(64, store.num_heldout)), "heldout")
    print(f"model: {count_params(model):,} parameters, preset {hp.name}; data: {store.num_train:,} train pages")
    print(f"window  -1  held-out loss {mean_loss(model, heldout):.4f}")
    for window in range(args.windows):
        samples = store.pages(assign("local", window, hp.data.seed, hp.samples_per_window, store.num_train))
        started = time.perf_counter()
        stats = inner_train(model, optimizer, samples, hp, window)
        rate = stats.tokens / (time.perf_counter() - started)
        print(f"window {window:3d}  train loss {stats.mean_loss:.4f}  held-out loss {mean_loss(model, heldout):.4f}"
              f"  ({rate:,.0f} tokens/s)")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from neurons.node_config import BucketSettings, bucket_credentials
    from protocol.data import DatasetError
    from transport.bucket import Bucket, StorageError
    from transport.dataset import publish_dataset

    hp = HPARAMS_FLAGS.parse(args).hparams()
    given = {k: getattr(args, f"bucket_{k}") for k in ("endpoint", "region", "name") if getattr(args, f"bucket_{k}")}
    try:
        creds = bucket_credentials(BucketSettings(**given), hp.endpoints.allowance(), args.bucket_allow_private)
    except (ValueError, ValidationError) as exc:
        return _fail("publish", str(exc).splitlines()[0])
    started = time.perf_counter()
    sent = [0]

    def progress(name: str, size: int) -> None:
        sent[0] += size

    try:
        pinned, manifest = publish_dataset(Bucket(creds.write_config()), args.data, progress)
    except DatasetError as exc:
        return _fail("publish", f"--data {args.data}: {exc}")
    except StorageError as exc:
        return _fail("publish", str(exc))
    read = creds.read
    print(f"published {manifest.num_pages('train'):,} train and {manifest.num_pages('heldout'):,} held-out pages "
          f"({len(manifest.shards)} shards, {sent[0] / 2**20:.1f} MiB) to s3://{read.bucket}/dataset/{pinned[:16]}/ "
          f"in {time.perf_counter() - started:.1f} s")
    print("pin it in the network's hparams:")
    lines = {"manifest_hash": pinned, "endpoint": read.endpoint_url, "region": read.region, "bucket": read.bucket,
             "read_key": read.access_key_id, "read_secret": read.secret_access_key.get_secret_value()}
    for key, value in lines.items():
        if value is not None:
            print(f"  --set data.{key}={value}")
    return 0


def run_cli(args: argparse.Namespace) -> int:
    if args.data_command == "publish":
        return _publish(args)
    return _prepare(args) if args.data_command == "prepare" else _train(args)
