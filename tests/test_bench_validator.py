"""`crucible bench validator` runs on real updates and reports a sane ratio against the floor."""

import argparse

from bench.validator import benchmark


def test_bench_validator_smoke(tiny_dataset):
    args = argparse.Namespace(preset="tiny", overrides=["inner.steps=2"], data=tiny_dataset.path, miners=[2],
                              repeats=1, device="cpu")
    out = benchmark(args)
    assert out["miners"] == 2 and out["seconds_per_miner"] > 0 and out["floor_s"] > 0
    assert out["ratio_vs_floor"] == out["seconds_per_miner"] / out["floor_s"]
    assert out["stage1_s"] > 0 and out["gather_s"] > 0 and out["gather_peers"] == 2
    assert out["stage2_budget_s"] == 0.5 * out["window_s"] - out["stage1_s"] - out["gather_s"]
    assert out["miners_per_window"] == max(0, int(out["stage2_budget_s"] // out["seconds_per_miner"]))


def test_bench_validator_synthetic_phases_per_n():
    """--synthetic: stage 1, stage-2 decode and the gather on synthetic shards, per N, copies caught."""
    args = argparse.Namespace(preset="tiny", overrides=[], data=None, miners=[4, 9], repeats=1, device="cpu",
                              synthetic=True)
    out = benchmark(args)
    assert out["synthetic"] and [r["miners"] for r in out["runs"]] == [4, 9]
    for run in out["runs"]:
        n = run["miners"]
        assert run["stage1_copies_caught"] == [n - 2, n - 1]  # the two later copies of miner 0
        assert run["stage1_s"] > 0 and run["gather_s"] > 0 and run["stage2_decode_s_per_miner"] > 0
        assert run["gather_peers"] == min(n, 8) and run["stage2_decode_miners"] == n
        assert min(run["stage1_peak_beyond_shards_bytes"], run["gather_peak_bytes"]) >= 0
    assert out["stage1_per_miner_growth"] > 0
