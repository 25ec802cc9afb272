"""`crucible bench codec` on the tiny preset: the JSON it promises, with consistent numbers."""

from __future__ import annotations

import argparse
import json
import time

from bench.codec import add_cli, benchmark
from neurons.cli import main


def test_bench_codec_reports_real_wire_bytes_and_timings():
    parser = argparse.ArgumentParser()
    add_cli(parser)
    result = benchmark(parser.parse_args(["--preset", "tiny", "--repeats", "1"]))
    for key in ("params", "dense_fp32_bytes", "wire_bytes", "compression_ratio", "encode_s", "decode_s",
                "copy_s", "encode_vs_copy", "decode_vs_copy"):
        assert key in result
    assert result["dense_fp32_bytes"] == 4 * result["params"]
    assert result["payload_bytes"] < result["wire_bytes"] <= result["max_shard_bytes"]
    assert abs(result["compression_ratio"] - result["dense_fp32_bytes"] / result["wire_bytes"]) < 0.01
    assert result["compression_ratio"] > 100  # tiny's 688-wide MLP chunks at 43, so below the 150m figure
    assert min(result["encode_s"], result["decode_s"], result["copy_s"]) > 0
    # tiny's decoded tensors fit in memory the warm-up freed, so the growth may be ~0 here (bench.resident's
    # own test checks the measurement)
    assert result["decode_fresh_peak_bytes"] >= 0 and result["decode_fresh_peak_vs_fp32_model"] is not None


def test_peak_rss_sees_a_block_allocate_and_touch_memory():
    """64 MiB of pages new to the process: a fresh private anonymous mapping, every page written. Not through
    malloc: a long pytest process's heap may already hold that much resident and freed (glibc's thresholds
    move with what earlier tests allocated), and a `torch.ones(16 << 20)` once grew the resident set 4 KiB."""
    import mmap

    import torch

    from bench.resident import PeakRSS

    with PeakRSS() as mem:
        block = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE)  # anonymous: no page resident until written
        pages = torch.frombuffer(block, dtype=torch.uint8)
        pages.fill_(1)  # every page written: 64 MiB resident
        time.sleep(0.05)  # held for many 2-ms samples, so the sampler must see it
        del pages
        block.close()  # unmapped before the block ends: only the sampler thread can have seen the peak
    # a broken sampler reads ~0; other threads of the test process (GC, pytest) may free a few MiB meanwhile
    assert mem.beyond >= 48 << 20, mem.beyond


def test_bench_codec_through_crucible_prints_one_json_line(capsys):
    """`crucible bench codec --json` is the same bench, printed as one line a script can read."""
    assert main(["bench", "codec", "--preset", "tiny", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    assert result["dense_fp32_bytes"] == 4 * result["params"] and result["compression_ratio"] > 100
