"""The validator's on-time duty: watch a window's uploads, then name the window's update at its deadline.

Scoring a window may take most of the next one; naming the shards everybody aggregates must not.
`Publisher` therefore runs apart from scoring (its own asyncio task, `run`), window after window:

1. during the upload phase it polls every miner's shard header (`transport.watch.UploadWatcher`):
   the content hash each hotkey stands behind, and the poll round it first appeared in;
2. at the deadline block it takes one more look — that snapshot decides what was on time;
3. it gathers the window's peer list candidates, pinned to the snapshot's hashes, clips them
   robustly (the ceiling grows at most `outer.clip_growth`× per window from the last clip norm);
   the downloads get at most half the time left before the record deadline (and never more than a
   window's download deadline), so a pinned shard that then trickles or hangs costs its miner the
   window, not the record its deadline;
4. it copies the chosen shards into its own bucket (`mirror_key`) and publishes the signed
   `AggregateRecord` (hotkeys, content hashes, clip norm) before the record deadline.

Every node — this validator included — then applies the window's record (`Node.find_record`,
`Node.gather_record`). `Validator.step` reads the publication of its window from here, or, when it
is used one window at a time (tests, a restart), makes it on the spot with a single deadline look.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from neurons.node import Node, WindowContext
from protocol.gather import Fetched, GatherResult
from protocol.model import checkpoint_files, save_checkpoint
from protocol.peers import AggregateRecord
from protocol.storage_keys import CHECKPOINT_MODEL_FILE, aggregate_key, checkpoint_key, mirror_key
from transport.bucket import Bucket, StorageError
from transport.watch import Sighting, UploadWatcher

log = logging.getLogger(__name__)


@dataclass
class Publication:
    """What the validator saw and named for one window."""

    window: int
    snapshot: dict[str, Sighting]  # hotkey → the content hash seen by the deadline, and when first
    fetched: dict[str, Fetched] = field(default_factory=dict)  # shards downloaded to choose the peers
    result: GatherResult | None = None  # the chosen shards (None: no peer list for the window)
    published: bool = False  # the record reached the bucket

    @property
    def pinned(self) -> dict[str, str]:
        return {hotkey: s.content_hash for hotkey, s in self.snapshot.items()}

    @property
    def first_seen(self) -> dict[str, int]:
        return {hotkey: s.first_round for hotkey, s in self.snapshot.items()}


class Publisher:
    def __init__(self, node: Node):
        self.node = node
        self.hp = node.hp
        self.keypair = node.chain.wallet.hotkey
        self.last_clip_norm: float | None = None
        self.digests: dict[int, str] = {}  # window → param_digest of θ at its start (set by the scoring loop)
        self.last_checkpoint: int | None = None  # window of the newest checkpoint this process published
        self._done: dict[int, asyncio.Future[Publication]] = {}

    def ceiling(self) -> float:
        """The largest clip norm this window may use: `outer.clip_growth` × the last one, within the cap."""
        cap = self.hp.outer.max_update_norm
        return cap if self.last_clip_norm is None else min(cap, self.hp.outer.clip_growth * self.last_clip_norm)

    def watcher(self, ctx: WindowContext, credentials: Mapping, live: bool = True) -> UploadWatcher:
        """The window's watcher. Live, a round lasts one poll at most: a slow or silent miner misses rounds,
        it cannot delay the deadline look; a single look made after the fact may take an object deadline."""
        return UploadWatcher(self.node.pool, credentials, self.node.netuid, ctx.window, self.node.shard_rules,
                             self.hp.fetch.object_seconds, round_seconds=self.hp.fetch.poll_seconds if live else None)

    async def publication(self, ctx: WindowContext, miners: list[str]) -> Publication:
        """This window's publication: the running task's, or one made now from a single deadline look."""
        for old in [w for w in self._done if w < ctx.window - 4]:
            self._done.pop(old)
        pending = self._done.get(ctx.window)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except Exception as exc:  # the watching task failed for this window: look once now instead
                log.warning("window %d: watched publication failed (%s); looking once at the deadline",
                            ctx.window, exc)
        watcher = self.watcher(ctx, ctx.credentials, live=False)
        await asyncio.to_thread(watcher.poll, miners)
        made = asyncio.get_running_loop().create_future()
        made.set_result(await self.publish(ctx, watcher.snapshot()))
        self._done[ctx.window] = made
        return made.result()

    async def run(self, first_window: int) -> None:
        """Watch and publish every window from `first_window` on, each at its own deadline (forever)."""
        window = first_window
        while True:
            future: asyncio.Future[Publication] = asyncio.get_running_loop().create_future()
            self._done[window] = future
            try:
                future.set_result(await self._watch_and_publish(window))
            except Exception as exc:  # one bad window must not end the duty for the next ones
                log.warning("window %d: publication failed: %s", window, exc)
                future.set_exception(exc)
            window += 1

    async def _watch_and_publish(self, window: int) -> Publication:
        node = self.node
        ctx = await node.open_window(window)
        graph, credentials = directory = await node.directory()
        miners = [hk for hk in graph.hotkeys if hk != node.hotkey]
        watcher = self.watcher(ctx, credentials)
        while not await node.reached(ctx.bounds.deadline_block, self.hp.fetch.poll_seconds):
            await asyncio.to_thread(watcher.poll, miners)
        seen = time.monotonic()
        ctx = await node.close_window(ctx, directory)
        await asyncio.to_thread(watcher.poll, miners)  # the look at the deadline decides
        return await self.publish(ctx, watcher.snapshot(), seen + self.record_seconds(ctx))

    def record_seconds(self, ctx: WindowContext) -> float:
        """Seconds from the deadline block to the record deadline (`fetch.record_grace_blocks`), in chain time."""
        blocks = ctx.bounds.end_block - ctx.bounds.start_block
        per_block = ctx.seconds / blocks if ctx.seconds else self.hp.windows.expected_block_time_s
        return self.hp.fetch.record_grace_blocks * per_block

    async def publish(self, ctx: WindowContext, snapshot: dict[str, Sighting],
                      record_by: float | None = None) -> Publication:
        """Choose the window's shards from its peer list (pinned to the snapshot), mirror them, sign the record.

        With no peer list or no valid shard the record names no peers: θ stays as it is, and every node
        learns so at once instead of waiting out the record deadline (and losing training time).
        `record_by` (time.monotonic()) is the record deadline: the downloads get half the time left.
        """
        node, window = self.node, ctx.window
        pub = Publication(window, snapshot)
        peers = await node.find_peer_list(ctx)
        if peers is None:
            log.warning("window %d: no peer list in time; the record names no peers", window)
        else:
            seconds = None if record_by is None else max(0.0, record_by - time.monotonic()) / 2
            result = await node.gather_candidates(ctx, peers.candidates, pub.pinned, self.ceiling(), seconds)
            pub.result, pub.fetched = result, result.fetched
            if not result.used:
                log.warning("window %d: no valid pinned shard among %d candidates; the record names no peers",
                            window, len(peers.candidates))
        used = pub.result.used if pub.result is not None else []
        clip_norm = pub.result.clip_norm if pub.result is not None and pub.result.clip_norm is not None else 0.0
        try:
            await asyncio.gather(*(asyncio.to_thread(node.bucket.put, mirror_key(window, h), pub.fetched[h].raw)
                                   for h in used))
            record = AggregateRecord(netuid=node.netuid, window=window, validator=node.hotkey, peers=used,
                                     content_hashes=pub.result.content_hashes if used else [], clip_norm=clip_norm,
                                     theta_digest=self.digests.pop(window, None))
            await asyncio.to_thread(node.bucket.put, aggregate_key(window), record.signed(self.keypair))
        except StorageError as exc:
            log.warning("window %d: could not publish the aggregate record: %s", window, exc)
            return pub
        if used and math.isfinite(clip_norm) and clip_norm > 0:
            self.last_clip_norm = clip_norm
        pub.published = True
        return pub

    def checkpoint_due(self, next_window: int) -> bool:
        """Every `checkpoints.every_windows` windows, and at the first window stepped after a missed one (a
        validator that skipped a checkpoint window while behind still publishes one K windows after the last)."""
        every = self.hp.checkpoints.every_windows
        overdue = self.last_checkpoint is not None and next_window - self.last_checkpoint >= every
        return next_window % every == 0 or overdue

    async def publish_checkpoint(self, window: int) -> None:
        """θ at the start of `window`, as a transformers-loadable folder in our bucket (`upload_checkpoint`)."""
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(self.node.model, tmp, self.hp, tokenizer=self.node.store.tokenizer_path)
            await upload_checkpoint(self.node.bucket, window, Path(tmp))
        self.last_checkpoint = window


async def upload_checkpoint(bucket: Bucket, window: int, folder: Path) -> bool:
    """Upload a saved checkpoint folder as the checkpoint of `window`; True once every file is in the bucket.

    Stops at the first file that fails; that StorageError is logged, not raised.
    """
    names = checkpoint_files(folder)
    # model.safetensors last: readers take only windows listing it, so it present ⇒ every other file present.
    order = [n for n in names if n != CHECKPOINT_MODEL_FILE] + [n for n in names if n == CHECKPOINT_MODEL_FILE]
    for name in order:
        try:
            await asyncio.to_thread(bucket.put_file, checkpoint_key(window, name), folder / name)
        except StorageError as exc:
            log.warning("could not publish checkpoint %d (%s not uploaded, so readers skip it): %s",
                        window, name, exc)
            return False
    return True
