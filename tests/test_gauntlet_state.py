"""The validator's scoring state: exact save/load, version check, resume, bounded history, explain."""

from __future__ import annotations

import json
import math

import pytest

from gauntlet.records import CopyVerdict, EvalResult, FilterResult, SyncResult
from gauntlet.state import (
    STATE_VERSION,
    ScoringState,
    StateConfig,
    StateError,
    explain,
    load_state,
    save_state,
)
from gauntlet.weights import score_window
from protocol.hparams import GauntletHParams, PeerHParams

HP = GauntletHParams()
PEERS = PeerHParams(primary=2, reserve=1)
HOTKEYS = {u: f"5Hotkey{u}" for u in range(4)}


def run_window(state: ScoringState, w: int, config: StateConfig | None = None):
    """uid 0 good, uid 1 worse, uid 2 late, uid 3 a copy of uid 0 with poor sync; uid 4 unknown."""

    def f(uid: int, **kw) -> FilterResult:
        base = dict(uid=uid, hotkey=HOTKEYS[uid], present=True, first_seen=100 + uid, timely=True)
        return FilterResult(**(base | kw))

    filters = {
        0: f(
            0,
            sync=SyncResult(steps_behind=0.2, sync=0.9, penalised=False),
            copy_verdict=CopyVerdict(overlap=0.017, copied_from=None, factor=1.0),
        ),
        1: f(1, sync=SyncResult(steps_behind=1.0, sync=0.57, penalised=False)),
        2: f(2, timely=False, first_seen=999),
        3: f(
            3,
            sync=SyncResult(steps_behind=math.inf, sync=0.0, penalised=True, reason="non-finite"),
            copy_verdict=CopyVerdict(overlap=0.99, copied_from=0, factor=0.0),
        ),
    }
    evals = {
        0: EvalResult(
            loss_before_assigned=4.0,
            loss_after_assigned=3.8 - 0.001 * w,
            loss_before_random=4.1,
            loss_after_random=4.0,
            step=0.2,
            reference_score=0.02,
            loss_after_assigned_reference=3.9,  # the memory control: margin ≈ +1.85
            reference_count=3,
        ),
        1: EvalResult(
            loss_before_assigned=4.0,
            loss_after_assigned=3.99,
            loss_before_random=4.1,
            loss_after_random=4.05,
            step=0.2,
            reference_score=0.02,
        ),
        3: EvalResult(
            loss_before_assigned=4.0,
            loss_after_assigned=math.inf,
            loss_before_random=4.1,
            loss_after_random=math.nan,
            step=0.2,
            reference_score=0.02,
        ),
    }
    state.record_step_change(0.001 * (w + 1), config or StateConfig())
    return score_window(state, w, HOTKEYS, filters, evals, HP, PEERS, config)


def test_save_load_round_trip_is_exact(tmp_path):
    state = ScoringState()
    for w in range(5):
        run_window(state, w)
    path = tmp_path / "state" / "scoring.json"
    save_state(state, path)
    loaded = load_state(path)
    assert loaded == state or loaded.model_dump_json() == state.model_dump_json()  # NaN != NaN in ==
    for uid, us in state.uids.items():
        assert loaded.uids[uid].mu == us.mu and loaded.uids[uid].sigma == us.sigma  # bit-exact floats
        assert loaded.uids[uid].binary_ma == us.binary_ma and loaded.uids[uid].score == us.score
    assert math.isinf(loaded.uids[3].history[-1].steps_behind)
    assert math.isnan(loaded.uids[3].history[-1].losses.loss_after_random)
    assert loaded.reference_change() == state.reference_change()
    assert [p.name for p in path.parent.iterdir()] == ["scoring.json"]  # no temporary files left


def test_restarted_validator_resumes_identically(tmp_path):
    a = ScoringState()
    for w in range(4):
        run_window(a, w)
    save_state(a, tmp_path / "s.json")
    b = load_state(tmp_path / "s.json")
    out_a, out_b = run_window(a, 4), run_window(b, 4)
    assert out_a == out_b
    assert a.model_dump_json() == b.model_dump_json()


def test_wrong_version_and_garbage_are_refused_clearly(tmp_path):
    path = tmp_path / "s.json"
    save_state(ScoringState(), path)
    raw = json.loads(path.read_text())
    raw["version"] = STATE_VERSION + 1
    path.write_text(json.dumps(raw))
    with pytest.raises(StateError, match="version"):
        load_state(path)
    path.write_text("{not json")
    with pytest.raises(StateError, match="cannot read"):
        load_state(path)
    path.write_text(json.dumps({"version": STATE_VERSION, "uids": {"0": {"hotkey": "x", "mu": 1.0}}}))
    with pytest.raises(StateError, match="sigma"):
        load_state(path)
    assert load_state(tmp_path / "absent.json") == ScoringState()


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "s.json"
    state = ScoringState()
    save_state(state, path)
    run_window(state, 0)
    save_state(state, path)
    assert load_state(path).last_window == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_history_is_bounded():
    config = StateConfig(history_windows=3, change_windows=2)
    state = ScoringState()
    for w in range(7):
        run_window(state, w, config)
    assert [e.window for e in state.uids[0].history] == [4, 5, 6]
    assert state.step_changes == pytest.approx([0.006, 0.007])


def test_explain_prints_every_component_and_why():
    state = ScoringState()
    for w in range(3):
        out = run_window(state, w)
    good = explain(state, 0, 2)
    for needle in (
        "window 2",
        "on time",
        "sync",
        "steps behind",
        "overlap",
        "assigned",
        "random",
        "indicator:  +1",
        "control:",
        "memory margin +1.8",
        "binary MA",
        "ordinal",
        "relative:",
        "value:",
        "why:",
        "raw score",
        "weight",
        "primary peer",
    ):
        assert needle in good, needle
    assert f"{out.weights[0]:.6f}" in good
    late = explain(state, 2, 2)
    assert "LATE" in late and "late shard" in late
    copier = explain(state, 3, 2)
    assert "copy of uid 0" in copier and "PENALISED" in copier and "indicator:  -1" in copier
    assert "no record for window 99" in explain(state, 0, 99)
    assert "no record" in explain(state, 42, 0)
