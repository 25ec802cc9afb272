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
  update does not improve its own assigned data);
* one signed update per hotkey per window: a hotkey seen standing behind two different content hashes
  (a server swapping bodies, a re-upload) is pinned to `CHANGED_PIN` in the snapshot, so none of its
  bytes count for the window (`FetchOutcome.CHANGED`, not even downloaded).

A round lasts at most `round_seconds` (the publisher passes `fetch.poll_seconds`): a server that is
slow or silent misses the round, it cannot stretch it (which would move the deadline look, and with
it what counts as on time, for everybody). A hotkey whose read from an earlier round is still in
flight is not asked again, so a hung server holds one thread, which ends at its socket timeout.
The only slack a miner gains is the latency of about one poll after the deadline block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from protocol.storage_config import BucketConfig
from protocol.storage_keys import gradient_key
from protocol.wire import Rejection, ShardExpectation, ShardRules, header_prefix_bytes, read_header
from transport.bucket import ObjectNotFound, StorageError
from transport.fetch import CHANGED_PIN, BucketPool

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
    round_seconds: float | None = None  # the most one round may take (None: object_seconds)
    rounds: int = 0
    sightings: dict[str, Sighting] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)  # hotkey -> times its content hash changed
    _reading: dict[str, Future] = field(default_factory=dict, repr=False)  # reads not finished yet

    @property
    def budget(self) -> float:
        """Seconds one round may take: one header read's deadline, and how long the round waits."""
        return self.object_seconds if self.round_seconds is None else min(self.object_seconds, self.round_seconds)

    def poll(self, hotkeys: list[str]) -> None:
        """One round: read each hotkey's header, in parallel, all within `budget` seconds. Blocking."""
        todo = [h for h in hotkeys if h in self.credentials and not self._busy(h)]
        if todo:
            executor = ThreadPoolExecutor(max_workers=min(self.pool.storage.max_concurrency, len(todo)))
            try:
                deadline = time.monotonic() + self.budget
                futures = {executor.submit(self._header, h, deadline): h for h in todo}
                self._reading.update({h: f for f, h in futures.items()})
                done, _late = wait(futures, timeout=self.budget + 0.05)
                for future in done:
                    self._note(futures[future], future.result())
            finally:  # a hung server's thread ends at its socket timeout; nobody waits for it here
                executor.shutdown(wait=False, cancel_futures=True)
        self.rounds += 1

    def _busy(self, hotkey: str) -> bool:
        reading = self._reading.get(hotkey)
        if reading is not None and reading.done():
            del self._reading[hotkey]
            return False
        return reading is not None

    def _header(self, hotkey: str, deadline: float) -> str | None:
        expected = ShardExpectation(self.netuid, self.window, hotkey, self.rules)
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
        """What was seen so far: each hotkey's content hash (`CHANGED_PIN` if it showed two) and first round."""
        return {h: Sighting(CHANGED_PIN, s.first_round) if self.changes.get(h) else s
                for h, s in self.sightings.items()}
