"""What each planned fault cost (issue 15): windows lost, time to recover, and every honest node's final θ.

`crucible devnet run --fault PLAN` (devnet/faults.py) records when each fault began and ended; this
module turns that and the honest miners' `metrics.jsonl` lines (`window`, `stepped`, `in_sync`; logs are
never parsed) into the report's `faults` entries:

- the network *stepped* in window w when some honest miner applied w's record (`stepped`);
- a node is *in step* in w when it has a line for w and stepped: a miner applies a record only to the θ
  the record names (`Miner.ensure_in_sync`), so a node that found itself out of sync at w's start,
  recovered and stepped ends w in sync; a window it has no line for (it was down), in which it found
  itself out of sync (`in_sync` false), or did not step while the network did, is listed as out of sync;
- a fault is *recovered* at the first window r ≥ its end window in which the network stepped and
  every honest miner was in step; `windows_to_recover` = r − end window, `seconds_to_recover` = from
  the fault's end to the start of r + 1 (when r's step was done), as the launcher saw the chain;
- a fault's span starts one window before the window it was applied in: window w's record is
  published and applied early in w + 1, so a fault at W can cost W − 1's step (and a node killed at W
  loses the W − 1 it was finishing); it ends at the recovery (or the last window with metrics);
- the held-out loss (the validator's θ, from the launcher's snapshots) *steps again* by window
  m − 1 − end for the first snapshot m (model window, with m − 1 ≥ the end window) whose loss differs
  from the snapshot before it: where the validator scored no window in between, that is the latest
  window the step can have been in (an upper bound).

Faults whose spans overlap share the windows lost between them: space them to tell their costs apart.

Final digests are `protocol.model.param_digest` of θ in each honest node's saved state
(`node-state.safetensors`, window and `model.*` tensors), compared with the reference validator's
digest for that same window: its own saved θ, or the θ digest its signed aggregate record of that
window carries (the record file in its bucket folder), so nodes stopped a window apart still compare.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from devnet.faults import FaultEvent
from neurons.node_files import STATE_FILE
from protocol.storage_keys import aggregate_key


class FaultOutcome(BaseModel):
    fault: str = Field(description="The fault as planned (--fault).")
    started_window: int = Field(description="Chain window when it was applied.")
    ended_window: int | None = Field(description="Chain window when it ended (None: it never did).")
    fault_seconds: float | None = Field(description="Seconds from applied to ended.")
    windows_not_stepped: list[int] = Field(
        description="Windows from the one before the start to the recovery in which no honest node stepped "
                    "(held-out loss flat).")
    out_of_sync: dict[str, list[int]] = Field(
        description="Per honest miner, windows in that span it was down, found itself out of sync, or did not "
                    "step while the network did.")
    windows_not_scored: list[int] = Field(description="Windows in that span the validator did not score.")
    recovered_window: int | None = Field(
        description="First window ≥ the end in which the network stepped and every honest miner was in step.")
    windows_to_recover: int | None = Field(description="recovered_window − ended_window.")
    seconds_to_recover: float | None = Field(
        description="Seconds from the fault's end to the start of recovered_window + 1 (launcher's clock).")
    heldout_steps_again: int | None = Field(
        description="Windows after the end until the held-out loss moved again (0: at once; an upper bound "
                    "where the validator scored no window in between).")
    detail: str = Field("", description="What the runner did.")


class NodeDigest(BaseModel):
    window: int | None = Field(description="θ saved is the model at the start of this window (None: no state).")
    digest: str | None = Field(description="param_digest of that θ.")
    reference: str | None = Field(description="The reference validator's θ digest for the same window.")
    equal: bool | None = Field(description="digest == reference (None: no reference for that window).")


class FinalDigests(BaseModel):
    reference: str = Field(description="The validator whose θ is the reference.")
    nodes: dict[str, NodeDigest] = Field(description="Per honest node (miners and validators).")
    all_equal: bool | None = Field(
        description="True: every honest node's digest equals the reference's for its window; False: one differs or "
                    "has no saved state; None: none differs, but some stopped at a window the reference has no digest "
                    "for (e.g. a window ahead of it whose record was not yet published).")
    same_window_agree: bool = Field(description="Nodes that stopped at the same window hold the same digest.")


def _steps(metrics: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, dict[int, dict]], set[int], int | None]:
    lines = {name: {int(m["window"]): m for m in items} for name, items in metrics.items()}
    stepped = {w for per in lines.values() for w, m in per.items() if m.get("stepped")}
    last = max((w for per in lines.values() for w in per), default=None)
    return lines, stepped, last


def _in_step(line: dict | None) -> bool:
    return line is not None and bool(line.get("stepped"))


def summarize_faults(events: list[FaultEvent], metrics: dict[str, list[dict[str, Any]]],
                     window_times: dict[int, float], scored: set[int],
                     heldout: dict[int, float]) -> list[FaultOutcome]:
    """One outcome per applied fault; `metrics`: honest miner name -> its metrics.jsonl lines."""
    lines, stepped, last = _steps(metrics)
    out = []
    for ev in events:
        end = ev.ended_window
        recovered = None
        if end is not None and last is not None:
            recovered = next((w for w in range(end, last + 1) if w in stepped
                              and all(_in_step(per.get(w)) for per in lines.values())), None)
        span_end = recovered if recovered is not None else (last if last is not None else ev.started_window)
        span = range(max(0, ev.started_window - 1), span_end + 1)
        out_of_sync = {name: [w for w in span if per.get(w) is None or per[w].get("in_sync") is False
                              or (w in stepped and not _in_step(per[w]))]
                       for name, per in sorted(lines.items())}
        moved = None
        if end is not None:
            points = sorted(heldout)
            moved = next((m - 1 - end for p, m in zip(points, points[1:], strict=False) if m - 1 >= end
                          and heldout[m] != heldout[p]), None)
        seconds = None
        if recovered is not None and ev.ended_at is not None and recovered + 1 in window_times:
            seconds = max(0.0, window_times[recovered + 1] - ev.ended_at)
        out.append(FaultOutcome(
            fault=ev.fault.spec, started_window=ev.started_window, ended_window=end,
            fault_seconds=None if ev.ended_at is None else ev.ended_at - ev.started_at,
            windows_not_stepped=[w for w in span if w not in stepped and w <= (last if last is not None else -1)],
            out_of_sync=out_of_sync,
            windows_not_scored=[w for w in span if w not in scored],
            recovered_window=recovered, windows_to_recover=None if recovered is None else recovered - end,
            seconds_to_recover=seconds, heldout_steps_again=moved, detail=ev.detail,
        ))
    return out


def state_digest(node_dir: Path) -> tuple[int, str] | None:
    """(window, param_digest) of θ in a node's saved state, without building the model; None if unreadable."""
    from safetensors import SafetensorError, safe_open

    path = node_dir / STATE_FILE
    try:
        with safe_open(str(path), "pt") as fh:
            window = int(json.loads(fh.metadata()["crucible.local"])["window"])
            h = hashlib.blake2b(digest_size=16)
            for key in sorted(k for k in fh.keys() if k.startswith("model.")):  # noqa: SIM118 - not a dict
                h.update(key[len("model."):].encode())
                h.update(fh.get_tensor(key).float().contiguous().numpy().tobytes())
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    return window, h.hexdigest()


def record_digest(bucket_dir: Path, window: int) -> str | None:
    """The θ digest (at the window's start) in a validator's aggregate record file, if it has one."""
    try:
        return json.loads((bucket_dir / aggregate_key(window)).read_text()).get("theta_digest")
    except (OSError, ValueError, AttributeError):
        return None


def final_digests(state: Path, honest: list[str], reference: str) -> FinalDigests:
    """Every honest node's final θ digest against the reference validator's for the same window."""
    ref = state_digest(state / "nodes" / reference)
    nodes = {}
    for name in honest:
        mine = state_digest(state / "nodes" / name)
        window, digest = mine if mine is not None else (None, None)
        expected = None
        if window is not None:
            expected = ref[1] if ref is not None and ref[0] == window else record_digest(state / "s3" / reference,
                                                                                        window)
        nodes[name] = NodeDigest(window=window, digest=digest, reference=expected,
                                 equal=None if expected is None or digest is None else digest == expected)
    if any(n.equal is False or n.digest is None for n in nodes.values()):
        all_equal: bool | None = False
    else:
        all_equal = True if all(n.equal for n in nodes.values()) else None
    by_window: dict[int, set[str]] = {}
    for n in nodes.values():
        if n.window is not None and n.digest is not None:
            by_window.setdefault(n.window, set()).add(n.digest)
    return FinalDigests(reference=reference, nodes=nodes, all_equal=all_equal,
                        same_window_agree=all(len(d) == 1 for d in by_window.values()))
