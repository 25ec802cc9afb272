"""The devnet's live scoreboard: what every miner earned this window, and how good the model is.

Each window the launcher reads the first validator's persisted scoring state (`scores.json`), the
metagraph (incentive) and the validator's local model (`node-state.safetensors`, evaluated on a
fixed slice of held-out pages), and turns them into a `WindowSnapshot`: one `UidRow` per miner
with its shard status, sync, loss score, rating (μ − 3σ), weight and incentive. The snapshots are
shown as a rich live table on a terminal, as plain lines otherwise, and become the final report.
Evaluating held-out loss here keeps the validator lean: it never pays for a number only we show.
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
from gauntlet.state import ScoringState, StateError, load_state
from neurons.node_files import SCORES_FILE, STATE_FILE
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
        description="The window's shard: ok, missing, late, rejected, copy, or '-' if unscored."
    )
    accepted: bool = Field(False, description="The shard passed stage 1 (present, on time, valid).")
    sync: float | None = Field(None, description="Sync score used this window.")
    loss_score: float | None = Field(
        None, description="Relative loss improvement on random data, if evaluated."
    )
    rating: float | None = Field(None, description="OpenSkill ordinal μ − 3σ after this window.")
    weight: float | None = Field(None, description="Weight the validator set for this uid this window.")
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
        return f"copy x{entry.copy_factor:g}", True
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
            row.weight = entry.weight
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
        self._cache: tuple[int, int, float] | None = None  # (mtime_ns, model window, loss)

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
            mtime = os.stat(state_dir / STATE_FILE).st_mtime_ns
        except OSError:
            return None
        if self._cache is not None and self._cache[0] == mtime:
            return self._cache[1], self._cache[2]
        saved = load_local_state(state_dir, self.hp.revision(), self.model)
        if saved is None:
            return None
        loss = mean_loss(self.model, self.samples)
        self._cache = (mtime, saved.window, loss)
        return saved.window, loss


class ScoreWatcher:
    """Turns the first validator's scores.json into one snapshot per window it newly scored.

    Windows scored before the watcher started (a resumed devnet) are not reported again."""

    def __init__(self, validator_dir: Path, participants: list[Participant], evaluator: HeldoutEvaluator):
        self.dir, self.participants, self.evaluator = validator_dir, participants, evaluator
        self.seen = self.state().last_window if self.state() is not None else None

    def state(self) -> ScoringState | None:
        try:
            return load_state(self.dir / SCORES_FILE)
        except StateError:
            return None  # torn reads cannot happen (atomic replace); a bad file is the validator's to report

    async def poll(self, chain: Chain, block: int | None) -> list[WindowSnapshot]:
        state = self.state()
        if (
            state is None
            or state.last_window is None
            or (self.seen is not None and state.last_window <= self.seen)
        ):
            return []
        scored = {e.window for us in state.uids.values() for e in us.history}
        new = sorted(w for w in scored if (self.seen is None or w > self.seen) and w <= state.last_window)
        new = new or [state.last_window]
        self.seen = state.last_window
        try:
            graph = await chain.metagraph()
        except Exception:  # the SDK raises several types while the chain restarts
            graph = None
        held = await asyncio.to_thread(self.evaluator.evaluate, self.dir)
        out = []
        for w in new:
            last = w == new[-1] and held is not None
            out.append(
                WindowSnapshot(
                    window=w,
                    block=block or 0,
                    time=time.time(),
                    heldout_loss=held[1] if last else None,
                    model_window=held[0] if last else None,
                    rows=build_rows(state, w, graph, self.participants),
                )
            )
        return out


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = ("uid", "name", "kind", "shard", "sync", "loss score", "rating", "weight", "incentive")


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
