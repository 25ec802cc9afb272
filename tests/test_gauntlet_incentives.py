"""Issue 20's bugs, with the exact small inputs that found them, and the rules that replace them.

* one evaluated miner per window for 30 windows: rated against the window's reference update, paid
  alone; the idle uids are never paid;
* a scores.json with μ = NaN: refused at load; non-finite evaluation results never reach the state;
* gauntlet.weight_power = 300: refused by the hparams; no power can overflow the weights;
* nobody earned anything: no fallback pays anybody (burn uid, else an empty vector: set nothing).
"""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from gauntlet.ratings import fresh_rating, ranks_from_scores, rate_window
from gauntlet.records import EvalResult, FilterResult, SyncResult, UidState
from gauntlet.state import ScoringState, StateError, explain, load_state, save_state
from gauntlet.weights import compute_weights, score_window
from protocol.hparams import GauntletHParams, HParams, PeerHParams

HP = GauntletHParams()
PEERS = PeerHParams(primary=2, reserve=1)


def ok(uid: int) -> FilterResult:
    return FilterResult(uid=uid, hotkey=f"hk{uid}", present=True, first_seen=1, timely=True,
                        sync=SyncResult(steps_behind=0.1, sync=1.0, penalised=False))


def ev(loss_score: float, reference: float | None, gap: float = 0.002) -> EvalResult:
    return EvalResult(loss_before_assigned=4.0, loss_after_assigned=4.0 * (1 - loss_score - gap),
                      loss_before_random=4.0, loss_after_random=4.0 * (1 - loss_score), step=0.2,
                      reference_score=reference)


# --- one evaluated miner --------------------------------------------------------------------------


def test_one_evaluated_miner_for_30_windows_is_rated_and_paid_alone():
    state = ScoringState()
    hotkeys = {0: "hk0", 1: "hk1", 2: "hk2"}  # uids 1 and 2 are idle: registered, never upload
    for w in range(30):
        # Its update is the only eligible one, so the reference (mean of eligible updates) is itself.
        out = score_window(state, w, hotkeys, {0: ok(0)}, {0: ev(0.01, 0.01)}, HP, PEERS)
    fresh = fresh_rating(HP)
    us = state.uids[0]
    assert us.sigma < fresh.sigma  # rated every window (against the reference player), not "no match"
    assert us.evaluations == 30 and us.value_ema == pytest.approx(1.0)
    assert out.scores[0] > 0 and out.scores[1] == out.scores[2] == 0.0
    assert out.weights == {0: 1.0, 1: 0.0, 2: 0.0}  # the idle uids get nothing


def test_lone_miner_below_the_reference_loses_rating():
    r = {0: fresh_rating(HP)}
    for _ in range(10):
        r = rate_window(r, {0: 0.0}, HP, reference=1.0)  # a noise update scores 0 against the average 1
    assert r[0].mu < fresh_rating(HP).mu


def test_scores_within_the_tie_margin_share_a_rank():
    ranks = ranks_from_scores({1: 1.02, 2: 0.95, 3: 0.5, 4: math.nan}, margin=0.1)
    assert ranks == {1: 1, 2: 1, 3: 3, 4: 4}
    same = rate_window({1: fresh_rating(HP), 2: fresh_rating(HP)}, {1: 1.02, 2: 0.95}, HP, reference=1.0)
    assert same[1] == same[2]  # equal honest miners inside the noise: equal ratings, not a coin flip


def test_nobody_earned_nothing_is_paid():
    state = ScoringState()
    hotkeys = {0: "hk0", 1: "hk1", 2: "hk2"}
    out = score_window(state, 0, hotkeys, {0: ok(0)}, {0: ev(-0.001, 0.01)}, HP, PEERS)  # worse than nothing
    assert out.weights == {} and out.as_lists() == ([], [])  # set nothing: the chain keeps the last weights
    burn = HP.model_copy(update={"burn_uid": 2})
    assert compute_weights({0: 0.0, 1: 0.0}, [0, 1, 2], burn, PEERS) == {0: 0.0, 1: 0.0, 2: 1.0}


# --- non-finite values ------------------------------------------------------------------------------


def _state_file(tmp_path, mu: float) -> str:
    state = ScoringState(uids={u: UidState(hotkey=f"hk{u}", mu=25.0, sigma=3.0, binary_ma=0.5, score=1.0,
                                           value_ema=1.0, evaluations=5) for u in range(4)})
    path = tmp_path / "scores.json"
    save_state(state, path)
    raw = json.loads(path.read_text())
    raw["uids"]["1"]["mu"] = mu
    path.write_text(json.dumps(raw))  # json.dumps writes NaN as the bare constant, as a broken file would
    return path


def test_state_with_nan_mu_is_refused_at_load(tmp_path):
    path = _state_file(tmp_path, math.nan)
    assert "NaN" in path.read_text()
    with pytest.raises(StateError, match=r"uids\.1\.mu"):
        load_state(path)
    with pytest.raises(StateError):
        load_state(_state_file(tmp_path, math.inf))


def test_non_finite_evaluations_never_reach_the_state(tmp_path):
    state = ScoringState(uids={u: UidState(hotkey=f"hk{u}", mu=25.0, sigma=3.0, binary_ma=0.5, score=1.0,
                                           value_ema=1.0, evaluations=5) for u in range(4)})
    hotkeys = {u: f"hk{u}" for u in range(4)}
    nan = EvalResult(loss_before_assigned=4.0, loss_after_assigned=math.nan, loss_before_random=4.0,
                     loss_after_random=math.nan, step=0.2, reference_score=0.01)
    evals = {0: nan, 1: ev(0.01, 0.01), 2: ev(0.01, math.nan), 3: ev(0.012, 0.01)}
    out = score_window(state, 0, hotkeys, {u: ok(u) for u in range(4)}, evals, HP, PEERS)
    for us in state.uids.values():
        for x in (us.mu, us.sigma, us.binary_ma, us.score, us.value_ema):
            assert math.isfinite(x)
    assert all(math.isfinite(w) for w in out.weights.values()) and sum(out.weights.values()) == pytest.approx(1)
    assert out.weights[3] > out.weights[1] > 0 and out.weights[0] < out.weights[1]
    save_state(state, tmp_path / "s.json")
    assert load_state(tmp_path / "s.json").uids[0].mu == state.uids[0].mu  # it loads again (NaN losses are facts, kept)
    assert "relative" in explain(state, 0, 0)
    with pytest.raises(ValidationError):
        UidState(hotkey="x", mu=math.nan, sigma=1.0)


# --- overflow -----------------------------------------------------------------------------------------


def test_weight_power_300_is_refused():
    with pytest.raises(ValidationError, match="weight_power"):
        HParams.model_validate({"gauntlet": {"weight_power": 300}})
    with pytest.raises(ValidationError):
        GauntletHParams(weight_power=300)


def test_no_power_overflows_the_weights():
    hp = GauntletHParams(weight_power=8)
    w = compute_weights({0: 1e300, 1: 5e299, 2: 1e-300}, [0, 1, 2], hp, PEERS)
    assert w[0] == pytest.approx(1 / (1 + 0.5**8)) and sum(w.values()) == pytest.approx(1.0)
    huge = GauntletHParams.model_construct(**(HP.model_dump() | {"weight_power": 300.0}))  # bypassing checks
    w = compute_weights({0: 40.0, 1: 39.0}, [0, 1], huge, PEERS)
    assert w[0] > w[1] > 0 and sum(w.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("field", ["openskill_beta", "openskill_tau", "sync_exponent", "eval_step_scale",
                                   "value_clip", "value_shrink_windows", "score_zero_threshold"])
def test_overflowing_hparams_are_bounded(field):
    with pytest.raises(ValidationError, match=field):
        GauntletHParams(**{field: 1e300})


# --- memory factor (assigned-vs-random) -------------------------------------------------------------


def test_memory_factor_is_bias_corrected_and_zero_for_a_coin_flip():
    from gauntlet.evaluate import binary_moving_average
    from gauntlet.weights import memory_factor

    def bma(indicators: list[int]) -> float:
        m = 0.0
        for i in indicators:
            m = binary_moving_average(m, i, HP.binary_ma_alpha)
        return m

    honest5, honest10 = [1] * 5, [1] * 10
    assert memory_factor(bma(honest5), 5, HP) == memory_factor(bma(honest10), 10, HP) == 1.0  # no ramp
    assert memory_factor(bma([1, -1] * 5), 10, HP) == 0.0  # a freeloader's or copier's coin flip
    assert memory_factor(0.0, 0, HP) == 0.0  # no evidence yet
    mostly = [1, 1, 1, -1] * 3  # an honest miner with a quarter of noisy indicators: partly paid
    assert 0.0 < memory_factor(bma(mostly), 12, HP) < 1.0
    with pytest.raises(ValidationError):
        GauntletHParams(memory_floor=0.7, memory_full=0.3)
