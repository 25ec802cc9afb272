"""The trust-boundary scenario of tests/test_trust_boundary.py: the hostile miner, the spies, the run.

One run of a small real network in which one miner's bucket is the hostile proxy (devnet/hostile_s3.py) and
lies in one way per window (`PLAN`); `Run` keeps what every node observed, for the tests to check. The module
docstring of tests/test_trust_boundary.py says what each lie is and what is simulated.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from devnet.hostile_s3 import Behaviour, ClientInfo, HostileS3
from gauntlet.records import FilterResult, WindowEntry
from neurons.miner import Miner, MinerReport
from neurons.node import Node, WindowContext
from neurons.validator import Validator
from protocol.codec import Compressor
from protocol.data import samples_digest
from protocol.gather import Fetched
from protocol.model import param_digest
from protocol.peers import AggregateRecord
from protocol.sample import debug_positions, flat_sample, gather_sample
from protocol.storage_keys import aggregate_key, gradient_key
from protocol.windows import window_bounds, window_progress
from protocol.wire import Shard, ShardExpectation, read_shard, write_shard
from tests.plugins import network
from transport.bucket import Bucket, BucketConfig
from transport.fetch import BucketPool

PLAN = ["control", "split", "late", "swap", "trickle", "hang", "cl_long", "cl_short", "copier"]
MINERS = ["miner-0", "miner-1"]
VALIDATOR = "validator-0"
HONEST = [*MINERS, VALIDATOR]
HOSTILE = "miner-2"
SCHEDULING_SLACK_S = 0.5  # thread start-up and result collection on 2 shared cores, beyond the deadlines
# Four nodes share one process (one event loop, one GIL) and two cores here: 7-s windows (28 blocks of
# 0.25 s), one small inner step, no checkpoints (writing one blocks the event loop everybody shares).
OVERRIDES = ["windows.blocks_per_window=28", "inner.steps=1", "inner.batch_size=2", "checkpoints.every_windows=1000",
             "checkpoints.retention_windows=1002"]
RUN_TIMEOUT_S = 240.0  # the whole scenario; a hang anywhere fails the module instead of blocking the suite


def full_get(who: ClientInfo) -> bool:
    """A whole-object GET (the validator's header reads are Range requests)."""
    return not any(k.lower() == "range" for k, _ in who.headers)


class ListenerPool(BucketPool):
    """This node's reads of the hostile bucket arrive on its own proxy listener: "its address"."""

    def __init__(self, node: Node, proxy: HostileS3, listener: str):
        super().__init__(node.bucket.storage)
        self.proxy, self.mine = proxy, proxy.endpoint_for(listener)

    def get(self, config: BucketConfig) -> Bucket:
        if config.endpoint_url == self.proxy.endpoint:
            config = config.model_copy(update={"endpoint_url": self.mine})
        return super().get(config)


@dataclass
class Run:
    """Everything the scenario observed; the tests only read it."""

    proxy: HostileS3
    first: int = 0
    hotkeys: dict[str, str] = field(default_factory=dict)
    uids: dict[str, int] = field(default_factory=dict)
    digests: dict[str, dict[int, str]] = field(default_factory=dict)  # node → window → θ after it
    reports: dict[str, dict[int, Any]] = field(default_factory=dict)
    records: dict[int, AggregateRecord | None] = field(default_factory=dict)
    pubs: dict[int, Any] = field(default_factory=dict)  # the validator's Publication per window
    fetched: dict[int, dict[str, Fetched]] = field(default_factory=dict)  # what stage 1 was given
    filters: dict[int, dict[int, FilterResult]] = field(default_factory=dict)  # stage 1's verdicts
    timings: dict[int, list[tuple[str, float, float]]] = field(default_factory=dict)  # (what, s, deadline s)
    history: dict[str, dict[int, WindowEntry]] = field(default_factory=dict)  # validator state per uid
    checks: dict[str, Any] = field(default_factory=dict)  # reads made during and after the run
    notes: dict[int, str] = field(default_factory=dict)  # what the hostile miner could not do

    def window(self, kind: str) -> int:
        return self.first + PLAN.index(kind)

    @property
    def bad(self) -> str:
        return self.hotkeys[HOSTILE]

    def got(self, kind: str) -> Fetched:
        return self.fetched[self.window(kind)][self.bad]

    def verdict(self, kind: str, name: str) -> FilterResult:
        return self.filters[self.window(kind)][self.uids[name]]

    def record(self, kind: str) -> AggregateRecord:
        record = self.records[self.window(kind)]
        assert record is not None, f"{kind}: no aggregate record"
        return record


class HostileMiner(Miner):
    """A registered miner whose server is the proxy: signs noise updates and uploads them as `PLAN` says.

    It only uploads (`act`, one task per window): it neither trains nor follows the records, so its
    own pace never decides whether a lie was told on time.
    """

    def __init__(self, node: Node, state_dir, run: Run, validator: Node, victims: dict[str, Bucket],
                 gates: dict[int, asyncio.Event]):
        super().__init__(node, state_dir, kind="hostile")
        self.run, self.validator, self.victims, self.gates = run, validator, victims, gates
        self.updates: dict[int, Any] = {}

    @property
    def proxy(self) -> HostileS3:
        return self.run.proxy

    def kind_of(self, window: int) -> str:
        return PLAN[window - self.run.first] if 0 <= window - self.run.first < len(PLAN) else "control"

    def expectation(self, window: int, hotkey: str) -> ShardExpectation:
        return ShardExpectation(self.node.netuid, window, hotkey, self.node.shard_rules)

    def noise(self, seed: int):
        """A small random update, encoded (made once per seed: encoding costs a loaded machine seconds)."""
        if seed not in self.updates:
            gen = torch.Generator().manual_seed(seed)
            self.updates[seed] = Compressor(self.hp.sparseloco).encode_all(
                {name: torch.randn(p.shape, generator=gen) * 1e-4 for name, p in self.node.model.named_parameters()})
        return self.updates[seed]

    def signed(self, ctx: WindowContext, seed: int, tensors=None, debug=None) -> bytes:
        """A valid shard of ours for the window: `tensors` (else the noise update `seed`), signed."""
        tensors = self.noise(seed) if tensors is None else tensors
        if debug is None:
            positions = debug_positions(ctx.seed, self.numels, self.hp.shard.debug_sample_size)
            debug = flat_sample(gather_sample(dict(self.node.model.named_parameters()), positions))
        return write_shard(tensors, keypair=self.keypair, netuid=self.node.netuid, window=ctx.window,
                           revision=self.hp.revision(), data_digest=samples_digest(self.choose_samples(ctx.window)),
                           debug_values=debug)

    async def put(self, key: str, blob: bytes, claimed=None) -> None:
        """PUT through the proxy; with `claimed`, a client mtime (rclone then lists the object at that time)."""
        bucket = self.node.bucket
        meta = {} if claimed is None else {"Metadata": {"mtime": f"{claimed.timestamp():.6f}"}}
        await asyncio.to_thread(bucket.client.put_object, Bucket=bucket.name, Key=key, Body=blob, **meta)

    async def act(self, window: int) -> MinerReport:
        report = MinerReport(window)
        ctx = await self.node.open_window(window)
        await self._train_and_publish(ctx, report)
        return report

    async def _train_and_publish(self, ctx: WindowContext, report: MinerReport) -> None:
        kind, window = self.kind_of(ctx.window), ctx.window
        key, proxy = gradient_key(window, self.node.hotkey), self.proxy
        if kind == "copier":
            await self.copy(ctx, key, report)
            return
        a = await asyncio.to_thread(self.signed, ctx, 0)
        if kind == "late":
            await self.late(ctx, key, a, report)
            return
        if kind == "split":
            b = await asyncio.to_thread(self.signed, ctx, 1)
            proxy.behave(key, Behaviour(bodies=(b,)), ops={"GET"}, client=lambda who: who.listener in MINERS)
        elif kind == "swap":
            b = await asyncio.to_thread(self.signed, ctx, 1)
            proxy.behave(key, Behaviour(bodies=(a, b)), ops={"GET"})
        elif kind == "trickle":
            proxy.behave(key, Behaviour(trickle_bps=len(a) / 60), ops={"GET"}, client=full_get)
        elif kind == "hang":
            proxy.behave(key, Behaviour(hang="before_headers"), ops={"GET"})
        elif kind == "cl_long":
            proxy.behave(key, Behaviour(content_length_delta=5), ops={"GET"}, client=full_get)
        elif kind == "cl_short":
            proxy.behave(key, Behaviour(content_length_delta=-5), ops={"GET"}, client=full_get)
        await self.upload(ctx, a, report)
        if not report.uploaded:
            self.run.notes[window] = report.note

    async def late(self, ctx: WindowContext, key: str, blob: bytes, report: MinerReport) -> None:
        """Once the validator's deadline look is over (its record is out), upload claiming an on-time stamp."""
        claimed = ctx.start_time + timedelta(seconds=1)
        self.proxy.behave(key, Behaviour(last_modified=claimed), ops={"LIST", "HEAD", "GET"})
        record_deadline = ctx.bounds.deadline_block + self.hp.fetch.record_grace_blocks
        try:
            while not await asyncio.to_thread(self.validator.bucket.exists, aggregate_key(ctx.window)):
                if await self.node.chain.block() > record_deadline + 2:
                    break
                await asyncio.sleep(0.1)
            self.run.checks["late_put_block"] = await self.node.chain.block()
            await self.put(key, blob, claimed)
            report.uploaded, report.note = True, "uploaded after the deadline, claiming an on-time stamp"
        finally:
            self.gates[ctx.window].set()

    async def copy(self, ctx: WindowContext, key: str, report: MinerReport) -> None:
        """Wait for an honest shard and for two of the validator's looks after it; re-sign it as ours and
        upload it claiming a time before the window's start."""
        window, last_chance = ctx.window, ctx.bounds.deadline_block - 1

        def validator_looks() -> int:  # the validator's header reads of our key, as our server saw them
            return sum(1 for s in self.proxy.requests if s.op == "GET" and s.key == key and s.client.listener == VALIDATOR)

        victim = None
        while victim is None and await self.node.chain.block() < last_chance:
            for name, bucket in self.victims.items():
                if await asyncio.to_thread(bucket.exists, gradient_key(window, self.run.hotkeys[name])):
                    victim = name
                    break
            else:
                await asyncio.sleep(0.05)
        if victim is None:
            self.run.notes[window] = "no honest shard to copy before the deadline"
            return
        seen = validator_looks()
        while validator_looks() < seen + 2 and await self.node.chain.block() < last_chance:
            await asyncio.sleep(0.05)
        original_key = gradient_key(window, self.run.hotkeys[victim])
        data = await asyncio.to_thread(self.victims[victim].get, original_key, 10**9)
        original = read_shard(data, self.expectation(window, self.run.hotkeys[victim]))
        assert isinstance(original, Shard), original
        blob = await asyncio.to_thread(self.signed, ctx, 0, original.tensors, original.debug_values)
        claimed = ctx.start_time  # before the original, by every time our server reports
        self.proxy.behave(key, Behaviour(last_modified=claimed), ops={"LIST", "HEAD", "GET"})
        if not ctx.bounds.on_time(await self.node.chain.block()):
            self.run.notes[window] = "the copy was ready only after the deadline"
            return
        await self.put(key, blob, claimed)
        report.uploaded = True
        self.run.checks["copier"] = {"victim": victim, "claimed": claimed}


def _spy(run: Run, validator: Validator) -> None:
    """Record what the validator's own publication, downloads and stage 1 produced (the real code runs)."""
    node, publisher, scorer = validator.node, validator.publisher, validator.scorer
    publication, fetch, gather_candidates = publisher.publication, node.fetch, node.gather_candidates
    filter_window = scorer.filter_window

    def bound(ctx: WindowContext) -> float:  # the download deadline: fetch.window_fraction of the window
        return node.shard_source(ctx).window_seconds

    async def watched_publication(ctx, miners):
        pub = await publication(ctx, miners)
        run.pubs[ctx.window] = pub
        return pub

    async def timed_fetch(ctx, hotkeys, pinned=None):
        started = time.monotonic()
        out = await fetch(ctx, hotkeys, pinned)
        run.timings.setdefault(ctx.window, []).append(("fetch", time.monotonic() - started, bound(ctx)))
        return out

    async def timed_gather(ctx, candidates, pinned, ceiling, seconds=None):
        started = time.monotonic()
        out = await gather_candidates(ctx, candidates, pinned, ceiling, seconds)
        run.timings.setdefault(ctx.window, []).append(("gather", time.monotonic() - started, bound(ctx)))
        return out

    def recorded_filter(miners, fetched, *args):
        results = filter_window(miners, fetched, *args)
        run.checks.setdefault("stage1", []).append((dict(fetched), results))
        return results

    publisher.publication, node.fetch, node.gather_candidates = watched_publication, timed_fetch, timed_gather
    scorer.filter_window = recorded_filter


async def _steps(run: Run, name: str, role, windows: list[int], gates: dict[int, asyncio.Event]) -> None:
    hp = role.node.hp
    for w in windows:
        if name == VALIDATOR:
            if w in gates:  # score the late window once the late upload is there
                await asyncio.wait_for(gates[w].wait(), 60)
            before = len(run.checks.get("stage1", []))
            run.reports.setdefault(name, {})[w] = await role.step(w)
            run.fetched[w], run.filters[w] = run.checks["stage1"][before]
        else:
            head = await role.node.chain.block()
            behind = head >= window_bounds(w, hp.windows).end_block or (
                head >= window_bounds(w, hp.windows).start_block and window_progress(head, hp.windows) > 0.5)
            rest = PLAN[w - run.first] == "cl_short"  # so that they start the copier window on time
            run.reports.setdefault(name, {})[w] = await role.step(w, train=not (behind or rest))
        run.digests.setdefault(name, {})[w] = param_digest(role.node.model)


async def play_scenario(run: Run, net: network.TestNetwork, state) -> None:
    proxy = run.proxy
    vnode = await net.node(VALIDATOR)
    honest = [await net.node(name) for name in MINERS]
    hnode = await net.node(HOSTILE, endpoint=proxy.endpoint)
    nodes = {**dict(zip(MINERS, honest, strict=True)), VALIDATOR: vnode, HOSTILE: hnode}
    for name, node in nodes.items():
        node.pool = ListenerPool(node, proxy, name)
    graph = await vnode.chain.metagraph()
    run.hotkeys = {name: node.hotkey for name, node in nodes.items()}
    run.uids = {name: graph.uid_of(hk) for name, hk in run.hotkeys.items()}

    validator = Validator(vnode, state / VALIDATOR)
    miners = {name: Miner(node, state / name) for name, node in zip(MINERS, honest, strict=True)}
    truth = {name: Bucket(net.s3.bucket_config(node.bucket.name), node.bucket.storage) for name, node in nodes.items()}
    gates: dict[int, asyncio.Event] = {}
    hostile = HostileMiner(hnode, state / HOSTILE, run, vnode, {n: truth[n] for n in MINERS}, gates)
    await asyncio.gather(*(asyncio.to_thread(hostile.noise, seed) for seed in (0, 1)))
    _spy(run, validator)
    # the clients a running node already has, made before the first window: the validator's for every
    # miner's bucket, the miners' for the validator's (peer lists, records, mirror)
    creds = await vnode.credentials()
    await asyncio.gather(*(asyncio.to_thread(node.pool.get, creds[run.hotkeys[reader]]) for reader, node in
                           [(m, vnode) for m in [*MINERS, HOSTILE]] + [(VALIDATOR, n) for n in honest]))

    run.first = first = await vnode.current_window() + 1
    gates[run.window("late")] = asyncio.Event()
    for w in range(first, first + net.hp.peers.lead_windows):
        await validator.publish_initial_peer_list(w)
    await vnode.wait_for_block(window_bounds(first, net.hp.windows).start_block)
    windows = list(range(first, first + len(PLAN)))
    publishing = asyncio.create_task(validator.publisher.run(first))  # as Validator.run does
    try:
        acts = await asyncio.gather(_steps(run, VALIDATOR, validator, windows, gates),
                                    *(_steps(run, name, m, windows, gates) for name, m in miners.items()),
                                    *(hostile.act(w) for w in windows))
        run.reports[HOSTILE] = {w: report for w, report in zip(windows, acts[1 + len(miners):], strict=True)}
    finally:
        publishing.cancel()

    for w in windows:  # the records as published (every node read these)
        try:
            data = await asyncio.to_thread(vnode.bucket.get, aggregate_key(w), 1 << 20)
            run.records[w] = AggregateRecord.parse(data, netuid=vnode.netuid, window=w, validator=vnode.hotkey)
        except Exception:  # noqa: BLE001 - no record is an outcome the tests look at
            run.records[w] = None
    state_ = validator.state
    run.history = {name: {e.window: e for e in state_.uids[uid].history}
                   for name, uid in run.uids.items() if uid in state_.uids}

    # reads after the run, with the proxy's rules still in place
    ctx = await vnode.window(run.window("late"))
    key = gradient_key(ctx.window, run.bad)
    liar = proxy.bucket(name=hnode.bucket.name)
    run.checks["late"] = {
        "unpinned": (await asyncio.to_thread(vnode.shard_source(ctx).fetch, [run.bad]))[run.bad],
        "deadline_block": ctx.bounds.deadline_block, "put_block": run.checks.get("late_put_block"),
        "deadline": ctx.deadline_time, "claimed_listed": liar.stat(key).last_modified,
        "claimed_head": liar.head(key).last_modified}
    ctx = await vnode.window(run.window("split"))
    record = run.records[ctx.window]
    if record is not None and run.bad in record.pinned:  # what the miners' fallback (the miner's bucket) gives
        run.checks["split"] = {  # what the miners asked the hostile bucket during the run, then the fallbacks
            "miner_requests": [s for s in proxy.requests if s.key == gradient_key(ctx.window, run.bad)
                               and s.client.listener in MINERS],
            "miner_direct": (await asyncio.to_thread(honest[0].shard_source(ctx, record.pinned).fetch,
                                                     [run.bad]))[run.bad],
            "validator_direct": (await asyncio.to_thread(vnode.shard_source(ctx, record.pinned).fetch,
                                                         [run.bad]))[run.bad]}
    copier = run.checks.get("copier")
    if copier is not None:
        w = run.window("copier")
        copier["claimed_listed"] = liar.stat(gradient_key(w, run.bad)).last_modified
        copier["original_listed"] = truth[copier["victim"]].stat(
            gradient_key(w, run.hotkeys[copier["victim"]])).last_modified
    await net.close()


def print_summary(run: Run) -> None:
    """One line per window on stderr (shown with -s, or when a test fails): who counted, why not, timings."""
    name = {hk: n for n, hk in run.hotkeys.items()}
    for i, kind in enumerate(PLAN):
        w = run.first + i
        rec, got = run.records.get(w), run.fetched.get(w, {}).get(run.bad)
        print(f"w{w} {kind}: record={sorted(name[h] for h in rec.peers) if rec else None} "
              f"hostile={(got.reason, got.detail[:80]) if got else None} "
              f"timings={[(a, round(t, 2), round(b, 2)) for a, t, b in run.timings.get(w, [])]} "
              f"theta={[run.digests.get(n, {}).get(w, '')[:8] for n in HONEST]} note={run.notes.get(w, '')} "
              f"uploaded={[getattr(run.reports.get(n, {}).get(w), 'uploaded', None) for n in [*MINERS, HOSTILE]]} "
              f"reports={ {n: getattr(run.reports.get(n, {}).get(w), 'note', None) for n in [*HONEST, HOSTILE]} }",
              file=sys.stderr)
