"""Where the devnet chain gets drand quicknet pulses for revealing timelocked weight commits.

The real chain's drand pallet stores every quicknet pulse (round, randomness, BLS signature) as it is
published, and the reveal step decrypts commits with the signature of their round. The devnet runs
offline, so it cannot follow drand; instead the chain process (`crucible devnet chain --drand-pulses FILE
[--drand-url URL]`) asks a `PulseSource` for exactly the rounds its queued commits wait on
(`chain_commit_reveal.feed_pulses`):

- `RecordedPulses`: a JSON file of real recorded pulses (tests/assets/drand/quicknet_pulses.json holds
  round 1000 from subtensor's own drand tests). Only past rounds can be recorded, so this serves tests that
  encrypt to such a round; commits from the SDK target a future round and stay pending.
- `DrandRelay`: a drand HTTP relay (`GET {url}/{chain_hash}/public/{round}`), asked only once a round's
  time has come and at most every `retry_s` per round. For online use; a relay that does not answer
  leaves the commits pending, never a crash.

Pulses are not BLS-verified here: a wrong signature fails the commit's authenticated decryption.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

QUICKNET_CHAIN_HASH = "52db9ba70e0cc0f6eaf7803dd07447a1f5477735fd3f661792ba94600c84e971"
QUICKNET_GENESIS_S = 1692803367  # drand quicknet /info genesis_time
QUICKNET_PERIOD_S = 3


def round_time(round_: int) -> float:
    """Unix time at which quicknet publishes `round_` (round 1 at genesis)."""
    return QUICKNET_GENESIS_S + (int(round_) - 1) * QUICKNET_PERIOD_S


class PulseSource(Protocol):
    def signature(self, round_: int) -> str | None:
        """The hex BLS signature of `round_`, or None when this source does not (yet) have it."""


class RecordedPulses:
    """Real pulses recorded in a JSON file: `{"chain_hash": quicknet, "pulses": [{"round", "signature"}]}`."""

    def __init__(self, path: Path):
        doc = json.loads(Path(path).read_text())
        if doc.get("chain_hash", QUICKNET_CHAIN_HASH) != QUICKNET_CHAIN_HASH:
            raise ValueError(f"{path}: pulses of chain {doc.get('chain_hash')}, not drand quicknet")
        self.pulses = {int(p["round"]): str(p["signature"]).removeprefix("0x") for p in doc.get("pulses", [])}

    def signature(self, round_: int) -> str | None:
        return self.pulses.get(int(round_))


class DrandRelay:
    """A drand HTTP relay, e.g. https://api.drand.sh (needs the internet; the devnet never requires it)."""

    def __init__(self, url: str, timeout_s: float = 2.0, retry_s: float = 3.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._asked: dict[int, float] = {}

    def signature(self, round_: int) -> str | None:
        now = time.time()
        if round_time(round_) > now or now - self._asked.get(round_, 0.0) < self.retry_s:
            return None
        self._asked[round_] = now
        try:
            with urllib.request.urlopen(f"{self.url}/{QUICKNET_CHAIN_HASH}/public/{int(round_)}",
                                        timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            log.warning("drand relay %s: no pulse for round %d (%s)", self.url, round_, exc)
            return None
        if int(body.get("round", -1)) != int(round_) or not body.get("signature"):
            log.warning("drand relay %s: answer for round %d is not that round's pulse", self.url, round_)
            return None
        self._asked.pop(round_, None)
        return str(body["signature"])


class Pulses:
    """Sources asked in order; the first that has the round answers."""

    def __init__(self, sources: list[PulseSource]):
        self.sources = sources

    def signature(self, round_: int) -> str | None:
        for source in self.sources:
            sig = source.signature(round_)
            if sig:
                return sig
        return None


def pulse_source(pulses_file: Path | None, drand_url: str | None) -> Pulses | None:
    """The chain's pulse source from its flags; None when it has neither (every commit stays pending)."""
    sources: list[PulseSource] = []
    if pulses_file is not None:
        sources.append(RecordedPulses(pulses_file))
    if drand_url:
        sources.append(DrandRelay(drand_url))
    return Pulses(sources) if sources else None
