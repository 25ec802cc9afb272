"""Miner.step against a real devnet chain process and a real S3 server, one window at a time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
import torch

from devnet.bootstrap import BootstrapConfig, subnet_params_for
from neurons.miner import Miner
from neurons.validator import Validator
from protocol.hparams import load_hparams
from protocol.model import build_model, param_digest
from protocol.storage_keys import gradient_key
from protocol.windows import window_bounds
from protocol.wire import Shard, read_shard
from tests.plugins import network
from tests.plugins.chain import start_chain


async def _setup(network_factory, tmp_path, miners: int = 2):
    net = network_factory(miners=miners, validators=1)
    validator_node = await net.node("validator-0")
    validator = Validator(validator_node, tmp_path / "validator")
    miner_objs = [Miner(await net.node(f"miner-{i}"), tmp_path / f"miner-{i}") for i in range(miners)]
    window = await validator_node.current_window() + 1
    await validator.publish_initial_peer_list(window)
    await validator_node.wait_for_block(window_bounds(window, net.hp.windows).start_block)
    return net, validator, miner_objs, window


@dataclass
class OneWindow:
    """One window of two honest miners and a third (c) that uploads junk instead of a shard: what it left."""

    theta0: str = ""
    hotkeys: dict[str, str] = field(default_factory=dict)  # a, b, c → hotkey
    reports: dict[str, Any] = field(default_factory=dict)  # a, b → MinerReport
    pub: Any = None  # the validator's publication of the window
    shards: dict[str, Any] = field(default_factory=dict)  # a, b → their shard as read back and checked
    uploaded: dict[str, tuple[datetime, datetime, datetime]] = field(default_factory=dict)  # start, mtime, deadline
    digests: dict[str, str] = field(default_factory=dict)  # a, b → θ after the window
    paces: dict[str, Any] = field(default_factory=dict)  # a, b → the speeds the miner measured
    inner_steps: int = 0  # planned per window
    scored: dict[str, Any] = field(default_factory=dict)  # scoring's fetch of c, pinned by the record


async def _one_window(out: OneWindow, net: network.TestNetwork, state) -> None:
    validator = Validator(await net.node("validator-0"), state / "validator")
    miners = {n: Miner(await net.node(f"miner-{i}"), state / f"miner-{i}") for i, n in enumerate("abc")}
    a, b, c = miners.values()
    out.hotkeys = {n: m.node.hotkey for n, m in miners.items()}
    out.theta0 = param_digest(build_model(net.hp))
    window = await validator.node.current_window() + 1
    await validator.publish_initial_peer_list(window)
    await validator.node.wait_for_block(window_bounds(window, net.hp.windows).start_block)
    # miner c uploads junk (a pickle opcode prefix) inside the window instead of a shard
    c.node.bucket.put(gradient_key(window, c.node.hotkey), b"\x80\x04not a safetensors file")
    *reports, out.pub = await asyncio.gather(a.step(window), b.step(window), net.publish(validator, window))
    for name, miner, report in zip("ab", (a, b), reports, strict=True):
        out.reports[name] = report
        data = miner.node.bucket.get(gradient_key(window, miner.node.hotkey), 10**8)
        ctx = await miner.node.window(window)
        out.shards[name] = read_shard(data, miner.node.shard_source(ctx).expectation(miner.node.hotkey))
        info = miner.node.bucket.head(gradient_key(window, miner.node.hotkey))
        out.uploaded[name] = (ctx.start_time, info.last_modified, ctx.deadline_time)
        out.digests[name] = param_digest(miner.node.model)
        out.paces[name] = miner.pace
    out.inner_steps = net.hp.inner.steps
    ctx = await validator.node.window(window)
    out.scored = await validator.node.fetch(ctx, [c.node.hotkey], out.pub.pinned)
    await net.close()


@pytest.fixture(scope="module")
def one_window(tmp_path_factory, bt_cache_env, s3_server, tiny_store) -> OneWindow:
    """Both tests of one window read the same run (one chain, one window wait, one window)."""
    hp = load_hparams("tiny", network.NET_OVERRIDES)
    cfg = BootstrapConfig(miners=3, validators=1, subnet=subnet_params_for(hp))
    chain = start_chain(tmp_path_factory.mktemp("net"), cfg, block_time=network.BLOCK_TIME_S, start_block=network.lead_in(hp))
    out = OneWindow()
    try:
        net = network.TestNetwork(chain, s3_server, hp, tiny_store)
        asyncio.run(asyncio.wait_for(_one_window(out, net, tmp_path_factory.mktemp("one-window")), 180))
        return out
    finally:
        chain.stop()


def test_miners_publish_valid_shards_and_stay_identical(one_window):
    run, honest = one_window, sorted([one_window.hotkeys["a"], one_window.hotkeys["b"]])
    assert run.pub.published and sorted(run.pub.result.used) == honest
    for name in "ab":
        report = run.reports[name]
        assert report.trained and report.uploaded, report
        assert isinstance(run.shards[name], Shard), run.shards[name]
        start, modified, deadline = run.uploaded[name]
        assert start.replace(microsecond=0) <= modified <= deadline
        assert report.stepped and sorted(report.peers_used) == honest
        assert 0 < report.compute_fraction <= 1 and report.tokens_per_s > 0
        # the first window trains every step and measures the speeds the next window is paced by
        pace = run.paces[name]
        assert report.inner_steps == run.inner_steps and report.upload_s > 0, report
        assert pace.step_s > 0 and pace.finish_s >= report.upload_s
        assert pace.block_s == pytest.approx(network.BLOCK_TIME_S, rel=0.2)  # from the chain's timestamps
    assert run.digests["a"] == run.digests["b"] != run.theta0


def test_malformed_peer_shard_is_skipped(one_window):
    run, c = one_window, one_window.hotkeys["c"]
    # the validator saw no signed header from c by the deadline, so the record's gather does not even
    # download c (its bytes cannot count); the record omits it, and scoring's fetch says why
    assert c not in run.pub.snapshot
    assert c not in run.pub.fetched and c not in run.pub.result.used
    assert run.scored[c].reason == "not_safetensors", run.scored
    for report in run.reports.values():
        assert report.stepped
        assert c not in report.peers_used
    assert run.digests["a"] == run.digests["b"]


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
