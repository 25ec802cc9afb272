"""Ground truth for the devnet report: each miner's CONTRIBUTION, measured off the validator's path.

Devnet only, never run by a validator. Two steps, in a process of its own:

* `watch STATE OUT` (during a run): polls the first validator's node-state file and copies θ each
  time it moves to a new window (the file holds θ at the START of its window), to OUT/theta-W.safetensors;
* `measure STATE OUT` (after the run): for every window W with a stored θ_W, the shards the validator
  accepted in W (its scores.json: present, on time, not rejected) are read from the devnet's S3
  folder, clipped as the validator clips them (`clip_factors` over the accepted shards' encoded
  norms, the lower median) and applied ALONE with its share of the outer step, as it enters the
  aggregate (a clipped mean over the n accepted shards): θ' = θ_W − lr·clip·update / n. The
  contribution of that shard is L(θ_W) − L(θ'), L the mean loss on the held-out pages (all of them
  by default: the same pages for every shard of a window, so differences between shards carry no
  sampling noise from the page choice). A uid's contribution is the mean over the windows it was
  accepted in. Writes OUT/contribution.json ({uid: mean}, plus per-window detail).

`crucible devnet run --contribution` (on by default with `--miner-profile`) runs both, `watch` as a
supervised child during the run and `measure` after it, and the report's `fairness` carries the rank
correlations; `python -m devnet.fairness REPORT.json OUT/contribution.json` does it for a stored run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from devnet.supervisor import ChildSpec
from neurons.node_files import STATE_FILE
from protocol.hparams import HParams

THETA = "theta-{window}.safetensors"


def _state_window(path: Path) -> int | None:
    try:
        with safe_open(str(path), "pt") as fh:
            return int(json.loads(next(iter(fh.metadata().values())))["window"])
    except Exception:  # noqa: BLE001 - a file being replaced; try again next poll
        return None


def _written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since  # an earlier run's report does not stop this one
    except OSError:
        return False


def watch(state: Path, out: Path, poll_s: float = 0.5, stop_file: str = "report/report.json") -> None:
    """Copy the validator's θ per window until a new STATE/report/report.json appears (or interrupted)."""
    out.mkdir(parents=True, exist_ok=True)
    src = state / "nodes" / "validator-0" / STATE_FILE
    seen: tuple[int, int] | None = None
    started = time.time()
    while not _written_since(state / stop_file, started):
        try:
            st = os.stat(src)
            ident = (st.st_ino, st.st_mtime_ns)
        except OSError:
            ident = None
        if ident is not None and ident != seen:
            tmp = out / ".copy.tmp"
            try:
                shutil.copyfile(src, tmp)
            except OSError:
                time.sleep(poll_s)
                continue
            window = _state_window(tmp)
            if window is not None:
                tmp.replace(out / THETA.format(window=window))
                seen = ident
        time.sleep(poll_s)


def watch_spec(state: Path, out: Path) -> ChildSpec:
    """The `watch` step as a devnet child (`crucible devnet run --contribution` starts it with the nodes)."""
    return ChildSpec(name="contribution", argv=[sys.executable, "-m", "devnet.contribution", "watch", str(state),
                                                str(out)], log_path=state / "logs" / "contribution.log")


def measure(state: Path, out: Path, preset: str = "tiny", data: Path | None = None,
            pages: int | None = None, hp: HParams | None = None, netuid: int | None = None) -> dict:
    """`netuid`: the devnet's subnet (default: STATE/chain's manifest); shards made for it are read."""
    from devnet.scoreboard import HeldoutEvaluator
    from gauntlet.state import load_state
    from neurons.training import mean_loss
    from protocol.codec import decode
    from protocol.codec_aggregate import apply_outer_step, clip_factors, update_norm
    from protocol.hparams import load_hparams
    from protocol.storage_keys import gradient_key
    from protocol.wire import Rejection, RejectReason, ShardExpectation, ShardRules, read_shard

    if netuid is None:
        from devnet.bootstrap import load_manifest

        netuid = load_manifest(state / "chain").netuid

    if hp is None:
        published = state / "hparams-dataset.json"  # the launcher's preset when the dataset is published
        hp = load_hparams(str(published) if preset == "tiny" and published.is_file() else preset)
    data = data or state / "data"
    if not data.exists():
        data = Path(__file__).resolve().parent.parent / "data" / hp.name
    ev = HeldoutEvaluator(hp, data, pages or 10**9)
    model = ev.model
    rules = ShardRules.from_hparams(hp, {n: p.shape for n, p in model.named_parameters()})
    scores = load_state(state / "nodes" / "validator-0" / "scores.json")
    buckets = [p for p in (state / "s3").iterdir() if p.is_dir()]
    per_window: dict[int, dict[int, float]] = {}
    for theta in sorted(out.glob("theta-*.safetensors"), key=lambda p: int(p.stem.split("-")[1])):
        window = int(theta.stem.split("-")[1])
        accepted = {}
        for uid, us in scores.uids.items():
            e = next((h for h in us.history if h.window == window), None)
            if e is not None and e.present and e.timely and e.reject_reason is None:
                accepted[uid] = e.hotkey
        shards = {}
        for uid, hotkey in accepted.items():
            key = gradient_key(window, hotkey)
            path = next((b / key for b in buckets if (b / key).is_file()), None)
            if path is None:
                continue
            blob = path.read_bytes()
            shard = read_shard(blob, ShardExpectation(netuid, window, hotkey, rules))
            if isinstance(shard, Rejection) and shard.reason == RejectReason.WRONG_REVISION:
                # a run of earlier hparams (its revision differs, not its shapes): read it as it was
                revision = str(shard).split("header says ", 1)[1].split(",", 1)[0].strip()
                shard = read_shard(blob, ShardExpectation(netuid, window, hotkey, replace(rules, revision=revision)))
            if not isinstance(shard, Rejection):
                shards[uid] = shard.tensors
        if not shards:
            continue
        factors = clip_factors({uid: update_norm(t) for uid, t in shards.items()})
        with safe_open(str(theta), "pt") as fh:
            base = {n: fh.get_tensor(f"model.{n}") for n, _ in model.named_parameters()}
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(base[n])
        before = mean_loss(model, ev.samples)
        per_window[window] = {}
        for uid, tensors in shards.items():
            # its share of the window's aggregate (a clipped MEAN over the accepted shards): lr·clip/n
            share = factors[uid] / len(shards)
            update = {n: decode(enc, torch.device("cpu")) * share for n, enc in tensors.items()}
            update = {n: update.get(n, torch.zeros_like(p)) for n, p in params.items()}
            with torch.no_grad():
                apply_outer_step(model, update, hp.outer.lr)
            per_window[window][uid] = before - mean_loss(model, ev.samples)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(base[n])
        print(f"window {window}: L(θ) {before:.5f}; "
              + ", ".join(f"uid {u} {c:+.5f}" for u, c in sorted(per_window[window].items())), flush=True)
    uids = sorted({u for w in per_window.values() for u in w})
    result = {
        "pages": len(ev.samples),
        "mean": {u: statistics.fmean(w[u] for w in per_window.values() if u in w) for u in uids},
        "windows": {w: {u: c for u, c in sorted(v.items())} for w, v in sorted(per_window.items())},
    }
    (out / "contribution.json").write_text(json.dumps(result["mean"], indent=1))
    (out / "contribution-detail.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m devnet.contribution")
    ap.add_argument("action", choices=["watch", "measure"])
    ap.add_argument("state", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--pages", type=int, default=None, help="held-out pages (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.action == "watch":
        watch(args.state, args.out)
    else:
        measure(args.state, args.out, args.preset, args.data, args.pages)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
