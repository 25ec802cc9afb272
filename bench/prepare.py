"""`crucible bench prepare`: peak memory and speed of `crucible data prepare` on a large text file, against
the offline corpus in the same run.

Issue 18 asks that a corpus larger than memory can be prepared. Both runs are `crucible data prepare`
child processes (the real command, tokenizer training included), and each one's peak resident memory
is the kernel's `ru_maxrss` for that child (`os.wait4`), so nothing of this process is counted.

- baseline: the offline corpus (`corpus_max_chars` of the preset: 6 M characters for tiny);
- large: a synthetic UTF-8 `.txt` file of `--mb` MiB, written streamed into a temporary folder: the
  offline corpus's documents in a freshly shuffled order per pass, with one word in ten replaced by a
  pseudo-word drawn from a Zipf law (exponent 1.1, 5 M ranks), so the vocabulary keeps growing with
  the file's size as natural text does (Heaps' law) instead of repeating one corpus's words.

The file's whole text is tokenized (`--max-chars` above its size); the tokenizer is trained as `crucible
data prepare` trains it by default, on the first `neurons.dataset.TOKENIZER_SAMPLE_CHARS` characters.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.cli import add_json_flag, print_json

MiB = 1 << 20
_ZIPF_RANKS = 5_000_000
_LETTERS = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    parser.add_argument("--mb", type=int, default=1024, help="size of the synthetic text file in MiB (default 1024)")
    parser.add_argument("--preset", default="tiny", help="hparams preset (default tiny)")


def _pseudo_word(rank: int) -> str:
    """A pronounceable-enough word for a Zipf rank: base-26 digits over letters by English frequency."""
    letters = []
    rank += 26  # at least two letters
    while rank:
        rank, digit = divmod(rank, 26)
        letters.append(_LETTERS[digit])
    return "".join(letters)


def write_synthetic_text(path: Path, size_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Write ≈ size_bytes of text (see the module docstring); returns what was written (bytes, words, passes)."""
    from neurons.corpus import stdlib_documents

    documents = list(stdlib_documents(6_000_000))
    rng = np.random.default_rng(seed)
    written = passes = words = 0
    with path.open("w", encoding="utf-8") as out:
        while written < size_bytes:
            passes += 1
            for index in rng.permutation(len(documents)):
                tokens = documents[index].split(" ")
                ranks = np.minimum(rng.zipf(1.1, size=len(tokens)), _ZIPF_RANKS)
                swap = rng.random(len(tokens)) < 0.1
                for i in np.flatnonzero(swap):
                    tokens[i] = _pseudo_word(int(ranks[i]))
                text = " ".join(tokens) + "\n\n"
                out.write(text)
                written += len(text.encode("utf-8"))
                words += len(tokens)
                if written >= size_bytes:
                    break
    return {"bytes": written, "words": words, "passes_over_offline_corpus": passes}


def _prepare(out: Path, preset: str, inputs: list[Path], max_chars: int | None) -> dict[str, Any]:
    """Run `crucible data prepare` as a child; its peak RSS (ru_maxrss, KiB on Linux), seconds and summary."""
    cmd = [sys.executable, "-m", "neurons.cli", "data", "prepare", "--preset", preset, "--out", str(out)]
    for path in inputs:
        cmd += ["--input", str(path)]
    if max_chars is not None:
        cmd += ["--max-chars", str(max_chars)]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"crucible data prepare failed ({child.returncode}): {output[-2000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1),
            "summary": [line for line in output.splitlines() if line.startswith(("source:", "wrote"))]}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="crucible-bench-prepare-") as tmp:
        root = Path(tmp)
        baseline = _prepare(root / "offline", args.preset, [], None)
        text = root / "synthetic.txt"
        started = time.perf_counter()
        written = write_synthetic_text(text, args.mb * MiB)
        write_s = time.perf_counter() - started
        large = _prepare(root / "large", args.preset, [text], 2 * written["bytes"])
    return {
        "cpu_count": os.cpu_count(),
        "offline_corpus": baseline,
        "synthetic_file": {**written, "mib": round(written["bytes"] / MiB, 1), "write_s": round(write_s, 1)},
        "large": large,
        "peak_rss_large_vs_offline": round(large["peak_rss_mb"] / baseline["peak_rss_mb"], 3),
        "mib_per_s_large": round(written["bytes"] / MiB / large["seconds"], 2),
    }


def run_cli(args: argparse.Namespace) -> int:
    if args.mb < 1:
        print("crucible bench prepare: --mb must be at least 1", file=sys.stderr)
        return 2
    return print_json(benchmark(args), args)
