"""`crucible bench convergence` end to end on a few tiny windows: the JSON it promises, with real numbers.

The run is shortened (2 peers × 2 windows × 2 inner steps, 16 held-out pages) so it stays fast; the
headline configurations are for the command line, not for the test suite.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from bench.convergence import add_cli, benchmark
from neurons.cli import main
from protocol.codec import layouts_for
from protocol.hparams import load_hparams
from protocol.model import param_shapes
from protocol.wire import max_shard_bytes

PEERS, WINDOWS, STEPS, HELDOUT = 2, 2, 2, 16
METHODS = ("sparseloco", "diloco", "dp_adamw")


def test_bench_convergence_json_losses_and_bytes(tiny_dataset, tmp_path, capsys):
    plot = tmp_path / "curves.png"
    argv = ["bench", "convergence", "--data", str(tiny_dataset.path), "--peers", str(PEERS),
            "--windows", str(WINDOWS), "--set", f"inner.steps={STEPS}", "--heldout-pages", str(HELDOUT),
            "--plot", str(plot), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    hp = load_hparams("tiny", overrides=[f"inner.steps={STEPS}"])
    shapes = param_shapes(hp)
    params = sum(math.prod(s) for s in shapes.values())

    for key in ("methods", "initial_heldout_loss", "tokens_per_method", "sparseloco_vs_diloco_loss_ratio",
                "compression_vs_diloco", "settings", "within_5pct_of_diloco", "plot"):
        assert key in out
    assert set(out["methods"]) == set(METHODS)
    settings = out["settings"]
    assert (settings["peers"], settings["windows"], settings["inner_steps"]) == (PEERS, WINDOWS, STEPS)
    assert settings["heldout_pages"] == HELDOUT
    assert settings["outer_lr"] == hp.outer.lr and settings["params"] == params

    # Equal tokens: every peer trains on samples_per_window pages each window, in every method.
    tokens = WINDOWS * PEERS * STEPS * hp.inner.batch_size * hp.model.seq_len
    assert out["tokens_per_method"] == tokens

    initial = out["initial_heldout_loss"]
    assert math.isfinite(initial) and initial > 7.0  # an untrained 4096-token model sits near ln 4096 ≈ 8.3
    for name in METHODS:
        entry = out["methods"][name]
        assert entry["tokens"] == tokens
        curve = entry["curve"]
        assert len(curve) == WINDOWS + 1 and curve[0] == initial
        assert all(math.isfinite(v) for v in curve + entry["train_curve"])
        assert entry["final_heldout_loss"] == curve[-1] < initial, name
        assert len(entry["train_curve"]) == WINDOWS

    # Bytes per peer per window: a real shard vs the dense fp32 model vs H dense gradients.
    dense = 4 * params
    sparse = out["methods"]["sparseloco"]["bytes_per_peer_per_window"]
    payload = sum(lay.wire_bytes for lay in layouts_for(shapes, hp.sparseloco).values())
    assert payload < sparse <= max_shard_bytes(hp.sparseloco, hp.shard.debug_sample_size, shapes)
    assert out["methods"]["diloco"]["bytes_per_peer_per_window"] == dense
    assert out["methods"]["dp_adamw"]["bytes_per_peer_per_window"] == STEPS * dense
    assert out["compression_vs_diloco"] == pytest.approx(dense / sparse, abs=0.01)
    assert out["compression_vs_diloco"] > 100  # SparseLoCo bytes ≪ DiLoCo bytes

    finals = {name: out["methods"][name]["final_heldout_loss"] for name in METHODS}
    ratio = finals["sparseloco"] / finals["diloco"]
    assert out["sparseloco_vs_diloco_loss_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert out["within_5pct_of_diloco"] == (out["sparseloco_vs_diloco_loss_ratio"] <= 1.05)

    png = plot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_bench_convergence_rejects_unknown_method(tiny_dataset):
    parser = argparse.ArgumentParser()
    add_cli(parser)
    args = parser.parse_args(["--data", str(tiny_dataset.path), "--methods", "sparseloco,adam-ish"])
    with pytest.raises(ValueError, match="adam-ish"):
        benchmark(args)
