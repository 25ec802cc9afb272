"""End to end: `crucible devnet run` with honest miners, adversaries and a validator, as separate processes.

Asserts what the devnet exists to show: the global model learns, honest miners hold identical models,
honest miners earn more incentive than every adversary, and nothing is left running afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _model_digest(state_file: Path) -> tuple[int, bytes]:
    from safetensors import safe_open

    with safe_open(str(state_file), "pt") as fh:
        window = json.loads(fh.metadata()["crucible.local"])["window"]
    tensors = load_file(str(state_file))
    flat = torch.cat([tensors[k].reshape(-1) for k in sorted(tensors) if k.startswith("model.")])
    return window, flat.numpy().tobytes()


def test_small_devnet_end_to_end(tmp_path, tiny_dataset):
    state = tmp_path / "devnet"
    cmd = [sys.executable, "-m", "neurons.cli", "devnet", "run", "--miners", "3", "--validators", "1",
           "--windows", "6", "--adversary", "noise", "--adversary", "copycat", "--state", str(state),
           "--data", str(tiny_dataset.path), "--fresh"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((state / "report" / "report.json").read_text())

    losses = [x["loss"] for x in report["heldout_loss"] if x.get("loss") is not None]
    assert len(losses) >= 3 and losses[-1] < report["heldout_loss_initial"] - 0.2, losses
    assert report["honest_incentive_share"] > 0.5

    per_uid = report["per_uid"].values()
    honest = [u for u in per_uid if u["kind"] == "honest"]
    adversaries = [u for u in per_uid if u["kind"] != "honest"]
    assert len(honest) == 3 and len(adversaries) == 2
    assert sum(u["incentive"] for u in honest) > 0
    for adv in adversaries:
        assert sum(u["incentive"] for u in honest) / 3 > adv["incentive"], (adv, honest)

    digests = [_model_digest(state / "nodes" / u["name"] / "node-state.safetensors") for u in honest]
    last = max(w for w, _ in digests)
    in_step = [d for w, d in digests if w == last]
    assert len(in_step) >= 2 and len(set(in_step)) == 1, [w for w, _ in digests]

    leftover = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout
