"""Miner.step against a real devnet chain process and a real S3 server, one window at a time."""

from __future__ import annotations

import asyncio

import torch

from neurons.miner import Miner
from neurons.validator import Validator
from protocol.model import build_model, param_digest
from protocol.storage_keys import gradient_key
from protocol.windows import window_bounds
from protocol.wire import Shard, read_shard


async def _setup(network_factory, tmp_path, miners: int = 2):
    net = network_factory(miners=miners, validators=1)
    validator_node = await net.node("validator-0")
    validator = Validator(validator_node, tmp_path / "validator")
    miner_objs = [Miner(await net.node(f"miner-{i}"), tmp_path / f"miner-{i}") for i in range(miners)]
    window = await validator_node.current_window() + 1
    await validator.publish_initial_peer_list(window)
    await validator_node.wait_for_block(window_bounds(window, net.hp.windows).start_block)
    return net, validator, miner_objs, window


async def test_miners_publish_valid_shards_and_stay_identical(network_factory, tmp_path):
    net, validator, (a, b), window = await _setup(network_factory, tmp_path)
    theta0 = param_digest(build_model(net.hp))
    *reports, pub = await asyncio.gather(a.step(window), b.step(window), net.publish(validator, window))
    assert pub.published and sorted(pub.result.used) == sorted([a.node.hotkey, b.node.hotkey])
    for miner, report in zip((a, b), reports, strict=True):
        assert report.trained and report.uploaded, report
        data = miner.node.bucket.get(gradient_key(window, miner.node.hotkey), 10**8)
        ctx = await miner.node.window(window)
        shard = read_shard(data, miner.node.shard_source(ctx).expectation(miner.node.hotkey))
        assert isinstance(shard, Shard), shard
        info = miner.node.bucket.head(gradient_key(window, miner.node.hotkey))
        assert ctx.start_time.replace(microsecond=0) <= info.last_modified <= ctx.deadline_time
        assert report.stepped and sorted(report.peers_used) == sorted([a.node.hotkey, b.node.hotkey])
        assert 0 < report.compute_fraction <= 1 and report.tokens_per_s > 0
    assert param_digest(a.node.model) == param_digest(b.node.model) != theta0
    await net.close()


async def test_malformed_peer_shard_is_skipped(network_factory, tmp_path):
    net, validator, (a, b, c), window = await _setup(network_factory, tmp_path, miners=3)
    # miner c uploads junk (a pickle opcode prefix) inside the window instead of a shard
    c.node.bucket.put(gradient_key(window, c.node.hotkey), b"\x80\x04not a safetensors file")
    *reports, pub = await asyncio.gather(a.step(window), b.step(window), net.publish(validator, window))
    # the validator saw no signed header from c by the deadline, so the record's gather does not even
    # download c (its bytes cannot count); the record omits it, and scoring's fetch says why
    assert c.node.hotkey not in pub.snapshot
    assert c.node.hotkey not in pub.fetched and c.node.hotkey not in pub.result.used
    ctx = await validator.node.window(window)
    scored = await validator.node.fetch(ctx, [c.node.hotkey], pub.pinned)
    assert scored[c.node.hotkey].reason == "not_safetensors", scored
    for report in reports:
        assert report.stepped
        assert c.node.hotkey not in report.peers_used
    assert param_digest(a.node.model) == param_digest(b.node.model)
    await net.close()


async def test_restarted_miner_catches_up_in_sync(network_factory, tmp_path):
    net, validator, (a, b), window = await _setup(network_factory, tmp_path)
    await asyncio.gather(a.step(window), b.step(window), validator.step(window))
    # b goes down for one window; a and the validator carry on
    await asyncio.gather(a.step(window + 1), validator.step(window + 1))
    restarted = Miner(await net.node("miner-1"), tmp_path / "miner-1")
    await restarted.node.wait_for_block(window_bounds(window + 2, net.hp.windows).start_block)
    first = await restarted.start()
    assert first == window + 2
    assert restarted.model_window == window + 2
    assert param_digest(restarted.node.model) == param_digest(a.node.model)
    await net.close()


async def test_a_drifted_miner_notices_and_recovers(network_factory, tmp_path):
    net, validator, (a, b), window = await _setup(network_factory, tmp_path)
    await validator.publish_initial_peer_list(window + 1)  # window + 1 has a peer list too: its record steps
    await asyncio.gather(a.step(window), b.step(window), validator.step(window))
    assert param_digest(a.node.model) == param_digest(b.node.model) == param_digest(validator.node.model)
    with torch.no_grad():  # b's θ drifts, as if it had applied a wrong aggregate
        next(b.node.model.parameters()).add_(1e-3)
    for w in range(window + 1, window + 4):  # on a loaded machine a window may pass with no upload, no record
        ra, rb, _ = await asyncio.gather(a.step(w), b.step(w), validator.step(w))
        if "no validator published" not in rb.note:
            break
    assert ra.in_sync and not rb.in_sync, rb  # the first record's θ digest told b
    assert "recovered" in rb.note and rb.stepped, rb
    assert param_digest(a.node.model) == param_digest(b.node.model) == param_digest(validator.node.model)
    await net.close()
