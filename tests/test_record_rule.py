"""One record rule for every node (issue 15/16): the window's update is the highest-stake validator's in-time
aggregate record, whether a node is live or replaying, and a record that could not be read is never taken for
one that was never published. Found by the session-6 attack: live nodes took the first record they saw, so a
low-stake validator publishing early decided live nodes' θ while late joiners replayed the top validator's.

Both behaviours are read from one run (`run` fixture, module scope): a network whose validator-0 holds 10x
validator-1's stake; validator-1 is hostile and publishes "no step" records before the windows start, the top
validator publishes its records late but in time. Two miners train two windows with the top validator; then
nodes of a late miner replay them: one from scratch to the end, one when one record cannot be read (and again
once it can; more windows run first if neither live window was a stepping checkpoint window)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from devnet.bootstrap import BootstrapConfig, subnet_params_for
from neurons.catchup import recover
from neurons.miner import Miner
from neurons.validator import Validator
from protocol.hparams import load_hparams
from protocol.model import param_digest
from protocol.peers import AggregateRecord
from protocol.storage_keys import aggregate_key
from protocol.windows import window_bounds
from tests.plugins import network
from tests.plugins.chain import start_chain
from transport.bucket_errors import StorageUnavailable

OVERRIDES = ["windows.blocks_per_window=32", "inner.steps=1"]
WINDOWS = 2  # live windows; one of them is a checkpoint window (checkpoints every 2, NET_OVERRIDES)
RUN_TIMEOUT_S = 240.0


@dataclass
class Run:
    """What the scenario observed; the tests only read it."""

    first: int = 0
    live: dict[int, tuple[bool, list[bool], list[str]]] = field(default_factory=dict)  # w → top, miners stepped; notes (top first)
    theta: dict[int, set[str]] = field(default_factory=dict)  # w → digests of the top and the miners after w
    top_theta: dict[int, str] = field(default_factory=dict)  # w → the top validator's θ after w
    late: tuple[str | None, str] | None = None  # replay to the end from scratch: (reason, θ)
    target: int | None = None  # a window whose θ is a checkpoint plus one record (the one made unreadable)
    blipped: tuple[str | None, str] | None = None  # replay to `target` while that record is unreadable
    healed: tuple[str | None, str] | None = None  # the same node's next try, the record readable again


async def _window(run: Run, net: network.TestNetwork, top: Validator, miners: list[Miner], x: int) -> None:
    *mine, theirs = await asyncio.gather(*(m.step(x) for m in miners), top.step(x))
    run.live[x] = (theirs.stepped, [r.stepped for r in mine], [theirs.note, *(r.note for r in mine)])
    run.top_theta[x] = param_digest(top.node.model)
    run.theta[x] = {run.top_theta[x], *(param_digest(m.node.model) for m in miners)}
    if run.target is None and theirs.stepped and x % net.hp.checkpoints.every_windows == 0:
        run.target = x + 1  # checkpoint x, and x's record steps


async def _scenario(run: Run, net: network.TestNetwork, state) -> None:
    top = Validator(await net.node("validator-0"), state / "v0")
    put = top.node.bucket.put

    def in_time_but_after_the_deadline(key, data, *a, **k):  # 1.5 s = 6 blocks, inside record_grace_blocks
        if key.startswith("aggregates/"):
            time.sleep(1.5)
        return put(key, data, *a, **k)

    top.node.bucket.put = in_time_but_after_the_deadline
    low = await net.node("validator-1")  # low stake, hostile: publishes "no step" records before windows start
    miners = [Miner(await net.node(f"miner-{i}"), state / f"m{i}") for i in range(2)]
    late = await net.node("miner-2")  # joins at the end, replaying
    blipped = await net.node("miner-2")  # the same miner's node that meets an unreadable record
    run.first = w = await top.node.current_window() + 1
    for x in range(w, w + 8):
        await top.publish_initial_peer_list(x)
    for x in range(w, w + WINDOWS):
        hostile = AggregateRecord(netuid=low.netuid, window=x, validator=low.hotkey, peers=[], content_hashes=[],
                                  clip_norm=0.0, theta_digest=None)
        low.bucket.put(aggregate_key(x), hostile.signed(low.chain.wallet.hotkey))
    await top.node.wait_for_block(window_bounds(w, net.hp.windows).start_block)
    publishing = asyncio.create_task(top.publisher.run(w))
    try:
        for x in range(w, w + WINDOWS):
            await _window(run, net, top, miners, x)
        why = await recover(late, w + WINDOWS)  # before any later checkpoint exists: replays the records
        run.late = (why, param_digest(late.model))
        for x in range(w + WINDOWS, w + 6):  # a loaded machine may lose a window: go on until one fits
            if run.target is not None:
                break
            await _window(run, net, top, miners, x)
    finally:
        publishing.cancel()

    if run.target is not None:
        bucket = blipped.pool.get((await blipped.credentials())[top.node.hotkey])
        get = bucket.get

        def blip(key, *a, **k):  # 5xx after retries on one record of the top validator, for this node only
            if key == aggregate_key(run.target - 1):
                raise StorageUnavailable(f"GetObject {key}: 503 SlowDown", attempts=3)
            return get(key, *a, **k)

        bucket.get = blip
        why = await recover(blipped, run.target)
        run.blipped = (why, param_digest(blipped.model))
        bucket.get = get  # the bucket answers again: the next try recovers
        why = await recover(blipped, run.target)
        run.healed = (why, param_digest(blipped.model))
    await net.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, bt_cache_env, s3_server, tiny_store) -> Run:
    hp = load_hparams("tiny", [*network.NET_OVERRIDES, *OVERRIDES])
    cfg = BootstrapConfig(miners=3, validators=2, validator_stakes_tao=[10_000.0, 1_000.0], subnet=subnet_params_for(hp))
    chain = start_chain(tmp_path_factory.mktemp("staked"), cfg, block_time=network.BLOCK_TIME_S, start_block=network.lead_in(hp))
    result = Run()
    try:
        net = network.TestNetwork(chain, s3_server, hp, tiny_store)
        asyncio.run(asyncio.wait_for(_scenario(result, net, tmp_path_factory.mktemp("record-rule")), RUN_TIMEOUT_S))
        return result
    finally:
        chain.stop()


def test_a_low_stake_record_published_early_never_beats_the_top_validators(run: Run):
    for x in range(run.first, run.first + WINDOWS):
        theirs, mine, notes = run.live[x]
        assert theirs and all(mine), (x, notes)  # the top's record, not the low-stake "no step" one
        assert len(run.theta[x]) == 1, (x, run.theta[x])
    assert run.late is not None
    why, theta = run.late
    assert why is None and theta == run.top_theta[run.first + WINDOWS - 1], why


def test_an_unreadable_record_is_not_a_missing_one_when_replaying(run: Run):
    assert run.target is not None, run.live
    assert run.blipped is not None and run.healed is not None
    why, theta = run.blipped
    assert why is not None and "could not be read" in why, why  # never "no record, nothing to replay"
    assert theta != run.top_theta[run.target - 1]
    why, theta = run.healed  # the bucket answers again: the next try recovers
    assert why is None and theta == run.top_theta[run.target - 1], why
