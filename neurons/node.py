"""What miners and validators share: chain, buckets, data, the global model and the window context.

A `Node` holds the network's hparams, a `Chain`, this node's own writable bucket, a pool of other
participants' read buckets, the page store and the global model θ. Once per window it builds a
`WindowContext` — bounds, seed, chain-time clock, the metagraph and every peer's read credentials,
read from the chain once — and every per-window question (whose shards, which peer list, whose
checkpoint) is answered from that context. Both roles step the model with the same `apply`.

Chain reads per window: `open_window` waits for the window's first block and reads its hash and
timestamp (the seed and the start time); `close_window` waits for the deadline block and reads its
timestamp, the metagraph and the commitments. Nothing else in a window asks the chain again, except
the miner's check that it is still before the deadline when it uploads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import torch

from protocol.codec_aggregate import apply_outer_step
from protocol.data import PageStore
from protocol.gather import Fetched, GatherResult, gather
from protocol.hparams import HParams
from protocol.model import param_digest, param_shapes
from protocol.peers import AggregateRecord, PeerList, PeerListError, read_peer_list
from protocol.storage_config import BucketConfig
from protocol.storage_keys import aggregate_key, peers_key
from protocol.windows import WindowBounds, window_bounds, window_of
from protocol.wire import ShardRules
from transport.bucket import Bucket
from transport.bucket_errors import StorageError
from transport.chain import Chain, MetagraphSnapshot
from transport.fetch import BucketPool, ShardSource, first_from_validators

log = logging.getLogger(__name__)
MAX_PEER_LIST_BYTES = 256 * 1024
Directory = tuple[MetagraphSnapshot, dict[str, BucketConfig]]  # who is registered, and their read buckets


@dataclass(frozen=True)
class WindowContext:
    """One window as this node sees it, read from the chain once.

    `open` (at the window's start): bounds, seed and start time. `closed` (at the upload deadline)
    adds the deadline's time, the metagraph and the read credentials of every committed hotkey.
    """

    window: int
    bounds: WindowBounds
    seed: bytes  # blake2b(netuid, window, hash of the window's first block): public, unknowable before
    start_time: datetime  # chain timestamp of the first block
    deadline_time: datetime | None = None  # chain timestamp of the deadline block (None while open)
    graph: MetagraphSnapshot | None = None
    credentials: Mapping[str, BucketConfig] = dataclasses.field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return self.deadline_time is not None and self.graph is not None

    def require_closed(self) -> MetagraphSnapshot:
        if self.graph is None or self.deadline_time is None:
            raise RuntimeError(f"window {self.window} is still open: call Node.close_window first")
        return self.graph

    @property
    def seconds(self) -> float | None:
        """Chain-time length of the window (start to deadline), scaled to blocks_per_window."""
        if self.deadline_time is None:
            return None
        blocks = max(1, self.bounds.deadline_block - self.bounds.start_block)
        per_block = (self.deadline_time - self.start_time).total_seconds() / blocks
        return (self.bounds.end_block - self.bounds.start_block) * max(per_block, 1e-3)


@dataclass(frozen=True)
class FoundRecord:
    """A window's signed aggregate record and where its publisher mirrors the shards it names."""

    record: AggregateRecord
    mirror: BucketConfig  # the publishing validator's bucket (read credentials)
    validator_uid: int


class Node:
    def __init__(self, hp: HParams, chain: Chain, bucket: Bucket, store: PageStore, model: torch.nn.Module,
                 pool: BucketPool | None = None):
        self.hp = hp
        self.chain = chain
        self.bucket = bucket
        self.store = store
        self.model = model
        self.pool = pool or BucketPool(bucket.storage)
        self.shapes = {name: tuple(shape) for name, shape in param_shapes(hp).items()}
        self.shard_rules = ShardRules.from_hparams(hp, self.shapes)
        self.device = next(model.parameters()).device

    @property
    def netuid(self) -> int:
        return self.chain.config.netuid

    @property
    def hotkey(self) -> str:
        return self.chain.hotkey

    def buckets(self) -> list[Bucket]:
        """Every bucket client this node has used (its own first), for transfer counters."""
        return [self.bucket, *self.pool.all()]

    # --- the window context ---------------------------------------------------------------------------

    async def current_window(self) -> int:
        return window_of(await self.chain.block(), self.hp.windows)

    async def wait_for_block(self, block: int) -> None:
        await self.chain.wait_for_block(block)

    async def open_window(self, window: int) -> WindowContext:
        """The window's bounds, seed and start time (waits for its first block)."""
        bounds = window_bounds(window, self.hp.windows)
        await self.chain.wait_for_block(bounds.start_block)
        block_hash = await self.chain.block_hash(bounds.start_block)
        seed = hashlib.blake2b(f"{self.netuid}:{window}:{block_hash}".encode(), digest_size=32).digest()
        start = await self.chain.block_timestamp(bounds.start_block)
        return WindowContext(window, bounds, seed, start)

    async def close_window(self, ctx: WindowContext, directory: Directory | None = None) -> WindowContext:
        """`ctx` with the deadline's time, the metagraph and credentials (waits for the deadline block).

        `directory` (a metagraph and credentials read moments ago) saves reading them again when
        many past windows are closed in a row (catch-up).
        """
        if ctx.closed:
            return ctx
        await self.chain.wait_for_block(ctx.bounds.deadline_block)
        deadline = await self.chain.block_timestamp(ctx.bounds.deadline_block)
        graph, credentials = directory or await self.directory()
        return dataclasses.replace(ctx, deadline_time=deadline, graph=graph, credentials=credentials)

    async def window(self, window: int, directory: Directory | None = None) -> WindowContext:
        """A closed context for a window whose deadline has passed or is awaited (catch-up, validator)."""
        return await self.close_window(await self.open_window(window), directory)

    async def directory(self) -> Directory:
        """The metagraph and every committed hotkey's read credentials, now."""
        return await self.chain.metagraph(), await self.credentials()

    async def credentials(self) -> dict[str, BucketConfig]:
        """Read-bucket configs of every uid with a valid commitment now, keyed by hotkey."""
        read = await self.chain.read_credentials()
        for uid, reason in read.errors.items():
            log.debug("uid %d has no usable bucket commitment: %s", uid, reason)
        return {c.hotkey: c.credentials.bucket_config() for c in read.credentials.values()}

    # --- what validators publish ----------------------------------------------------------------------

    async def find_peer_list(self, ctx: WindowContext) -> PeerList | None:
        """The peer list of the highest-stake validator that published a valid one for the window in time.

        In time means uploaded before the window's upload deadline (upload time from the bucket
        listing, deadline from the chain), so every node decides alike whether a window has a peer
        list: a list that appears after some miners looked for it counts for nobody, and a slow
        validator cannot step a model the miners did not step.
        """
        graph = ctx.require_closed()
        key = peers_key(ctx.window)

        async def read(uid: int, hotkey: str, bucket: Bucket) -> PeerList | None:
            info = await asyncio.to_thread(bucket.stat, key)
            if ctx.deadline_time is not None and info.last_modified > ctx.deadline_time:
                log.warning("peer list of validator uid %d for window %d came after the deadline; ignored",
                            uid, ctx.window)
                return None
            data = await asyncio.to_thread(bucket.get, key, MAX_PEER_LIST_BYTES)
            return read_peer_list(data, netuid=self.netuid, window=ctx.window, validator=hotkey)

        return await first_from_validators(graph, ctx.credentials, self.pool, read,
                                           f"peer list for window {ctx.window}", (PeerListError,))

    async def find_record(self, ctx: WindowContext, replaying: bool = False) -> FoundRecord | None:
        """The window's aggregate record: the highest-stake validator's valid record that was in time.

        In time: listed by the validator's bucket no later than the chain timestamp of the record deadline
        block (`fetch.record_grace_blocks` after the upload deadline). Every node applies that one rule,
        live or replaying: before the deadline a live node accepts only the top validator's record (no
        other can be final while the top one may still publish; taking a lower one early let a low-stake
        validator decide live nodes' θ); from the deadline on, it takes the first in-time record by stake.
        `replaying`: a `StorageError` from a validator that ranks above the answer propagates instead of
        being skipped (a record that could not be read is not a record that was never published).
        """
        graph = ctx.require_closed()
        key = aggregate_key(ctx.window)
        record_deadline = ctx.bounds.deadline_block + self.hp.fetch.record_grace_blocks
        cutoff: list[datetime] = []

        async def read(uid: int, hotkey: str, bucket: Bucket) -> FoundRecord | None:
            if cutoff:
                info = await asyncio.to_thread(bucket.stat, key)
                if info.last_modified > cutoff[0]:
                    log.warning("aggregate record of validator uid %d for window %d came after the record "
                                "deadline; ignored", uid, ctx.window)
                    return None
            data = await asyncio.to_thread(bucket.get, key, MAX_PEER_LIST_BYTES)
            record = AggregateRecord.parse(data, netuid=self.netuid, window=ctx.window, validator=hotkey)
            return FoundRecord(record, ctx.credentials[hotkey], uid)

        what = f"aggregate record {ctx.window}"
        while True:
            if await self.reached(record_deadline):
                cutoff.append(await self.chain.block_timestamp(record_deadline))
                return await first_from_validators(graph, ctx.credentials, self.pool, read, what, (PeerListError,),
                                                   unreadable_raises=replaying)
            found = await first_from_validators(graph, ctx.credentials, self.pool, read, what, (PeerListError,),
                                                among=1)
            if found is not None:
                return found

    async def reached(self, block: int, poll_s: float = 0.25) -> bool:
        """Whether the chain is at `block`, waiting up to `poll_s` for it."""
        try:
            await self.chain.wait_for_block(block, timeout=poll_s)
            return True
        except TimeoutError:
            return False

    # --- shards and the outer step --------------------------------------------------------------------

    def shard_source(self, ctx: WindowContext, pinned: Mapping[str, str] | None = None,
                     mirror: BucketConfig | None = None) -> ShardSource:
        """Where this window's shards are read from, what they must look like, and by when."""
        ctx.require_closed()
        window_s = ctx.seconds or self.hp.windows.blocks_per_window * self.hp.windows.expected_block_time_s
        return ShardSource(self.pool, ctx.credentials, self.netuid, ctx.window, self.shard_rules,
                           self.hp.fetch.object_seconds, self.hp.fetch.window_fraction * window_s, pinned, mirror)

    async def fetch(self, ctx: WindowContext, hotkeys: list[str], pinned: Mapping[str, str] | None = None
                    ) -> dict[str, Fetched]:
        """Download and verify these hotkeys' shards for the window (in parallel threads)."""
        return await asyncio.to_thread(self.shard_source(ctx, pinned).fetch, hotkeys)

    async def gather_candidates(self, ctx: WindowContext, candidates: list[str], pinned: Mapping[str, str],
                                ceiling: float, seconds: float | None = None) -> GatherResult:
        """A validator's choice for the window: the first valid pinned shards of the peer list, clipped.

        Candidates not pinned (not seen by the deadline) can never count: they are not downloaded here,
        so a silent or slow one cannot spend the time the record has before its deadline. `seconds`
        shortens the download deadline (the record's own deadline is near).
        """
        candidates = [hotkey for hotkey in candidates if hotkey in pinned]
        source = self.shard_source(ctx, pinned)
        if seconds is not None:
            source = dataclasses.replace(source, window_seconds=min(source.window_seconds, seconds))
        return await asyncio.to_thread(gather, ctx.window, candidates, self.hp.peers.primary, source, self.device,
                                       None, None, ceiling)

    async def gather_record(self, ctx: WindowContext, found: FoundRecord,
                            prefetched: Mapping[str, Fetched] | None = None) -> GatherResult:
        """The window's update exactly as its record names it (shards by hash, mirror first, its clip norm).

        `result.used != record.peers` means this node could not reproduce the window's update.
        """
        record = found.record
        source = self.shard_source(ctx, record.pinned, found.mirror)
        pinned = {h: f for h, f in (prefetched or {}).items() if f.ok and record.pinned.get(h) == f.shard.header.content_hash}
        return await asyncio.to_thread(gather, ctx.window, record.peers, len(record.peers), source, self.device,
                                       pinned, record.clip_norm)

    def drift(self, record: AggregateRecord) -> str | None:
        """Why this node's θ is not the one the record was made for (None: same, or the record does not say)."""
        if record.theta_digest is None:
            return None
        mine = param_digest(self.model)
        if mine == record.theta_digest:
            return None
        return f"θ digest {mine[:12]}… differs from the record's {record.theta_digest[:12]}…"

    def apply(self, result: GatherResult) -> bool:
        """θ ← θ − α·aggregate; False (model unchanged) when nothing valid was gathered."""
        if result.aggregated is None:
            return False
        apply_outer_step(self.model, result.aggregated, self.hp.outer.lr)
        return True

    async def prune(self, window: int) -> list[str]:
        """Every `checkpoints.every_windows` windows, delete this node's own objects older than
        `checkpoints.retention_windows` (`Bucket.cleanup`, which logs what it deleted and always keeps the
        newest complete checkpoint and every window since). Hparams guarantee retention ≥ every_windows + 2,
        so a replay from the latest checkpoint finds every record and shard it needs. A bucket error is
        logged and ignored: housekeeping never costs a window."""
        checkpoints = self.hp.checkpoints
        if window % checkpoints.every_windows:
            return []
        try:
            deleted = await asyncio.to_thread(self.bucket.cleanup, window, checkpoints.retention_windows)
        except StorageError as exc:
            log.warning("pruning objects older than window %d failed: %s", window - checkpoints.retention_windows, exc)
            return []
        return deleted
