"""The validator's persisted scoring state: ratings, moving averages, scores and their history.

A restarted validator must resume exactly where it stopped: losing the ratings would reset every
miner to ordinal 0 and zero the weights for many windows. The state is one versioned pydantic
model saved as JSON atomically (write a temporary file, fsync, `os.replace`, fsync the folder), so
a crash leaves either the old or the new file, never a torn one; floats round-trip exactly. Loading
refuses a file of another format version with a clear message instead of guessing.

Each uid keeps a bounded history of its per-window score components, printed by
`explain(state, uid, window)` for `crucible explain --uid U --window W`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gauntlet.records import UidState, WindowEntry
from protocol.atomic import atomic_write

STATE_VERSION = 2  # 2: first_seen (validator poll round) replaces upload_time


class StateError(ValueError):
    """A state file that cannot be loaded; the message says why."""


class StateConfig(BaseModel):
    """Local (not network-wide) bounds on what the validator remembers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    history_windows: int = Field(
        64, ge=1, description="Windows of score components kept per uid for explain."
    )
    change_windows: int = Field(
        8, ge=1, description="Recent per-window parameter changes kept for the sync check."
    )


class ScoringState(BaseModel):
    """Everything the Gauntlet carries from one window to the next."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    version: int = Field(STATE_VERSION, description="Format version of this state file.")
    last_window: int | None = Field(None, description="Last window scored.")
    uids: dict[int, UidState] = Field(default_factory=dict, description="Per-uid state.")
    step_changes: list[float] = Field(
        default_factory=list,
        description="The validator's own median per-window parameter change, recent windows.",
    )

    def record_step_change(self, value: float, config: StateConfig) -> None:
        """Remember this window's median |θ_w − θ_{w−1}| (non-finite or negative values are ignored)."""
        if math.isfinite(value) and value >= 0:
            self.step_changes = (self.step_changes + [value])[-config.change_windows :]

    def reference_change(self) -> float | None:
        """Median of the recent positive per-window changes: the sync check's unit of "one step"."""
        positive = [c for c in self.step_changes if c > 0]
        return statistics.median(positive) if positive else None

    def entry(self, uid: int, window: int) -> WindowEntry | None:
        us = self.uids.get(uid)
        return next((e for e in reversed(us.history) if e.window == window), None) if us else None


def save_state(state: ScoringState, path: str | Path) -> None:
    """Write the state atomically: tmp file in the same folder, fsync, os.replace, fsync the folder."""
    atomic_write(path, state.model_dump_json().encode())


def load_state(path: str | Path) -> ScoringState:
    """Read a state file; a missing file is a fresh state, anything unreadable a StateError."""
    path = Path(path)
    if not path.exists():
        return ScoringState()
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"scoring state {path}: cannot read: {exc}") from None
    if not isinstance(raw, dict):
        raise StateError(f"scoring state {path}: top level is not an object")
    version = raw.get("version")
    if version != STATE_VERSION:
        raise StateError(
            f"scoring state {path}: format version {version!r}, this validator reads version {STATE_VERSION}; "
            "move the file away to start fresh (ratings will restart)"
        )
    try:
        return ScoringState.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StateError(f"scoring state {path}: {where}: {first['msg']}") from None


def _pct(x: float) -> str:
    return f"{100 * x:+.3f}%" if math.isfinite(x) else "not finite"


def _zero_because(e: WindowEntry) -> str:
    zero = [
        n
        for n, v in (("value", e.value), ("memory", e.memory), ("sync", e.sync))
        if v is not None and v <= 0
    ]
    return f"  (zero: {', '.join(zero)} not positive)" if zero else ""


def explain(state: ScoringState, uid: int, window: int) -> str:
    """Every score component of `uid` in `window`, and why it has the value it has."""
    us = state.uids.get(uid)
    e = state.entry(uid, window)
    if us is None or e is None:
        kept = (
            f" (kept: windows {us.history[0].window}..{us.history[-1].window})" if us and us.history else ""
        )
        return f"uid {uid}: no record for window {window}{kept}"
    lines = [f"uid {uid}  hotkey {e.hotkey}  window {e.window}"]
    if not e.present:
        lines.append("  shard:      missing — nothing uploaded for this window")
    else:
        when = f"first seen in poll round {e.first_seen}" if e.first_seen is not None else "not seen in time"
        lines.append(f"  shard:      {when} — {'on time' if e.timely else 'LATE (outside the window)'}")
        if e.reject_reason is not None:
            lines.append(f"  format:     REJECTED: {e.reject_reason}")
        elif e.timely:
            lines.append("  format:     ok")
    if e.sync is not None:
        behind = (
            f"{e.steps_behind:.3f}" if e.steps_behind is not None and math.isfinite(e.steps_behind) else "∞"
        )
        flag = " — PENALISED (too far behind)" if e.sync_penalised else ""
        flag += f" ({e.sync_reason})" if e.sync_reason else ""
        lines.append(f"  sync:       {behind} steps behind → sync {e.sync:.4f}{flag}")
    if e.copy_overlap is not None:
        src = f" with earlier uploader uid {e.copied_from}" if e.copied_from is not None else ""
        lines.append(f"  copy:       top-k overlap {100 * e.copy_overlap:.2f}%{src} → ×{e.copy_factor:g}")
    if e.losses is not None:
        r = e.losses
        lines.append(
            f"  assigned:   loss {r.loss_before_assigned:.5f} → {r.loss_after_assigned:.5f} ({_pct(r.rel_assigned)})"
        )
        lines.append(
            f"  random:     loss {r.loss_before_random:.5f} → {r.loss_after_random:.5f} ({_pct(r.loss_score)})"
        )
        indicator = e.indicator if e.indicator is not None else r.indicator()
        margin = r.memory_margin
        if margin is not None:
            lines.append(
                f"  control:    the window's mean update on the same assigned samples: loss → "
                f"{r.loss_after_assigned_reference:.5f}; memory margin {margin:+.3f} against the other miners (≈ 0: no memory of its samples)"
            )
            why = "remembers its assigned samples" if indicator > 0 else "margin too small: no memory shown"
        else:
            why = "assigned improved more than random" if indicator > 0 else "assigned did NOT improve more than random"
        lines.append(f"  indicator:  {indicator:+d} ({why}); loss score {r.loss_score:.6g} (step {r.step:g})")
    else:
        why = f": {e.not_evaluated}" if e.not_evaluated else ""
        lines.append(f"  evaluation: not evaluated this window{why} (rating, value and binary average unchanged)")
    if e.relative_score is not None and r_ref(e) is not None:
        lines.append(
            f"  relative:   loss score / reference {r_ref(e):.6g} = {e.relative_score:.4f} (1 = the window's average update)"
        )
    lines.append(f"  value:      {e.value:.4f} (average relative score, shrunk over {e.evaluations} evaluation(s))")
    lines.append(f"  binary MA:  {e.binary_ma:+.4f} → memory factor {e.memory:.3f} (bias-corrected; +1 = always remembered, −1 = never)")
    lines.append(f"  rating:     μ {e.mu:.4f}  σ {e.sigma:.4f}  → ordinal μ−3σ {e.ordinal:.4f} (shown, does not pay)")
    if e.present and e.timely and e.reject_reason is None:
        lines.append(
            f"  raw score:  max(0, value) × memory × sync = {e.raw_score:.6g}" + _zero_because(e)
        )
    for s in e.slashes:
        lines.append(
            f"  slash:      {s}" + ("" if e.raw_score > 0 or not e.timely else "  (nothing to slash)")
        )
    lines.append(f"  score:      {e.score:.6g}")
    role = f" ({e.role} peer in the list chosen from this window's scores)" if e.role else ""
    lines.append(f"  weight:     {e.weight:.6f}{role}")
    lines.append(f"  why:        {why_weight_moved(state, uid, window)}")
    return "\n".join(lines)


def r_ref(e: WindowEntry) -> float | None:
    return e.losses.reference_score if e.losses is not None else None


def why_weight_moved(state: ScoringState, uid: int, window: int) -> str:
    """One plain sentence: how this uid's weight changed in `window` and the main reason."""
    e = state.entry(uid, window)
    us = state.uids.get(uid)
    if e is None or us is None:
        return f"no record of uid {uid} in window {window}"
    idx = next(i for i, h in enumerate(us.history) if h.window == window)
    prev = us.history[idx - 1] if idx > 0 else None
    before = e.previous_weight if e.previous_weight is not None else (prev.weight if prev else 0.0)
    delta = e.weight - before
    moved = (
        f"weight {before:.4f} → {e.weight:.4f} ({'up' if delta > 0 else 'down'} {abs(delta):.4f})"
        if abs(delta) > 1e-6 else f"weight unchanged at {e.weight:.4f}"
    )
    if not (e.present and e.timely and e.reject_reason is None):
        reason = f"no usable shard ({'missing' if not e.present else 'late' if not e.timely else 'rejected'}): " \
                 "the score decays by the missing penalty each such window"
    elif e.copy_factor < 1.0:
        reason = f"its shard copies uid {e.copied_from}'s: score × {e.copy_factor:g}"
    elif e.sync_penalised:
        reason = "it is too far out of sync with the model: score slashed"
    elif e.score <= 0:
        zero = [n for n, v in (("value", e.value), ("memory factor", e.memory), ("sync", e.sync))
                if v is not None and v <= 0]
        reason = f"its score is 0 because {', '.join(zero) or 'the score is below the zero threshold'} " \
                 f"{'is' if len(zero) == 1 else 'are'} not positive"
    elif e.evaluated and prev is not None and e.relative_score is not None:
        dv = e.value - prev.value
        reason = (f"evaluated: relative score {e.relative_score:.3f} moved its value "
                  f"{prev.value:.3f} → {e.value:.3f} ({'+' if dv >= 0 else '−'}{abs(dv):.3f})")
    elif e.evaluated:
        reason = f"evaluated: value now {e.value:.3f} after {e.evaluations} evaluation(s)"
    else:
        why = f" ({e.not_evaluated})" if e.not_evaluated else ""
        reason = f"not evaluated this window{why}: its own score is unchanged, so the move comes from other miners' scores"
    return f"{moved}; {reason}."
