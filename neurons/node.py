"""What miners and validators share: chain, buckets, data, the global model and the window clock.

A `Node` holds the network's hparams, a `Chain`, this node's own writable bucket, a pool of other
participants' read buckets (credentials come from chain commitments), the page store and the global
model θ. It answers the per-window questions both roles ask — when does window w start and close
(chain timestamps), what is its seed, whose peer list counts — and applies a window's aggregated
update, so the miner and the validator step the model with literally the same code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime

import torch

from protocol.codec_aggregate import apply_outer_step
from protocol.data import PageStore
from protocol.gather import BucketPool, Fetched, GatherResult, fetch_many, gather
from protocol.hparams import HParams
from protocol.model import param_shapes
from protocol.peers import PeerList, PeerListError, read_peer_list
from protocol.storage_config import BucketConfig
from protocol.storage_keys import peers_key
from protocol.windows import WindowBounds, window_bounds, window_of
from protocol.wire import ShardExpectation
from transport.bucket import Bucket, ObjectNotFound, StorageError
from transport.chain import Chain, MetagraphSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowClock:
    """A window's bounds in blocks and, once those blocks exist, in chain time."""

    bounds: WindowBounds
    start_time: datetime
    deadline_time: datetime | None  # None until the deadline block has been produced


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
        self.device = next(model.parameters()).device
        self._credentials: dict[str, BucketConfig] = {}
        self._credentials_block = -1

    @property
    def netuid(self) -> int:
        return self.chain.config.netuid

    @property
    def hotkey(self) -> str:
        return self.chain.hotkey

    def buckets(self) -> list[Bucket]:
        """Every bucket client this node has used (its own first), for transfer counters."""
        return [self.bucket, *self.pool.all()]

    # --- time ------------------------------------------------------------------------------------------

    async def current_window(self) -> int:
        return window_of(await self.chain.block(), self.hp.windows)

    async def wait_for_block(self, block: int) -> None:
        await self.chain.wait_for_block(block)

    async def clock(self, window: int) -> WindowClock:
        bounds = window_bounds(window, self.hp.windows)
        head = await self.chain.block()
        start = await self.chain.block_timestamp(min(bounds.start_block, head))
        deadline = await self.chain.block_timestamp(bounds.deadline_block) if head >= bounds.deadline_block else None
        return WindowClock(bounds, start, deadline)

    async def window_seed(self, window: int) -> bytes:
        """Public randomness of a window: the hash of its first block (unknown before it exists)."""
        start = window_bounds(window, self.hp.windows).start_block
        await self.chain.wait_for_block(start)
        block_hash = await self.chain.block_hash(start)
        return hashlib.blake2b(f"{self.netuid}:{window}:{block_hash}".encode(), digest_size=32).digest()

    # --- participants ----------------------------------------------------------------------------------

    async def credentials(self, refresh: bool = False) -> dict[str, BucketConfig]:
        """Read-bucket configs of every uid with a valid commitment, keyed by hotkey (cached per block)."""
        block = await self.chain.block()
        if refresh or block != self._credentials_block:
            read = await self.chain.read_credentials()
            self._credentials = {c.hotkey: c.credentials.bucket_config() for c in read.credentials.values()}
            for uid, reason in read.errors.items():
                log.debug("uid %d has no usable bucket commitment: %s", uid, reason)
            self._credentials_block = block
        return self._credentials

    async def find_peer_list(self, window: int, graph: MetagraphSnapshot | None = None) -> PeerList | None:
        """The peer list of the highest-stake validator that published a valid one for `window` in time.

        In time means uploaded before the window's upload deadline (upload time from the bucket
        listing, deadline from the chain), so every node decides alike whether a window has a peer
        list: a list that appears after some miners looked for it counts for nobody, and a slow
        validator cannot step a model the miners did not step.
        """
        graph = graph or await self.chain.metagraph()
        creds = await self.credentials()
        deadline = (await self.clock(window)).deadline_time
        validators = sorted(graph.validators(), key=lambda uid: (-graph.stake[uid], uid))
        for uid in validators:
            hotkey = graph.hotkeys[uid]
            if hotkey not in creds:
                continue
            bucket = self.pool.get(creds[hotkey])
            try:
                info = await asyncio.to_thread(bucket.stat, peers_key(window))
                if deadline is not None and info.last_modified > deadline:
                    log.warning("peer list of validator uid %d for window %d came after the deadline; ignored",
                                uid, window)
                    continue
                data = await asyncio.to_thread(bucket.get, peers_key(window), 256 * 1024)
                return read_peer_list(data, netuid=self.netuid, window=window, validator=hotkey)
            except ObjectNotFound:
                continue
            except (StorageError, PeerListError) as exc:
                log.warning("peer list of validator uid %d for window %d unusable: %s", uid, window, exc)
        return None

    # --- shards and the outer step ---------------------------------------------------------------------

    def expectation(self, window: int, hotkey: str) -> ShardExpectation:
        return ShardExpectation(netuid=self.netuid, window=window, hotkey=hotkey, hp=self.hp, shapes=self.shapes)

    def _fetcher(self, window: int, clock: WindowClock, creds: dict[str, BucketConfig]):
        def fetch(hotkeys: list[str]) -> dict[str, Fetched]:
            return fetch_many(hotkeys, creds, lambda h: self.expectation(window, h), self.pool,
                              clock.start_time, clock.deadline_time, self.pool.storage.max_concurrency)
        return fetch

    async def fetch(self, window: int, hotkeys: list[str]) -> dict[str, Fetched]:
        """Download and verify these hotkeys' shards for `window` (in parallel threads)."""
        fetch = self._fetcher(window, await self.clock(window), await self.credentials())
        return await asyncio.to_thread(fetch, hotkeys)

    async def gather_window(self, window: int, candidates: list[str], target: int | None = None,
                            prefetched: dict[str, Fetched] | None = None) -> GatherResult:
        """Aggregate the window's peers (call after its deadline); the model is not touched."""
        fetch = self._fetcher(window, await self.clock(window), await self.credentials())
        return await asyncio.to_thread(
            gather, window, candidates, target or self.hp.peers.primary, fetch, self.device, prefetched
        )

    def apply(self, result: GatherResult) -> bool:
        """θ ← θ − α·aggregate; False (model unchanged) when nothing valid was gathered."""
        if result.aggregated is None:
            return False
        apply_outer_step(self.model, result.aggregated, self.hp.outer.lr)
        return True
