"""Data preparation robustness: unclean text is cleaned and counted, non-text is refused with file:line,
nothing raises an unhandled exception (issue 18)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neurons.corpus import MAX_RECORD_CHARS, CorpusError, CorpusReport, file_documents
from neurons.dataset import prepare_dataset
from protocol.data import DatasetError
from protocol.hparams import load_hparams

REPO = Path(__file__).resolve().parents[1]


def _read(paths, report=None):
    return list(file_documents(paths, report=report))


def test_lone_surrogate_in_jsonl_is_replaced_and_counted(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "a \\ud83d b"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    report = CorpusReport()
    assert _read([f], report) == ["a \ufffd b", "pair \U0001f600 ok"]
    assert report.surrogates == 1 and report.first["surrogates"] == f"{f}:1"
    assert "1 lone UTF-16 surrogates replaced by U+FFFD" in report.lines()[0]


def test_invalid_utf8_and_mixed_encodings_are_replaced_and_counted(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b'{"text": "utf-8 caf\xc3\xa9"}\n{"text": "latin-1 caf\xe9 na\xefve"}\n')
    txt = tmp_path / "m.txt"
    txt.write_bytes("caf\u00e9 utf-8\n".encode() + "caf\u00e9 cp1252 \u2019\n".encode("cp1252") + b"\xc3(\n")
    report = CorpusReport()
    docs = _read([jsonl, txt], report)
    assert docs[0] == "utf-8 caf\u00e9" and docs[1] == "latin-1 caf\ufffd na\ufffdve"
    assert docs[2] == "caf\u00e9 utf-8\ncaf\ufffd cp1252 \ufffd\n\ufffd(\n"
    assert report.invalid_bytes == 5 and report.first["invalid_bytes"] == f"{jsonl}:2"
    assert report.surrogates == 0


def test_empty_records_are_skipped_and_counted(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text('{"text": ""}\n{"text": "   \\n"}\n\n{"text": "kept"}\n')
    report = CorpusReport()
    assert _read([f], report) == ["kept"]
    assert report.empty_records == 2 and report.first["empty_records"] == f"{f}:1"


def test_huge_records_are_cut_at_line_breaks(tmp_path):
    line = "word " * 19 + "word\n"  # 100 characters
    huge = line * (MAX_RECORD_CHARS // 100 * 2 + 7)
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps({"text": huge}) + "\n")
    report = CorpusReport()
    docs = _read([f], report)
    assert "".join(docs) == huge and len(docs) == 3
    assert all(len(d) <= MAX_RECORD_CHARS and d.endswith("\n") for d in docs)
    assert report.split_records == 1
    txt = tmp_path / "h.txt"  # a text file without line breaks is cut anyway
    txt.write_text("x" * (MAX_RECORD_CHARS * 2 + 5))
    assert [len(d) for d in _read([txt])] == [MAX_RECORD_CHARS, MAX_RECORD_CHARS, 5]


def test_binary_files_are_refused_with_file_and_line(tmp_path):
    txt = tmp_path / "b.txt"
    txt.write_bytes(b"line one\nline two\n\x00\x01\x02binary")
    with pytest.raises(CorpusError, match=r"b\.txt:3: binary data"):
        _read([txt])
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "a\x00b"}\n')
    with pytest.raises(CorpusError, match=r"b\.jsonl:2: binary data"):
        _read([jsonl])
    deep = tmp_path / "d.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    with pytest.raises(CorpusError, match=r"d\.jsonl:1: not JSON"):
        _read([deep])


def test_prepare_never_raises_a_bare_exception_on_unclean_text(tmp_path):
    hp = load_hparams("tiny", ["model.seq_len=16", "model.vocab_size=300"])
    with pytest.raises(DatasetError, match="UnicodeEncodeError"):  # unclean text straight into the API
        prepare_dataset(hp, tmp_path / "raw", ["a \ud83d b " * 50] * 40)
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i} a \ud83d b " * 30}) + "\n" for i in range(60)))
    info = prepare_dataset(hp, tmp_path / "clean", lambda: file_documents([f]))  # streamed, two passes
    assert info.train_pages > 0


def test_cli_reports_what_it_cleaned(tmp_path):
    f = tmp_path / "s.jsonl"
    words = "words and more words " * 20
    lines = ['{"text": "a \\ud83d b ' + f'{i} {words}"' + '}' for i in range(200)]
    f.write_bytes(("\n".join(lines) + '\n{"text": ""}\n').encode() + b'{"text": "caf\xe9"}\n')
    out = subprocess.run([sys.executable, "-m", "neurons.cli", "data", "prepare", "--input", str(f), "--out",
                          str(tmp_path / "d"), "--set=model.seq_len=16", "--set=model.vocab_size=300"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cleaned: 200 lone UTF-16 surrogates replaced by U+FFFD (first at" in out.stdout
    assert "cleaned: 1 bytes not valid UTF-8 replaced by U+FFFD" in out.stdout
    assert "cleaned: 1 empty records skipped" in out.stdout
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"ok\n\x00")
    out = subprocess.run([sys.executable, "-m", "neurons.cli", "data", "prepare", "--input", str(bad), "--out",
                          str(tmp_path / "e")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 1 and "bin.txt:2: binary data" in out.stderr and "Traceback" not in out.stderr


def test_user_inputs_are_read_whole_unless_a_cap_is_given_and_a_cap_says_where_it_stopped(tmp_path, capsys):
    from neurons.cli import main

    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": f"record {i} " + "plain words again " * 30}) + "\n" for i in range(60)))
    total = sum(len(json.loads(line)["text"]) for line in f.read_text().splitlines())
    common = ["data", "prepare", "--input", str(f), "--set=model.seq_len=16", "--set=model.vocab_size=300",
              "--set=data.corpus_max_chars=10000"]  # the offline corpus's cap: not a cap on the user's files
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    out = capsys.readouterr().out
    assert f"60 documents, {total:,} characters" in out and "stopped at" not in out
    assert main([*common, "--out", str(tmp_path / "cut"), "--max-chars", "12000"]) == 0
    out = capsys.readouterr().out
    assert "stopped at the --max-chars cap" in out and f"{f}:" in out and "60 documents" not in out


def test_a_trained_tokenizer_sees_only_the_corpus_first_characters(tmp_path):
    hp = load_hparams("tiny", ["model.seq_len=16", "model.vocab_size=300"])
    docs = [f"document {i} " + "plain words again and again " * 20 for i in range(100)]
    consumed: list[int] = []

    def passes():
        consumed.append(0)
        for doc in docs:
            consumed[-1] += 1
            yield doc

    whole = prepare_dataset(hp, tmp_path / "whole", passes, tokenizer_chars=None)
    assert consumed == [100, 100]
    consumed.clear()
    sampled = prepare_dataset(hp, tmp_path / "sampled", passes, tokenizer_chars=3 * len(docs[0]))
    assert consumed[0] <= 4 and consumed[1] == 100  # training stopped after ~3 documents, tokenizing read all
    assert sampled.train_pages + sampled.heldout_pages > 0 and whole.tokens > 0

