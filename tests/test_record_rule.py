"""One record rule for every node (issue 15/16): the window's update is the highest-stake validator's in-time
aggregate record, whether a node is live or replaying, and a record that could not be read is never taken for
one that was never published. Found by the session-6 attack: live nodes took the first record they saw, so a
low-stake validator publishing early decided live nodes' θ while late joiners replayed the top validator's."""

from __future__ import annotations

import asyncio
import time

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


@pytest.fixture
def staked_net(tmp_path_factory, bt_cache_env, s3_server, tiny_store):
    """A network whose validator-0 holds 10x validator-1's stake."""
    started = []

    def make(miners: int, overrides=()):
        hp = load_hparams("tiny", [*network.NET_OVERRIDES, *overrides])
        cfg = BootstrapConfig(miners=miners, validators=2, validator_stakes_tao=[10_000.0, 1_000.0],
                              subnet=subnet_params_for(hp))
        chain = start_chain(tmp_path_factory.mktemp("staked"), cfg, block_time=0.25)
        started.append(chain)
        return network.TestNetwork(chain, s3_server, hp, tiny_store)

    yield make
    for chain in started:
        chain.stop()


async def test_a_low_stake_record_published_early_never_beats_the_top_validators(staked_net, tmp_path):
    net = staked_net(miners=3, overrides=("windows.blocks_per_window=32", "inner.steps=1"))
    top = Validator(await net.node("validator-0"), tmp_path / "v0")
    put = top.node.bucket.put

    def in_time_but_after_the_deadline(key, data, *a, **k):  # 1.5 s = 6 blocks, inside record_grace_blocks
        if key.startswith("aggregates/"):
            time.sleep(1.5)
        return put(key, data, *a, **k)

    top.node.bucket.put = in_time_but_after_the_deadline
    low = await net.node("validator-1")  # low stake, hostile: publishes "no step" records before windows start
    miners = [Miner(await net.node(f"miner-{i}"), tmp_path / f"m{i}") for i in range(2)]
    late = await net.node("miner-2")  # joins at the end, replaying
    w = await top.node.current_window() + 1
    for x in range(w, w + 4):
        await top.publish_initial_peer_list(x)
    for x in range(w, w + 2):
        hostile = AggregateRecord(netuid=low.netuid, window=x, validator=low.hotkey, peers=[], content_hashes=[],
                                  clip_norm=0.0, theta_digest=None)
        low.bucket.put(aggregate_key(x), hostile.signed(low.chain.wallet.hotkey))
    await top.node.wait_for_block(window_bounds(w, net.hp.windows).start_block)
    publishing = asyncio.create_task(top.publisher.run(w))
    for x in range(w, w + 2):
        *mine, theirs = await asyncio.gather(*(m.step(x) for m in miners), top.step(x))
        assert theirs.stepped and all(r.stepped for r in mine), (x, [r.note for r in mine])  # the top's record
    publishing.cancel()
    assert {param_digest(m.node.model) for m in miners} == {param_digest(top.node.model)}
    assert await recover(late, w + 2) is None and param_digest(late.model) == param_digest(top.node.model)
    await net.close()


async def test_an_unreadable_record_is_not_a_missing_one_when_replaying(network_factory, tmp_path):
    net = network_factory(miners=3, validators=1, overrides=["windows.blocks_per_window=32", "inner.steps=1"])
    v = Validator(await net.node("validator-0"), tmp_path / "v")
    miners = [Miner(await net.node(f"miner-{i}"), tmp_path / f"m{i}") for i in range(2)]
    late = await net.node("miner-2")
    w = await v.node.current_window() + 1
    for x in range(w, w + 8):
        await v.publish_initial_peer_list(x)
    await v.node.wait_for_block(window_bounds(w, net.hp.windows).start_block)
    publishing = asyncio.create_task(v.publisher.run(w))
    target = None
    for x in range(w, w + 6):
        *_, report = await asyncio.gather(*(m.step(x) for m in miners), v.step(x))
        if report.stepped and x % net.hp.checkpoints.every_windows == 0:  # checkpoint x, and x's record steps
            target = x + 1
            break
    publishing.cancel()
    assert target is not None
    bucket = late.pool.get((await late.credentials())[v.node.hotkey])
    get = bucket.get

    def blip(key, *a, **k):  # 5xx after retries on one record, for this node only
        if key == aggregate_key(target - 1):
            raise StorageUnavailable(f"GetObject {key}: 503 SlowDown", attempts=3)
        return get(key, *a, **k)

    bucket.get = blip
    why = await recover(late, target)
    assert why is not None and "could not be read" in why, why  # never "no record, nothing to replay"
    assert param_digest(late.model) != param_digest(v.node.model)
    bucket.get = get  # the bucket answers again: the next try recovers
    assert await recover(late, target) is None and param_digest(late.model) == param_digest(v.node.model)
    await net.close()
