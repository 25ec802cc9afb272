"""`Validator` itself with θ in FSDP2 rows over 2 gloo ranks, on a real devnet chain + S3.

tests/test_sharded_validator.py checks the sharded arithmetic on 2 ranks; this checks the validator's
glue around it in real windows (its own debug sample, the drift check, stage 2 through the Scorer's
sharded backend, the outer step from the record's shards, the digest it publishes, a checkpoint gathered
whole). This process is rank 0; rank 1 is a subprocess in the production follower loop. The honest
miner's unsharded θ must equal the rows' θ bit for bit.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch.distributed as dist

from devnet.adversaries import make_adversary
from neurons.distributed import DistContext
from neurons.miner import Miner
from neurons.validator import Validator
from protocol.model import build_model, param_digest
from protocol.storage_keys import checkpoint_key
from protocol.windows import window_bounds
from tests.conftest import held_tcp_init

REPO = Path(__file__).resolve().parents[1]
WINDOWS = 4


def two_ranks(hp):
    """This process is rank 0 (the `Validator`); rank 1 is a subprocess in `follow_validator`."""
    init, held = held_tcp_init()  # the port stays bound from its choice until the group is up
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    follower = subprocess.Popen([sys.executable, str(REPO / "tests" / "sharded_eval_worker.py"), "follow", init,
                                 hp.model_dump_json()], env=env, cwd=REPO)
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=2, timeout=datetime.timedelta(minutes=5))
    del held
    try:
        yield DistContext(rank=0, world=2, sharded=True, control=dist.new_group(backend="gloo")), follower
    finally:
        dist.destroy_process_group()
        if follower.poll() is None:
            follower.kill()


@pytest.mark.slow
async def test_sharded_validator_steps_like_the_miners_and_publishes_theta(network_factory, tmp_path):
    net = network_factory(miners=2, validators=1, overrides=["checkpoints.every_windows=2"])
    ranks = two_ranks(net.hp)
    ctx, follower = next(ranks)
    try:
        await _windows(net, tmp_path, ctx)
        assert follower.wait(timeout=60) == 0  # released by the validator's stop
    finally:
        ranks.close()


async def _windows(net, tmp_path, ctx: DistContext) -> None:
    vnode = await net.node("validator-0")
    validator = Validator(vnode, tmp_path / "validator", dist=ctx, precision="fp32")
    honest = Miner(await net.node("miner-0"), tmp_path / "miner-0")
    noise = make_adversary("noise", await net.node("miner-1"), tmp_path / "miner-1")
    first = await vnode.current_window() + 1
    for w in range(first, first + net.hp.peers.lead_windows):
        await validator.publish_initial_peer_list(w)
    validator.shard()  # what Validator.run does under torchrun --fsdp
    assert validator.ranks is not None and validator.scorer.backend is validator.ranks
    await vnode.wait_for_block(window_bounds(first, net.hp.windows).start_block)

    theta_at: dict[int, str] = {}  # θ's digest at the start of each window, read from the rows

    async def loop(role) -> list:
        reports = []
        for w in range(first, first + WINDOWS):
            reports.append(await role.step(w))
            if role is validator:
                theta_at[w + 1] = validator.digest()
        return reports

    publishing = asyncio.create_task(validator.publisher.run(first))
    reports, miner_reports, _ = await asyncio.gather(loop(validator), loop(honest), loop(noise))
    publishing.cancel()
    notes = [r.note for r in reports]
    assert sum(r.evaluated for r in reports) >= WINDOWS - 1, notes
    assert sum(r.stepped for r in reports) >= WINDOWS - 1, notes
    assert all(r.in_sync for r in reports), notes
    assert sum(m.in_sync and m.stepped for m in miner_reports) >= WINDOWS - 1
    theta = validator.digest()
    assert theta == param_digest(honest.node.model)  # rows stepped exactly like the unsharded miner's θ

    graph = await vnode.chain.metagraph()
    final = reports[-1].weights
    assert final[graph.uid_of(honest.node.hotkey)] > final[graph.uid_of(noise.node.hotkey)], final

    # the last even window's checkpoint: θ gathered whole from the rows, loadable, the θ of that window
    window = max(w + 1 for w in range(first, first + WINDOWS) if (w + 1) % 2 == 0)
    blob = vnode.bucket.get(checkpoint_key(window), max_bytes=1 << 30)
    model = build_model(net.hp)
    model.load_state_dict(safetensors.torch.load(blob), strict=False)
    assert param_digest(model) == theta_at[window] != param_digest(build_model(net.hp))  # a stepped θ
    validator.stop_ranks()
