"""A deterministic fault plan for the devnet (`crucible devnet run --fault PLAN`), like hivemind's `Fault` enum.

Issue 15 asks whether every honest node holds the same θ and whether the network heals itself. The
launcher applies each fault at a chain window, always the same way, so a run can be repeated and its
report (`devnet/fault_report.py`) says what each fault cost. Grammar, one fault per `--fault`:

    kill:NODE@W[+Ns]            SIGKILL NODE's process group once the chain is at window W; the
                                supervisor starts it again N s later (default 2), like a crash.
    storage-stall@W+Ns          SIGSTOP the S3 server (rclone included) for N s, then SIGCONT.
    chain-stall@W+Ns            SIGSTOP the chain process for N s, then SIGCONT.
    unreachable:NODE:PEER@W      NODE's reads of PEER's window-W shard fail as unreachable (PEER's bucket
                                and every validator's mirror; only for NODE): from the start of W
                                until the chain reaches W + 2, so NODE's live gather of W fails and its
                                replay of W a window later does not.
    delete-shard:NODE@W         NODE's window-W shard is deleted from its bucket and every validator's
                                mirror once the chain reaches W + 2 (after every live node applied it):
                                a node replaying W later cannot, and must recover from a newer checkpoint.

The miner and validator code stays the mainnet code: "unreachable" is applied by `FaultyPool`, which
`devnet.participant` puts in place of the node's `BucketPool` when the launcher passes `--fault-file`
(a JSON file the launcher writes while the fault holds and removes after).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from devnet.supervisor import ChildState, Supervisor
from protocol.storage_keys import gradient_key, mirror_key
from transport.bucket import Bucket, BucketConfig
from transport.bucket_errors import StorageError, StorageUnavailable
from transport.fetch import BucketPool

DEFAULT_RESTART_S = 2.0
MAX_SECONDS = 1_000_000.0  # a longer stall's timer would overflow (threading.Timer): beyond any devnet run anyway
GRAMMAR = "KIND[:NODE]@WINDOW[+SECONDSs]"
_FAULT_RE = re.compile(r"(?P<kind>[a-z-]+)(?::(?P<target>[A-Za-z0-9_:-]+))?@(?P<window>\d+)(?:\+(?P<seconds>\d+(?:\.\d+)?)s)?")


class FaultKind(StrEnum):
    KILL = "kill"
    STORAGE_STALL = "storage-stall"
    CHAIN_STALL = "chain-stall"
    UNREACHABLE = "unreachable"
    DELETE_SHARD = "delete-shard"


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    spec: str = Field(description="The fault as written on the command line.")
    kind: FaultKind = Field(description="What happens.")
    window: int = Field(ge=0, description="Chain window at which it happens.")
    node: str | None = Field(None, description="The node it happens to (kill, unreachable, delete-shard).")
    peer: str | None = Field(None, description="unreachable: the miner whose shard NODE cannot read.")
    seconds: float | None = Field(None, ge=0, description="kill: seconds until the restart; stalls: how long.")


def parse_fault(text: str) -> Fault:
    """One `--fault` value; ValueError with one line naming what is wrong."""
    m = _FAULT_RE.fullmatch(text.strip())
    kinds = ", ".join(k.value for k in FaultKind)
    if m is None:
        raise ValueError(f"--fault {text!r}: expected {GRAMMAR} (e.g. kill:miner-1@6+2s, storage-stall@8+40s, "
                         f"unreachable:miner-0:miner-2@10, delete-shard:miner-1@5)")
    try:
        kind = FaultKind(m["kind"])
    except ValueError:
        raise ValueError(f"--fault {text!r}: unknown kind {m['kind']!r}; choose from {kinds}") from None
    target, window = m["target"], int(m["window"])
    seconds = float(m["seconds"]) if m["seconds"] is not None else None
    if seconds is not None and seconds > MAX_SECONDS:
        raise ValueError(f"--fault {text!r}: {seconds:g} s is longer than any run; at most {MAX_SECONDS:g} s")
    node = peer = None
    if kind in (FaultKind.STORAGE_STALL, FaultKind.CHAIN_STALL):
        if target is not None or seconds is None:
            raise ValueError(f"--fault {text!r}: a stall takes no node and needs a duration, e.g. {kind}@{window}+40s")
    elif kind == FaultKind.UNREACHABLE:
        node, sep, peer = (target or "").partition(":")
        if not sep or not node or not peer or node == peer or seconds is not None:
            raise ValueError(f"--fault {text!r}: expected unreachable:NODE:PEER@WINDOW (one window, no duration)")
    else:
        if not target or ":" in target:
            raise ValueError(f"--fault {text!r}: expected {kind}:NODE@WINDOW")
        if kind == FaultKind.DELETE_SHARD and seconds is not None:
            raise ValueError(f"--fault {text!r}: delete-shard takes no duration")
        node = target
        if kind == FaultKind.KILL and seconds is None:
            seconds = DEFAULT_RESTART_S
    return Fault(spec=text.strip(), kind=kind, window=window, node=node, peer=peer, seconds=seconds)


def parse_plan(items: list[str]) -> list[Fault]:
    return [parse_fault(item) for item in items]


def check_plan(plan: list[Fault], nodes: dict[str, str]) -> None:
    """Every named node exists (`nodes`: name to role); PEERs and deleted shards are miners'."""
    for fault in plan:
        for name in filter(None, (fault.node, fault.peer)):
            if name not in nodes:
                raise ValueError(f"--fault {fault.spec!r}: no node named {name!r} (nodes: {', '.join(nodes)})")
        shard_owner = fault.peer if fault.kind == FaultKind.UNREACHABLE else (
            fault.node if fault.kind == FaultKind.DELETE_SHARD else None)
        if shard_owner is not None and nodes[shard_owner] != "miner":
            raise ValueError(f"--fault {fault.spec!r}: {shard_owner} publishes no shards (not a miner)")


class FaultEvent(BaseModel):
    """What the runner did for one fault, with chain windows and wall-clock times (epoch seconds)."""

    fault: Fault = Field(description="The fault.")
    started_window: int = Field(description="Chain window when it was applied.")
    started_at: float = Field(description="When it was applied.")
    ended_window: int | None = Field(None, description="Chain window when it ended (None: still on at the end).")
    ended_at: float | None = Field(None, description="When it ended: restart, SIGCONT, deletion; unreachable: when "
                                                     "W + 1 (its ended_window) began (the block is lifted at W + 2).")
    detail: str = Field("", description="What was done.")


# --- "unreachable", inside the node: the participant's pool ---------------------------------------------------


def blocked_keys(path: Path) -> set[str]:
    """The shard keys the fault file names now (none when there is no file or it is unreadable)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    out = set()
    for item in raw.get("blocked", []) if isinstance(raw, dict) else []:
        try:
            out |= {gradient_key(int(item["window"]), str(item["hotkey"])),
                    mirror_key(int(item["window"]), str(item["hotkey"]))}
        except (KeyError, TypeError, ValueError):
            continue
    return out


class FaultyBucket:
    """A `Bucket` whose `fetch` of a blocked key fails as an unreachable server would; all else unchanged."""

    def __init__(self, inner: Bucket, fault_file: Path):
        self._inner, self._fault_file = inner, fault_file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def fetch(self, key: str, *args: Any, **kwargs: Any) -> bytes:
        if key in blocked_keys(self._fault_file):
            raise StorageUnavailable(f"GetObject s3://{self._inner.name}/{key}: unreachable (devnet fault plan)",
                                     attempts=1)
        return self._inner.fetch(key, *args, **kwargs)


class FaultyPool(BucketPool):
    """The node's `BucketPool`, every bucket it hands out wrapped in `FaultyBucket` (same clients, same stats)."""

    def __init__(self, inner: BucketPool, fault_file: Path):
        super().__init__(inner.storage)
        self._buckets, self.fault_file = inner._buckets, fault_file

    def get(self, config: BucketConfig) -> Bucket:
        return FaultyBucket(super().get(config), self.fault_file)  # type: ignore[return-value]


# --- the launcher's side ---------------------------------------------------------------------------------------


def fault_file(state: Path, node: str) -> Path:
    return state / "faults" / f"{node}.json"


class FaultRunner:
    """Applies a plan as the chain's windows go by; `tick(window)` from the launcher's poll loop.

    Stalls end on a timer thread (a stalled chain must not keep its own SIGCONT waiting on a chain read).
    """

    def __init__(self, plan: list[Fault], sup: Supervisor, state: Path, hotkeys: dict[str, str], s3: dict,
                 validators: list[str]):
        self.plan, self.sup, self.state, self.hotkeys, self.s3 = plan, sup, state, hotkeys, s3
        self.validators = validators
        self.events: list[FaultEvent] = []
        self.window_times: dict[int, float] = {}  # chain window: when the launcher first saw it
        self._pending = list(plan)
        self._open: list[FaultEvent] = []
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._resume_lock = threading.Lock()
        self.window = -1  # the chain's window, as last seen
        self._blocks: dict[str, list[dict]] = {}  # node -> the shards it cannot read now (its fault file)
        self.log: list[str] = []
        self._shown = 0  # log lines tick() has returned

    def nodes_with_fault_file(self) -> dict[str, Path]:
        return {f.node: fault_file(self.state, f.node) for f in self.plan
                if f.kind == FaultKind.UNREACHABLE and f.node is not None}

    def tick(self, window: int) -> list[str]:
        """Apply and end what is due at the chain's `window`; returns the event lines since the last call."""
        now = time.time()
        if self.window < 0:  # the first window seen: on a reused devnet (no --fresh) the chain is well past 0
            self.log.extend(f"fault {f.spec}: window {f.window} had passed when the run started (chain at window "
                            f"{window}; fault windows are the chain's, not the run's); applied now"
                            for f in self._pending if f.window < window)
        self.window = max(self.window, window)
        self.window_times.setdefault(window, now)
        for fault in [f for f in self._pending if window >= f.window]:
            self._pending.remove(fault)
            event = FaultEvent(fault=fault, started_window=window, started_at=now)
            self.events.append(event)
            self._open.append(event)
            self._start(event)
        for event in list(self._open):
            self._maybe_end(event, window)
        lines, self._shown = self.log[self._shown:], len(self.log)
        return lines

    def _note(self, message: str) -> None:
        self.log.append(message)

    def _end(self, event: FaultEvent, detail: str) -> None:
        with self._lock:
            if event.ended_at is None:
                event.ended_at, event.detail = time.time(), (event.detail + "; " + detail).strip("; ")
                event.ended_window = self.window
                self._note(f"fault {event.fault.spec} ended: {detail}")

    def _start(self, event: FaultEvent) -> None:
        f = event.fault
        if f.kind == FaultKind.KILL:
            killed = self.sup.kill(f.node, restart_after_s=f.seconds)
            event.detail = f"SIGKILL {f.node}" if killed else f"{f.node} was not running"
        elif f.kind in (FaultKind.STORAGE_STALL, FaultKind.CHAIN_STALL):
            name = "s3" if f.kind == FaultKind.STORAGE_STALL else "chain"
            self._signal(name, signal.SIGSTOP)
            event.detail = f"SIGSTOP {name}"
            timer = threading.Timer(f.seconds or 0.0, self._resume, (event, name))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        elif f.kind == FaultKind.UNREACHABLE:
            self._blocks.setdefault(f.node, []).append({"hotkey": self.hotkeys[f.peer], "window": f.window})
            self._write_blocks(f.node)
            event.detail = f"{f.node} cannot read {f.peer}'s window-{f.window} shard"
        self._note(f"fault {f.spec} applied at window {event.started_window}: {event.detail or 'waiting'}")

    def _maybe_end(self, event: FaultEvent, window: int) -> None:
        f = event.fault
        if f.kind == FaultKind.KILL:
            child = self.sup.children.get(f.node)
            if child is not None and child.state == ChildState.RUNNING and (
                    f.seconds is None or time.time() >= event.started_at + f.seconds):
                self._end(event, f"{f.node} restarted")
        elif f.kind == FaultKind.UNREACHABLE and window >= f.window + 2:
            self._blocks[f.node].remove({"hotkey": self.hotkeys[f.peer], "window": f.window})
            self._write_blocks(f.node)
            self._end(event, "block lifted")
            event.ended_window = f.window + 1  # it hit one window, W; W + 1 is the first unaffected one
            # ... so it ended when W + 1 began, as ended_window says: the report's seconds_to_recover count
            # from there (from the lift, a window later, they came out 0 for a recovery in W + 1)
            event.ended_at = self.window_times.get(f.window + 1, event.ended_at)
        elif f.kind == FaultKind.DELETE_SHARD and window >= f.window + 2:
            self._end(event, self._delete(f))
        if event.ended_at is not None and event in self._open:
            self._open.remove(event)

    def _write_blocks(self, node: str) -> None:
        """The node's fault file: written whole and renamed (the node reads it at any moment); none when empty."""
        path = fault_file(self.state, node)
        if not self._blocks.get(node):
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"blocked": self._blocks[node]}))
        tmp.replace(path)

    def _delete(self, f: Fault) -> str:
        hotkey = self.hotkeys[f.node]
        deleted = []
        for bucket, key in [(f.node, gradient_key(f.window, hotkey))] + [
                (v, mirror_key(f.window, hotkey)) for v in self.validators]:
            config = BucketConfig(endpoint_url=self.s3["endpoint"], region=self.s3["region"], bucket=bucket,
                                  access_key_id=self.s3["write"]["access_key_id"],
                                  secret_access_key=self.s3["write"]["secret_access_key"])
            try:
                Bucket(config).delete(key)
                deleted.append(f"{bucket}/{key}")
            except StorageError as exc:
                deleted.append(f"{bucket}/{key} not deleted ({type(exc).__name__})")
        return "deleted " + ", ".join(deleted)

    def _signal(self, name: str, sig: signal.Signals) -> None:
        child = self.sup.children.get(name)
        if child is not None and child.proc is not None and child.proc.poll() is None:
            try:
                os.killpg(child.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _resume(self, event: FaultEvent, name: str) -> None:
        """End a stall; SIGCONT only when no other stall of the same process still holds it (overlapping
        stalls: the shorter one must not continue the server the longer one stopped)."""
        with self._resume_lock:  # two timers ending at once: the second one sees the first ended
            holding = [e.fault.spec for e in self.events if e is not event and e.ended_at is None
                       and e.fault.kind == event.fault.kind]
            if holding:
                self._end(event, f"{name} stays stopped ({', '.join(holding)} still on)")
            else:
                self._signal(name, signal.SIGCONT)
                self._end(event, f"SIGCONT {name}")

    def release(self) -> list[str]:
        """End of the run: continue whatever is stopped, lift every block (stop_all must find them running);
        returns a line for each fault never applied (its window came after the run's last)."""
        for timer in self._timers:
            timer.cancel()
        for event in list(self._open):
            if event.fault.kind in (FaultKind.STORAGE_STALL, FaultKind.CHAIN_STALL):
                self._resume(event, "s3" if event.fault.kind == FaultKind.STORAGE_STALL else "chain")
        for path in self.nodes_with_fault_file().values():
            path.unlink(missing_ok=True)
        lines = [f"fault {f.spec} not applied: the run ended at chain window {self.window}" for f in self._pending]
        for event in self._open:  # a deletion is due at W + 2: a run that ended before it deleted nothing
            if event.fault.kind == FaultKind.DELETE_SHARD and event.ended_at is None:
                event.detail = (f"nothing deleted: the run ended at chain window {self.window}, before window "
                                f"{event.fault.window + 2}")
                lines.append(f"fault {event.fault.spec}: {event.detail}")
        return lines
