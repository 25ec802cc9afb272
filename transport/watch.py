"""What a validator sees of a window's uploads with its own eyes: who had which signed shard, and when.

Nothing a miner's server reports about time is believed (its Last-Modified, listing times and
client-set mtimes are all the miner's to forge). Instead the validator looks: during the upload
phase it reads the first bytes of every miner's shard every `fetch.poll_seconds` — the signed
header, which commits the hotkey to one content hash for this window (`protocol.wire.read_header`)
— and notes, per hotkey, the poll *round* in which the current content hash was first seen. The
snapshot taken when the validator observes the deadline block is the window's truth:

* a shard counts as on time iff its content hash is in the snapshot; bytes fetched later must hash
  to it (else the shard "changed");
* copies are ordered by first-seen round; two shards first seen in the same round cannot be ordered,
  and then neither is named the copier (the assigned-vs-random test still catches a copier, whose
  update does not improve its own assigned data).

The only slack a miner gains is the latency of one poll after the deadline block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from protocol.storage_config import BucketConfig
from protocol.storage_keys import gradient_key
from protocol.wire import Rejection, ShardExpectation, ShardRules, header_prefix_bytes, read_header
from transport.bucket import ObjectNotFound, StorageError
from transport.fetch import BucketPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sighting:
    """One hotkey's shard as the validator saw it: its content hash and the round it first appeared in."""

    content_hash: str
    first_round: int


@dataclass
class UploadWatcher:
    """Polls every miner's shard header for one window; `snapshot()` is what was seen so far."""

    pool: BucketPool
    credentials: Mapping[str, BucketConfig]
    netuid: int
    window: int
    rules: ShardRules
    object_seconds: float
    rounds: int = 0
    sightings: dict[str, Sighting] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)  # hotkey -> times its content hash changed

    def poll(self, hotkeys: list[str]) -> None:
        """One round: read each hotkey's header (in parallel, each within `object_seconds`). Blocking."""
        todo = [h for h in hotkeys if h in self.credentials]
        if todo:
            executor = ThreadPoolExecutor(max_workers=min(self.pool.storage.max_concurrency, len(todo)))
            try:
                futures = {executor.submit(self._header, h): h for h in todo}
                done, _late = wait(futures, timeout=self.object_seconds + 1.0)
                for future in done:
                    self._note(futures[future], future.result())
            finally:  # a hung server's thread ends at its own deadline; nobody waits for it here
                executor.shutdown(wait=False, cancel_futures=True)
        self.rounds += 1

    def _header(self, hotkey: str) -> str | None:
        expected = ShardExpectation(self.netuid, self.window, hotkey, self.rules)
        deadline = time.monotonic() + self.object_seconds
        try:
            prefix = self.pool.get(self.credentials[hotkey]).fetch(
                gradient_key(self.window, hotkey), expected.max_bytes, deadline, header_prefix_bytes(expected))
        except (ObjectNotFound, StorageError):
            return None
        except Exception as exc:  # a hostile server must never stop the watcher
            log.debug("watching %s: %s", hotkey, exc)
            return None
        header = read_header(prefix, expected)
        return None if isinstance(header, Rejection) else header.content_hash

    def _note(self, hotkey: str, content_hash: str | None) -> None:
        if content_hash is None:
            return
        seen = self.sightings.get(hotkey)
        if seen is None or seen.content_hash != content_hash:
            if seen is not None:
                self.changes[hotkey] = self.changes.get(hotkey, 0) + 1
            self.sightings[hotkey] = Sighting(content_hash, self.rounds)

    def snapshot(self) -> dict[str, Sighting]:
        return dict(self.sightings)
