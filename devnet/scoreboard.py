"""The devnet's live scoreboard: what every miner earned this window, and how good the model is.

Each window the launcher reads the first validator's persisted scoring state (`scores.json`), the
metagraph (incentive) and the validator's local model (`node-state.safetensors`, evaluated on a
fixed slice of held-out pages), and turns them into a `WindowSnapshot`: one `UidRow` per miner
with its shard status, sync, loss score, rating (μ − 3σ), weight and incentive. The snapshots are
shown as a rich live table on a terminal, as plain lines otherwise, and become the final report.
Evaluating held-out loss here keeps the validator lean: it never pays for a number only we show.

The validator writes `scores.json` for window w and then θ at the start of w + 1 (the model window w
produced), so a reader can see the new scores next to the old θ. `ScoreWatcher` therefore keys the
held-out loss on the saved θ's own window: window w's snapshot waits (briefly) until the saved state
holds θ of window w + 1, and each saved θ is evaluated once, so every scored window gets exactly the
loss of the model it produced — never a repeat of the previous one.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gauntlet.records import WindowEntry
from gauntlet.state import ScoringState, StateError, explain, load_state
from neurons.node_files import SCORES_FILE, STATE_FILE, read_metrics
from protocol.hparams import HParams
from transport.chain import Chain, MetagraphSnapshot

HONEST = "honest"


class Participant(BaseModel):
    name: str = Field(
        description="Devnet name: miner-i, adv-<kind>-j, validator-i (logs, state dir, bucket)."
    )
    role: Literal["miner", "validator"] = Field(description="Which command it runs.")
    kind: str = Field(description="'honest', an adversary kind, or 'validator'.")
    wallet: str = Field(description="Wallet name under the devnet's wallet path (hotkey 'default').")
    hotkey: str = Field(description="Hotkey ss58 address.")


class UidRow(BaseModel):
    uid: int = Field(description="Uid on the subnet.")
    name: str = Field(description="Participant name, or 'uid N' for a hotkey the devnet did not start.")
    kind: str = Field(description="'honest', an adversary kind, or 'external'.")
    status: str = Field(
        description="The window's shard: ok, missing, late, rejected, 'copy of uid N', or '-' if unscored."
    )
    accepted: bool = Field(False, description="The shard passed stage 1 (present, on time, valid).")
    sync: float | None = Field(None, description="Sync score used this window.")
    loss_score: float | None = Field(
        None, description="Relative loss improvement on random data, if evaluated."
    )
    rating: float | None = Field(None, description="OpenSkill ordinal μ − 3σ after this window (shown, does not pay).")
    value: float | None = Field(None, description="Shrunk average relative score after this window (what pays).")
    memory: float | None = Field(None, description="Memory factor after this window (0 = a coin flip).")
    why: str | None = Field(None, description="`crucible explain` for this uid and window: every factor, in words.")
    weight: float | None = Field(None, description="Weight the validator set for this uid this window.")
    in_sync: bool | None = Field(
        None, description="The miner's own verdict for this window (its metrics.jsonl): θ matched the digest in the "
                          "window's signed record; None for an adversary, a uid the devnet did not start, or no line yet.")
    incentive: float | None = Field(None, description="Incentive from the metagraph when the row was taken.")


class WindowSnapshot(BaseModel):
    window: int = Field(description="Window the rows were scored for.")
    block: int = Field(description="Chain head when the snapshot was taken.")
    time: float = Field(description="POSIX time of the snapshot.")
    heldout_loss: float | None = Field(None, description="Held-out loss of the validator's model, if read.")
    model_window: int | None = Field(
        None, description="The evaluated model is θ at the start of this window."
    )
    rows: list[UidRow] = Field(default_factory=list, description="One row per miner uid.")


def _status(entry: WindowEntry) -> tuple[str, bool]:
    if not entry.present:
        return "missing", False
    if not entry.timely:
        return "late", False
    if entry.reject_reason is not None:
        return "rejected", False
    if entry.copy_factor < 1:
        source = f"uid {entry.copied_from}" if entry.copied_from is not None else "an earlier upload"
        return f"copy of {source}", True
    return "ok", True


def build_rows(
    state: ScoringState | None, window: int, graph: MetagraphSnapshot | None, participants: list[Participant]
) -> list[UidRow]:
    """Rows for `window` from the validator's state and the metagraph; validators are left out."""
    by_hotkey = {p.hotkey: p for p in participants}
    if graph is not None:
        uids = list(enumerate(graph.hotkeys))
    elif state is not None:
        uids = sorted((uid, us.hotkey) for uid, us in state.uids.items())
    else:
        uids = []
    rows = []
    for uid, hotkey in uids:
        who = by_hotkey.get(hotkey)
        if who is not None and who.role == "validator":
            continue
        row = UidRow(
            uid=uid, name=who.name if who else f"uid {uid}", kind=who.kind if who else "external", status="-"
        )
        entry = state.entry(uid, window) if state is not None else None
        if entry is not None and entry.hotkey == hotkey:
            row.status, row.accepted = _status(entry)
            row.sync = entry.sync
            row.loss_score = entry.losses.loss_score if entry.losses is not None else None
            row.rating = entry.ordinal
            row.value, row.memory = entry.value, entry.memory
            row.weight = entry.weight
            row.why = explain(state, uid, window)
        if graph is not None:
            row.incentive = graph.incentive[uid]
        rows.append(row)
    return rows


class HeldoutEvaluator:
    """Held-out loss of a node's saved model on the first `pages` held-out pages (cached per file)."""

    def __init__(self, hp: HParams, data_path: Path, pages: int = 32):
        from protocol.data import PageStore
        from protocol.model import build_model

        self.hp = hp
        store = PageStore(data_path, hp)
        self.samples = store.pages(range(min(pages, store.num_heldout)), "heldout")
        self.model = build_model(hp)
        self._cache: tuple[tuple[int, int, int], int, float] | None = None  # (file identity, model window, loss)

    def initial(self) -> float:
        """Loss of θ_0, the network's deterministic initialisation."""
        from neurons.training import mean_loss
        from protocol.model import build_model

        return mean_loss(build_model(self.hp), self.samples)

    def evaluate(self, state_dir: Path) -> tuple[int, float] | None:
        """(model window, loss) of `state_dir`'s node-state, or None when there is none yet."""
        from neurons.local_state import load_local_state
        from neurons.training import mean_loss

        try:
            st = os.stat(state_dir / STATE_FILE)
        except OSError:
            return None
        # every save is a new file (atomic replace): inode, mtime and size tell two saves apart even when
        # they fall in the same coarse mtime tick
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is not None and self._cache[0] == identity:
            return self._cache[1], self._cache[2]
        saved = load_local_state(state_dir, self.hp.revision(), self.model)
        if saved is None:
            return None
        loss = mean_loss(self.model, self.samples)
        self._cache = (identity, saved.window, loss)
        return saved.window, loss


class ScoreWatcher:
    """Turns the first validator's scores.json into one snapshot per window it newly scored, each with the
    held-out loss of the θ that window produced (see the module docstring).

    Windows scored before the watcher started (a resumed devnet) are not reported again. A window whose θ
    never shows up (the validator died between its two writes, or already saved a later θ) is reported
    without a loss after `max_wait_s`, or as soon as the saved θ is newer than the one it produced."""

    def __init__(self, validator_dir: Path, participants: list[Participant], evaluator: HeldoutEvaluator,
                 max_wait_s: float = 30.0):
        self.dir, self.participants, self.evaluator = validator_dir, participants, evaluator
        self.max_wait_s = max_wait_s
        self.unreadable: str | None = None  # why the last read of scores.json failed, if it did
        self.seen = self.state().last_window if self.state() is not None else None
        self.pending: dict[int, float] = {}  # scored window -> when it was first seen
        self.evaluated: int | None = None  # newest model window whose loss was reported

    def state(self) -> ScoringState | None:
        """The validator's scoring state; None if absent or unreadable (then `unreadable` says why)."""
        try:
            state, self.unreadable = load_state(self.dir / SCORES_FILE), None
            return state
        except StateError as exc:  # torn reads cannot happen (atomic replace): a validator of other code?
            self.unreadable = str(exc)
            return None

    async def poll(self, chain: Chain, block: int | None) -> list[WindowSnapshot]:
        state = self.state()
        now = time.time()
        if state is not None and state.last_window is not None and (self.seen is None or state.last_window > self.seen):
            scored = {e.window for us in state.uids.values() for e in us.history}
            new = [w for w in scored if (self.seen is None or w > self.seen) and w <= state.last_window]
            for w in new or [state.last_window]:
                self.pending.setdefault(w, now)
            self.seen = state.last_window
        if not self.pending or state is None:
            return []
        held = await asyncio.to_thread(self.evaluator.evaluate, self.dir)  # (model window, loss) of the saved θ
        ready: list[tuple[int, float | None]] = []
        for w in sorted(self.pending):
            produced = w + 1  # window w's outer step gives θ at the start of w + 1
            if held is not None and held[0] == produced:
                fresh = self.evaluated is None or produced > self.evaluated
                ready.append((w, held[1] if fresh else None))
                self.evaluated = produced if fresh else self.evaluated
            elif (held is not None and held[0] > produced) or now - self.pending[w] > self.max_wait_s:
                ready.append((w, None))  # its θ is gone (overwritten) or never came
            else:
                break  # θ of this window is not saved yet: wait, and keep the windows in order
        if not ready:
            return []
        try:
            graph = await chain.metagraph()
        except Exception:  # the SDK raises several types while the chain restarts
            graph = None
        out = []
        for w, loss in ready:
            del self.pending[w]
            out.append(
                WindowSnapshot(
                    window=w,
                    block=block or 0,
                    time=now,
                    heldout_loss=loss,
                    model_window=w + 1 if loss is not None else None,
                    rows=self._with_sync(build_rows(state, w, graph, self.participants), w),
                )
            )
        return out

    def _with_sync(self, rows: list[UidRow], window: int) -> list[UidRow]:
        """Fill each honest miner's `in_sync` from its own metrics.jsonl (a sibling of the validator's folder)."""
        for row in rows:
            if row.kind == HONEST:
                row.in_sync = node_in_sync(self.dir.parent / row.name, window)
        return rows


def node_in_sync(node_dir: Path, window: int) -> bool | None:
    """A node's `in_sync` for `window` from its metrics.jsonl (the last line for that window), None if none."""
    for line in reversed(read_metrics(node_dir)):
        if line.get("window") == window and isinstance(line.get("in_sync"), bool):
            return line["in_sync"]
    return None


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = ("uid", "name", "kind", "shard", "sync", "loss score", "rating", "weight", "in sync", "incentive")


def _cells(row: UidRow) -> tuple[str, ...]:
    return (
        str(row.uid),
        row.name,
        row.kind,
        row.status,
        _num(row.sync, ".2f"),
        _num(row.loss_score, ".2e"),
        _num(row.rating, ".2f"),
        _num(row.weight, ".3f"),
        "-" if row.in_sync is None else ("yes" if row.in_sync else "NO"),
        _num(row.incentive, ".3f"),
    )


def headline(snap: WindowSnapshot) -> str:
    loss = (
        ""
        if snap.heldout_loss is None
        else f"  held-out loss {snap.heldout_loss:.4f} (θ of window {snap.model_window})"
    )
    return f"window {snap.window}  block {snap.block}{loss}"


def render_table(snap: WindowSnapshot, footer: str = "") -> Table:
    table = Table(title=headline(snap), caption=footer or None)
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("name", "kind", "shard") else "right")
    for row in snap.rows:
        style = None if row.kind == HONEST else "yellow"
        table.add_row(*_cells(row), style=style)
    return table


def render_lines(snap: WindowSnapshot) -> list[str]:
    widths = (4, 16, 10, 9, 5, 10, 7, 6, 9)
    fmt = "  ".join(f"{{:>{w}}}" if i not in (1, 2, 3) else f"{{:<{w}}}" for i, w in enumerate(widths))
    return [headline(snap), fmt.format(*COLUMNS), *(fmt.format(*_cells(r)) for r in snap.rows)]


class Scoreboard:
    """A rich `Live` table when stdout is a terminal, plain lines otherwise."""

    def __init__(self, console: Console | None = None, live: bool | None = None):
        self.console = console or Console()
        self.live_mode = self.console.is_terminal if live is None else live
        self._live: Live | None = None
        self.last: WindowSnapshot | None = None

    def __enter__(self) -> Scoreboard:
        if self.live_mode:
            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def show(self, snap: WindowSnapshot, footer: str = "") -> None:
        self.last = snap
        if self._live is not None:
            self._live.update(render_table(snap, footer))
        else:
            for line in render_lines(snap):
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        """An event line (crash, restart, stop) above the table."""
        stamp = time.strftime("%H:%M:%S")
        self.console.print(f"[{stamp}] {message}", markup=False, highlight=False, soft_wrap=True)
