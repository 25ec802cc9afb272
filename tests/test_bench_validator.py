"""`crucible bench validator` runs on real updates and reports a sane ratio against the floor."""

import argparse

from bench.validator import benchmark


def test_bench_validator_smoke(tiny_dataset):
    args = argparse.Namespace(preset="tiny", overrides=["inner.steps=2"], data=tiny_dataset.path, miners=2,
                              repeats=1, device="cpu")
    out = benchmark(args)
    assert out["miners"] == 2 and out["seconds_per_miner"] > 0 and out["floor_four_forwards_s"] > 0
    assert out["ratio_vs_floor"] == out["seconds_per_miner"] / out["floor_four_forwards_s"]
    assert out["miners_per_window"] >= 1
