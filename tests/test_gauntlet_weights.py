"""Ratings, final scores, slashes, decay, weights and peers — one rule per test.

Includes the anchor's known failures: a negative score never becomes a positive weight after a
slash (templar #45/#108), a uid's new owner does not inherit the rating (#178), and decayed scores
reach exactly zero (#592).
"""

from __future__ import annotations

import math

import pytest

from gauntlet.ratings import Rating, fresh_rating, ranks_from_scores, rate_window
from gauntlet.records import CopyVerdict, EvalResult, FilterResult, SyncResult, UidState
from gauntlet.state import ScoringState
from gauntlet.weights import (
    compute_weights,
    final_score,
    score_window,
    select_peers,
    shrunk_value,
    slash,
    zero_small,
)
from protocol.hparams import GauntletHParams, PeerHParams

HP = GauntletHParams()
PEERS = PeerHParams(primary=2, reserve=1)


def ok(uid: int, hotkey: str | None = None, *, sync: float = 1.0, steps: float = 0.0, **kw) -> FilterResult:
    s = SyncResult(steps_behind=steps, sync=sync, penalised=steps > HP.sync_penalty_steps)
    return FilterResult(
        uid=uid, hotkey=hotkey or f"hk{uid}", present=True, first_seen=10, timely=True, sync=s, **kw
    )


def evaluation(loss_score: float, assigned_better: bool = True, reference: float | None = 0.02) -> EvalResult:
    after_random = 4.0 * (1 - loss_score)
    rel_assigned = loss_score + (0.01 if assigned_better else -0.01)
    return EvalResult(
        loss_before_assigned=4.0,
        loss_after_assigned=4.0 * (1 - rel_assigned),
        loss_before_random=4.0,
        loss_after_random=after_random,
        step=0.2,
        reference_score=reference,
    )


def strong_state(uids: list[int], score: float = 0.0) -> ScoringState:
    """A state where each uid already has a good rating, value and a positive binary average."""
    return ScoringState(
        uids={
            u: UidState(hotkey=f"hk{u}", mu=40.0 + u, sigma=2.0, binary_ma=0.9, score=score,
                        value_ema=1.0 + u, evaluations=8, indicators=40)  # memory factor 1
            for u in uids
        }
    )


def value_of(state: ScoringState, uid: int) -> float:
    return shrunk_value(state.uids[uid].value_ema, state.uids[uid].evaluations, HP)


# --- ratings -----------------------------------------------------------------------------------


def test_fresh_rating_has_zero_ordinal():
    r = fresh_rating(HP)
    assert r.mu == 25.0 and r.sigma == pytest.approx(25 / 3) and r.ordinal == pytest.approx(0.0)


def test_ranks_ties_and_non_finite_last():
    ranks = ranks_from_scores({1: 0.1, 2: 0.3, 3: 0.1, 4: -math.inf, 5: math.nan, 6: 0.2})
    assert ranks == {2: 1, 6: 2, 1: 3, 3: 3, 4: 5, 5: 5}


def test_rating_rewards_better_loss_score():
    base = {u: fresh_rating(HP) for u in range(3)}
    new = rate_window(base, {0: 0.03, 1: 0.01, 2: -0.02}, HP)
    assert new[0].mu > base[0].mu > new[2].mu
    assert new[0].ordinal > new[1].ordinal > new[2].ordinal
    assert all(new[u].sigma < base[u].sigma + HP.openskill_tau for u in range(3))
    # One evaluated miner is no match: unchanged.
    assert rate_window(base, {1: 0.5}, HP) == {1: base[1]}
    with pytest.raises(KeyError):
        rate_window({0: base[0]}, {0: 0.1, 9: 0.2}, HP)


# --- final score and slashes -------------------------------------------------------------------


def test_final_score_never_negative_even_with_two_negative_factors():
    # templar #45/#108: negative ordinal × negative moving average must not become positive.
    assert final_score(-3.0, -0.4, 1.0) == 0.0
    assert final_score(5.0, -0.4, 1.0) == 0.0
    assert final_score(-5.0, 0.4, 1.0) == 0.0
    assert final_score(5.0, 0.4, 0.5) == pytest.approx(1.0)


def test_slash_never_flips_a_negative():
    assert slash(-2.0, 0.75) == -2.0
    assert slash(-2.0, 0.0) == -2.0
    assert slash(2.0, 0.5) == 1.0
    with pytest.raises(ValueError):
        slash(-2.0, -1.0)  # a negative factor would flip signs: refused
    with pytest.raises(ValueError):
        slash(2.0, 1.5)


def test_negative_components_give_zero_weight_after_slashes():
    state = ScoringState(
        uids={
            0: UidState(hotkey="hk0", mu=5.0, sigma=4.0, binary_ma=-0.6, value_ema=-0.5, evaluations=3),
            1: UidState(hotkey="hk1", mu=40.0, sigma=2.0, binary_ma=0.5, value_ema=1.0, evaluations=3,
                        indicators=3),
        }
    )
    filters = {0: ok(0, steps=4.0, sync=0.05), 1: ok(1)}  # uid 0 is also penalised for poor sync
    out = score_window(state, 1, {0: "hk0", 1: "hk1"}, filters, {}, HP, PEERS)
    assert out.scores[0] == 0.0 and out.weights[0] == 0.0
    assert out.weights[1] == pytest.approx(1.0)
    assert all(w >= 0 for w in out.weights.values())


# --- score_window rules ------------------------------------------------------------------------


def test_new_owner_of_a_uid_does_not_inherit_the_rating():
    state = strong_state([0, 1], score=3.0)
    hotkeys = {0: "hk0", 1: "new-owner"}
    out = score_window(state, 5, hotkeys, {0: ok(0), 1: ok(1, "new-owner")}, {}, HP, PEERS)
    fresh = fresh_rating(HP)
    assert (state.uids[1].mu, state.uids[1].sigma) == (fresh.mu, fresh.sigma)
    assert state.uids[1].hotkey == "new-owner" and state.uids[1].binary_ma == 0.0
    assert [e.hotkey for e in state.uids[1].history] == ["new-owner"]
    assert out.scores[1] == 0.0 and out.scores[0] > 0
    assert state.uids[0].mu == 40.0  # the unchanged owner keeps its rating


def test_decayed_score_reaches_exactly_zero():
    state = strong_state([0, 1], score=1.0)
    hotkeys = {0: "hk0", 1: "hk1"}
    expected_windows = math.ceil(math.log(HP.score_zero_threshold) / math.log(HP.missing_penalty))
    history = []
    for w in range(60):
        out = score_window(state, w, hotkeys, {1: ok(1)}, {}, HP, PEERS)  # uid 0 uploads nothing
        history.append(out.scores[0])
    assert all(a > b or a == b == 0.0 for a, b in zip(history, history[1:], strict=False))
    first_zero = history.index(0.0)
    assert history[first_zero - 1] >= HP.score_zero_threshold
    assert first_zero + 1 == expected_windows  # 0.75^k < 1e-4 first at k = 33
    assert history[-1] == 0.0 and out.weights[0] == 0.0


@pytest.mark.parametrize("kind", ["missing", "late", "rejected"])
def test_missing_late_or_rejected_shard_is_penalised(kind):
    state = strong_state([0, 1], score=2.0)
    bad = {
        "missing": {},
        "late": {0: FilterResult(uid=0, hotkey="hk0", present=True, first_seen=99, timely=False)},
        "rejected": {
            0: FilterResult(
                uid=0, hotkey="hk0", present=True, first_seen=9, timely=True, reject_reason="bad_signature"
            )
        },
    }[kind]
    out = score_window(state, 3, {0: "hk0", 1: "hk1"}, {**bad, 1: ok(1)}, {}, HP, PEERS)
    assert out.scores[0] == pytest.approx(2.0 * HP.missing_penalty)
    entry = state.uids[0].history[-1]
    assert any(kind in s for s in entry.slashes)
    assert out.scores[1] == pytest.approx(final_score(value_of(state, 1), 1.0, 1.0))


def test_poor_sync_is_penalised_and_sync_scales_score():
    state = strong_state([0, 1, 2])
    hotkeys = {u: f"hk{u}" for u in range(3)}
    filters = {0: ok(0), 1: ok(1, sync=0.5, steps=1.2), 2: ok(2, sync=0.05, steps=3.5)}
    out = score_window(state, 0, hotkeys, filters, {}, HP, PEERS)
    raw = [final_score(value_of(state, u), 1.0, s) for u, s in [(0, 1.0), (1, 0.5), (2, 0.05)]]
    assert out.scores[0] == pytest.approx(raw[0])
    assert out.scores[1] == pytest.approx(raw[1])
    assert out.scores[2] == pytest.approx(raw[2] * HP.missing_penalty)


def test_copier_is_punished_and_original_is_not():
    state = strong_state([0, 1, 2])
    hotkeys = {u: f"hk{u}" for u in range(3)}
    filters = {
        0: ok(0, copy_verdict=CopyVerdict(overlap=0.016, copied_from=None, factor=1.0)),
        1: ok(1, copy_verdict=CopyVerdict(overlap=0.98, copied_from=0, factor=0.0)),
        2: ok(2, copy_verdict=CopyVerdict(overlap=0.45, copied_from=0, factor=0.5)),
    }
    evals = {0: evaluation(0.02), 1: evaluation(0.02), 2: evaluation(0.02)}
    out = score_window(state, 0, hotkeys, filters, evals, HP, PEERS)
    assert out.scores[0] > 0 and out.scores[1] == 0.0
    assert out.scores[2] == pytest.approx(state.uids[2].history[-1].raw_score * 0.5)
    assert out.weights[1] == 0.0 and 1 not in out.primary + out.reserve


def test_evaluation_updates_rating_and_binary_average():
    state = ScoringState()
    hotkeys = {u: f"hk{u}" for u in range(3)}
    filters = {u: ok(u) for u in range(3)}
    for w in range(40):
        evals = {0: evaluation(0.03), 1: evaluation(0.01, assigned_better=False), 2: evaluation(-0.02)}
        out = score_window(state, w, hotkeys, filters, evals, HP, PEERS)
    s = state.uids
    assert s[0].ordinal > s[1].ordinal > s[2].ordinal
    assert s[0].binary_ma == pytest.approx(1 - (1 - HP.binary_ma_alpha) ** 40)
    assert s[1].binary_ma == pytest.approx(-(1 - (1 - HP.binary_ma_alpha) ** 40))
    assert out.scores[0] > 0 and out.scores[1] == 0.0 and out.scores[2] == 0.0
    assert out.primary == [0] and out.weights[0] == pytest.approx(1.0)
    uids, weights = out.as_lists()
    assert uids == [0, 1, 2] and sum(weights) == pytest.approx(1.0)


def test_evaluated_uid_must_have_passed_stage_one():
    state = ScoringState()
    late = FilterResult(uid=0, hotkey="hk0", present=True, first_seen=99, timely=False)
    with pytest.raises(ValueError):
        score_window(state, 0, {0: "hk0"}, {0: late}, {0: evaluation(0.1)}, HP, PEERS)


def test_uids_leaving_the_metagraph_are_forgotten():
    state = strong_state([0, 1, 2], score=1.0)
    score_window(state, 0, {0: "hk0", 2: "hk2"}, {}, {}, HP, PEERS)
    assert set(state.uids) == {0, 2}


# --- weights and peers -------------------------------------------------------------------------


def test_power_weights():
    w = compute_weights({0: 1.0, 1: 2.0, 2: 0.0, 3: -1.0}, [0, 1, 2, 3], HP, PEERS)
    assert w == pytest.approx({0: 1 / 3, 1: 2 / 3, 2: 0.0, 3: 0.0})  # power 1: in proportion
    w2 = compute_weights({0: 1.0, 1: 2.0}, [0, 1], HP.model_copy(update={"weight_power": 2.0}), PEERS)
    assert w2 == pytest.approx({0: 0.2, 1: 0.8})
    assert sum(w.values()) == pytest.approx(1.0)


def test_gather_reserve_split():
    hp = HP.model_copy(update={"weight_mode": "gather_reserve", "weight_power": 1.0})
    scores = {0: 4.0, 1: 4.0, 2: 1.0, 3: 0.5, 4: 0.0}
    w = compute_weights(scores, list(scores), hp, PEERS)  # primary 2, reserve 1
    assert w[0] == pytest.approx(0.375) and w[1] == pytest.approx(0.375)
    assert w[2] == pytest.approx(0.25) and w[3] == 0.0 and w[4] == 0.0
    # Nobody in reserve: the primaries take everything.
    w2 = compute_weights({0: 1.0, 1: 3.0}, [0, 1], hp, PEERS)
    assert w2 == pytest.approx({0: 0.25, 1: 0.75})


def test_burn_share_and_all_zero_fallbacks():
    hp = HP.model_copy(update={"burn_uid": 9, "burn_share": 0.3})
    w = compute_weights({0: 1.0, 1: 1.0}, [0, 1], hp, PEERS)
    assert w == pytest.approx({0: 0.35, 1: 0.35, 9: 0.3})
    assert compute_weights({0: 0.0, 1: -1.0}, [0, 1], hp, PEERS) == {0: 0.0, 1: 0.0, 9: 1.0}
    # Nobody earned anything and no burn uid: nobody is paid, the validator sets nothing.
    assert compute_weights({0: 0.0, 1: 0.0}, [0, 1, 2, 3], HP, PEERS) == {}


def test_peer_selection_positive_only_with_uid_tie_break():
    scores = {5: 1.0, 2: 1.0, 7: 3.0, 1: 0.0, 3: -2.0, 4: 0.5}
    primary, reserve = select_peers(scores, PeerHParams(primary=2, reserve=2))
    assert primary == [7, 2] and reserve == [5, 4]
    assert select_peers({1: 0.0}, PEERS) == ([], [])


def test_zero_small():
    assert zero_small(HP.score_zero_threshold / 2, HP) == 0.0
    assert zero_small(HP.score_zero_threshold, HP) == HP.score_zero_threshold
    assert zero_small(-1.0, HP) == 0.0


def test_rating_record_ordinal():
    assert Rating(30.0, 2.0).ordinal == 24.0
