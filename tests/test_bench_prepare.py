"""`crucible bench prepare`'s synthetic text: the size asked for, and a vocabulary that grows with the size
(Heaps' law), so the large run stresses the tokenizer trainer as natural text would, not as one corpus repeated."""

from bench.prepare import MiB, write_synthetic_text
from neurons.cli import main


def _distinct_words(path):
    return len(set(path.read_text(encoding="utf-8").split()))


def test_synthetic_text_has_the_size_asked_for_and_a_growing_vocabulary(tmp_path):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    one = write_synthetic_text(small, 1 * MiB)
    four = write_synthetic_text(large, 4 * MiB)
    assert 1 * MiB <= one["bytes"] == small.stat().st_size < 1 * MiB + 200_000
    assert 4 * MiB <= four["bytes"] == large.stat().st_size < 4 * MiB + 200_000
    assert _distinct_words(large) > 1.5 * _distinct_words(small)
    assert large.read_text(encoding="utf-8")[:10_000] == small.read_text(encoding="utf-8")[:10_000]  # seeded


def test_bench_prepare_refuses_a_size_below_one_mib(capsys):
    assert main(["bench", "prepare", "--mb", "0"]) == 2
    assert "--mb must be at least 1" in capsys.readouterr().err
