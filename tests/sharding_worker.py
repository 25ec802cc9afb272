"""Worker for test_sharding.py: one rank of a 2-process gloo FSDP2 miner window on tiny (CPU).

Rank 0 drives a `ShardedMiner` as `neurons.miner.Miner` does (each collective announced with
`broadcast_work`); rank 1 runs the production follower loop (`neurons.miner_ranks.follow`). The window is
trained sharded, encoded with shared statistics and gathered to rank 0 (signed, with its debug
sample); the outer step runs on each rank's rows with two peers (this shard and a fixed synthetic
one), and rank 0 writes θ's digest. Rank 1 holds no whole model: its rows are scattered from rank 0's
θ_0 (`neurons.sharding.build_sharded_miner`). Then the sharded state: the ranks save their AdamW and error-feedback
rows after window 0 and run window 1; a restart (θ_0 again) loads the rows, saves them again to a
second folder, and runs window 1 again; a third start finds a header with another world size.
"""

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from bittensor.sp_core import Keypair
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neurons.distributed import broadcast_work, init_distributed
from neurons.local_state import load_sharded_state, save_sharded_state, sharded_state_path
from neurons.miner_ranks import follow
from neurons.sharding import ShardedMiner, build_sharded_miner, sharded_context
from neurons.training import TrainSettings
from protocol.codec import Compressor
from protocol.codec_aggregate import robust_clip_norm, update_norm
from protocol.data import PageStore, assign, samples_digest
from protocol.hparams import load_hparams
from protocol.model import build_model
from protocol.wire import write_shard

OVERRIDES = ["inner.steps=4", "inner.batch_size=8"]
HOTKEY_URI = "//Alice"
SEED = b"sharding-test-window"


def other_peer(hp) -> dict:
    """A fixed second peer for the outer step (small Gaussian Δ, encoded by one process)."""
    g = torch.Generator().manual_seed(7)
    shapes = {n: p.shape for n, p in build_model(hp).named_parameters()}
    return Compressor(hp.sparseloco).encode_all({n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()})


def _restart(ctx, hp, settings, state: Path | None) -> ShardedMiner:
    """Rank 0's half of a (re)start: a fresh θ_0, scattered to every rank's rows, saved rows loaded."""
    message = {"op": "shard", "dir": None if state is None else str(state), "revision": hp.revision()}
    broadcast_work(ctx, message)
    miner = build_sharded_miner(build_model(hp), hp, ctx, settings, "cpu")
    if state is not None:
        load_sharded_state(state, hp.revision(), miner)
    return miner


def capture_state_warnings() -> list[str]:
    """The messages neurons.local_state logs from now on (its one-line fall-backs), in a list."""
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("neurons.local_state").addHandler(handler)
    return warnings


def _save(ctx, hp, miner: ShardedMiner, state: Path, window: int) -> None:
    broadcast_work(ctx, {"op": "save", "dir": str(state), "window": window, "revision": hp.revision()})
    save_sharded_state(state, window, hp.revision(), miner)


def main(data: str, out: str, precision: str = "fp32") -> None:
    torch.set_num_threads(1)
    ctx = sharded_context(init_distributed())
    hp = load_hparams("tiny", OVERRIDES)
    store = PageStore(data, hp)
    settings = TrainSettings(precision=precision)
    if not ctx.is_main:
        follow(None, hp, ctx, settings, device="cpu")  # the production follower loop, until rank 0 says stop
        dist.destroy_process_group()
        return
    warnings = capture_state_warnings()
    state, again, bad = Path(out, "state"), Path(out, "state-again"), Path(out, "state-bad")
    miner = _restart(ctx, hp, settings, state)  # no saved rows yet: zeros
    broadcast_work(ctx, {"op": "digest"})
    digest0 = miner.digest()
    indices = assign("fsdp", 0, hp.data.seed, hp.samples_per_window, store.num_train)
    samples = store.pages(indices)
    broadcast_work(ctx, {"op": "train", "window": 0, "samples": samples, "seed": SEED})
    encoded, debug, stats = miner.window(samples, 0, SEED)
    _save(ctx, hp, miner, state, 1)
    # the next window (θ is back at θ_0: no outer step yet), as a miner that never stopped computes it
    broadcast_work(ctx, {"op": "train", "window": 1, "samples": samples, "seed": SEED})
    next_kept = miner.window(samples, 1, SEED)[0]
    shards = {"a-fsdp": encoded, "b-other": other_peer(hp)}
    clip = robust_clip_norm({peer: update_norm(tensors) for peer, tensors in shards.items()})
    broadcast_work(ctx, {"op": "apply", "shards": shards, "clip": clip})
    miner.apply(shards, clip)
    broadcast_work(ctx, {"op": "digest"})
    digest = miner.digest()
    slots = miner.slots

    # a restart: θ_0 again, the saved rows loaded, saved again (the same state?), then the same next window
    restarted = _restart(ctx, hp, settings, state)
    _save(ctx, hp, restarted, again, 1)
    broadcast_work(ctx, {"op": "train", "window": 1, "samples": samples, "seed": SEED})
    next_resumed = restarted.window(samples, 1, SEED)[0]
    # a restart with a different world size in the saved header: every rank falls back to zeros
    bad.mkdir()
    for rank in range(ctx.world):
        tensors = load_file(str(sharded_state_path(state, rank)))
        with safe_open(str(sharded_state_path(state, rank)), "pt") as fh:
            meta = {k: json.loads(v) for k, v in fh.metadata().items()}
        meta["crucible.sharded"]["world"] = 3
        save_file(tensors, str(sharded_state_path(bad, rank)), {k: json.dumps(v) for k, v in meta.items()})
    fallback = _restart(ctx, hp, settings, bad)
    broadcast_work(ctx, {"op": "stop"})
    blob = write_shard(encoded, keypair=Keypair.create_from_uri(HOTKEY_URI), netuid=1, window=0,
                       revision=hp.revision(), data_digest=samples_digest(indices), debug_values=debug)
    Path(out, "shard.bin").write_bytes(blob)
    same_next = all(torch.equal(a.idx, b.idx) and torch.equal(a.codes, b.codes) and torch.equal(a.lookup, b.lookup)
                    for a, b in zip(next_kept.values(), next_resumed.values(), strict=True))
    Path(out, "rank0.json").write_text(json.dumps(
        {"digest": digest, "digest0": digest0, "clip": clip, "losses": stats.losses,
         "aligned": sorted(n for n, s in slots.items() if s.aligned),
         "local_rows": {n: s.rows for n, s in slots.items()},
         "next_window_identical": same_next and len(next_kept) == len(next_resumed) == len(slots),
         "fallback_state_empty": not fallback.optimizer.state and not fallback.compressor.inner.state_dict(),
         "warnings": warnings}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
