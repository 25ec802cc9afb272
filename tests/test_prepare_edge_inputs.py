"""Hostile JSONL for `crucible data prepare` (issue 18): an integer longer than
Python's int-string limit escaped as a bare ValueError (a traceback with --tokenizer), and a JSON
escape of a low surrogate (\\udc80) was counted as a byte that is not UTF-8."""

import subprocess
import sys
from pathlib import Path

import pytest

from neurons.corpus import CorpusError, CorpusReport, file_documents

REPO = Path(__file__).resolve().parents[1]


def test_a_jsonl_integer_too_long_to_parse_is_refused_with_file_and_line(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "hello", "n": ' + "1" * 5000 + "}\n")
    with pytest.raises(CorpusError, match=rf"{f}:2: not JSON"):
        list(file_documents([f]))


def test_a_json_escaped_low_surrogate_counts_as_a_surrogate_not_as_a_bad_byte(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "a\\udc80b\\ud83dc"}\n')
    report = CorpusReport()
    assert list(file_documents([f], report=report)) == ["a\ufffdb\ufffdc"]
    assert (report.surrogates, report.invalid_bytes) == (2, 0)


def test_prepare_with_a_tokenizer_refuses_a_long_integer_in_one_line(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    f = tmp_path / "n.jsonl"
    f.write_text('{"text": "hello", "n": ' + "1" * 5000 + "}\n")
    r = subprocess.run([sys.executable, "-m", "neurons.cli", "data", "prepare", "--preset", "tiny", "--out",
                        str(tmp_path / "out"), "--input", str(f), "--tokenizer", str(tmp_path / "tok.json")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and f"{f}:1: not JSON" in r.stderr, r.stderr


@pytest.mark.parametrize("cap", ["-5", "0"])
def test_prepare_refuses_a_cap_that_reads_nothing_naming_the_flag(tmp_path, cap):
    f = tmp_path / "a.txt"
    f.write_text("hello world\n")
    r = subprocess.run([sys.executable, "-m", "neurons.cli", "data", "prepare", "--preset", "tiny", "--out",
                        str(tmp_path / "out"), "--input", str(f), "--max-chars", cap],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1 and f"--max-chars {cap}: must be 1 or more" in r.stderr, r.stderr
