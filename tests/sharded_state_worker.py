"""Worker for test_sharded_state_attacks.py: 2 gloo ranks on tiny, hostile sharded-state folders.

Rank 0 drives a `ShardedMiner` (each collective announced with `broadcast_work`), rank 1 runs the
production follower loop (`neurons.miner_ranks.follow`). The ranks train one window, save their rows for
window 5, train again and save for window 6; then restarts read folders a crash or a hand could leave:
rank 0's file from window 6 beside rank 1's from window 5, a rank's header that is JSON but not an
object, a rank's file missing one tensor, a rank's file cut in half. Each restart must start every rank from zero (no mixed
state) and not crash rank 1. Rank 0 writes what it saw to rank0.json.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neurons.distributed import broadcast_work, init_distributed
from neurons.local_state import sharded_state_path
from neurons.miner_ranks import follow
from neurons.sharding import sharded_context
from neurons.training import TrainSettings
from protocol.hparams import load_hparams
from tests.sharding_worker import SEED, _restart, _save, capture_state_warnings

OVERRIDES = ["inner.steps=1", "inner.batch_size=4"]


def _rewrite(src: Path, dst: Path, rank: int, drop: str | None = None, header: str | None = None) -> None:
    tensors = load_file(str(sharded_state_path(src, rank)))
    with safe_open(str(sharded_state_path(src, rank)), "pt") as fh:
        meta = dict(fh.metadata())
    if drop is not None:
        tensors.pop(next(k for k in sorted(tensors) if k.startswith(drop)))
    if header is not None:
        meta["crucible.sharded"] = header
    save_file(tensors, str(sharded_state_path(dst, rank)), meta)


def main(out: str) -> None:
    torch.set_num_threads(1)
    ctx = sharded_context(init_distributed())
    hp = load_hparams("tiny", OVERRIDES)
    settings = TrainSettings()
    if not ctx.is_main:
        follow(None, hp, ctx, settings, device="cpu")
        dist.destroy_process_group()
        return
    warnings = capture_state_warnings()
    root = Path(out)
    five, six = root / "five", root / "six"
    samples = torch.randint(0, 4096, (hp.samples_per_window, hp.model.seq_len),
                            generator=torch.Generator().manual_seed(0))
    miner = _restart(ctx, hp, settings, None)
    for window, folder in ((0, five), (1, six)):
        broadcast_work(ctx, {"op": "train", "window": window, "samples": samples, "seed": SEED})
        miner.window(samples, window, SEED)
        folder.mkdir()
        _save(ctx, hp, miner, folder, window + 5)
    # Saving is no collective (each rank writes its own file): rank 0's save can return while rank 1 is still
    # writing six/, and reading rank 1's file then failed (FileNotFoundError; rank 1: "Connection closed by
    # peer"). A digest is an all-gather rank 1 enters only after its save returned: its files exist after it.
    broadcast_work(ctx, {"op": "digest"})
    miner.digest()
    cases = {"mixed_windows": root / "mixed", "header_not_object": root / "header",
             "window_not_int": root / "window", "missing_tensor": root / "missing", "truncated": root / "torn"}
    for folder in cases.values():
        folder.mkdir()
    shutil.copy(sharded_state_path(six, 0), sharded_state_path(cases["mixed_windows"], 0))
    shutil.copy(sharded_state_path(five, 1), sharded_state_path(cases["mixed_windows"], 1))
    for rank in range(ctx.world):  # a torn file (a disk that lied about the atomic rename): rank 1's cut in half
        blob = sharded_state_path(six, rank).read_bytes()
        sharded_state_path(cases["truncated"], rank).write_bytes(blob[: len(blob) // 2] if rank else blob)
    with safe_open(str(sharded_state_path(six, 1)), "pt") as fh:
        header = json.loads(fh.metadata()["crucible.sharded"])
    for rank in range(ctx.world):
        _rewrite(six, cases["header_not_object"], rank, header='["not", "an", "object"]' if rank else None)
        _rewrite(six, cases["window_not_int"], rank,
                 header=json.dumps({**header, "window": "six"}) if rank else None)
        _rewrite(six, cases["missing_tensor"], rank, drop="opt." if rank else None)
    seen = {"resumed_six": not not _restart(ctx, hp, settings, six).optimizer.state}
    for case, folder in cases.items():
        restarted = _restart(ctx, hp, settings, folder)
        seen[case] = not restarted.optimizer.state and not restarted.compressor.inner.state_dict()
    broadcast_work(ctx, {"op": "stop"})
    Path(out, "rank0.json").write_text(json.dumps({"empty": seen, "warnings": warnings}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
