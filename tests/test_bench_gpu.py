"""`crucible bench gpu` on CPU (tiny): the device check keeps working where CI runs."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_runs_a_tiny_window_on_cpu():
    cmd = [sys.executable, "-m", "neurons.cli", "bench", "gpu", "--preset", "tiny", "--device", "cpu",
           "--set", "inner.steps=2", "--set", "model.seq_len=64", "--json"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["device"] == "cpu" and out["precision"] == "fp32"
    assert out["tokens"] == 2 * 8 * 64  # inner.steps × inner.batch_size × seq_len
    assert out["tokens_per_s"] > 0 and out["model_tflops_per_s"] > 0
    assert out["mfu"] is None and "peak-tflops" in out["peak_source"]  # no made-up CPU peak
    assert out["peak_memory_bytes"] > 4 * 4 * out["parameters"]  # at least θ, θ_w, AdamW's two moments
    assert out["encode_s"] > 0 and out["decode_s"] > 0 and out["validator_s_per_miner"] > 0
    assert 0 < out["shard_bytes"] < 4 * out["parameters"]  # compressed
    assert out["eval_loss_after"] < out["eval_loss_before"]  # the window's update helps its own samples
