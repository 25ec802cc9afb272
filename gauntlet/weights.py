"""Final scores, on-chain weights and the peer list: the last step of the Gauntlet each window.

final = max(0, value) × memory × sync, never negative (docs/incentives.md).
The VALUE is what a miner's evaluations say it adds: the moving average (rate value_alpha, started at
the first score) of its relative score (loss score / the window's reference loss score, clipped to
±value_clip), shrunk toward 0 while evidence is thin: value = average × n / (n + value_shrink_windows),
n = evaluations so far. An average honest update has value ≈ 1, a noise update ≈ 0; a miner twice as
useful as the average scores ≈ 2. The OpenSkill rating (μ, σ: `ratings.py`) is updated from the same
relative scores and shown by explain, but pay is proportional to the value, not to rank. MEMORY is
the protection against training on other data (a miner's assigned samples against a control on the
same samples, `EvalResult.indicator`): the binary moving average, bias-corrected for the number of
indicators seen, ramped linearly from 0 at memory_floor to 1 at memory_full (`memory_factor`).
Each factor is clamped BEFORE multiplying, so two negative factors can never make a positive score
(templar #45/#108), and slashes are multipliers in [0, 1] applied to positive scores only:
* a missing, late or rejected shard: the previous score × missing_penalty (it decays every window
  the miner is absent and becomes exactly 0 below score_zero_threshold, templar #592); a miner
  that passed stage 1 but was not picked for evaluation keeps a score recomputed from its value;
* more than sync_penalty_steps behind: × missing_penalty;
* a copy of an earlier uploader: × 0.5 or × 0 (`filters.copy_verdicts`).
A uid whose hotkey changed starts from a fresh state (rating, value, moving average, score, history:
templar #178), and uids that left the metagraph are forgotten. Non-finite inputs never reach the
state: a non-finite relative score counts as −value_clip, a non-finite factor as 0.

Weights: `power` mode raises positive scores to weight_power (default 1: pay in proportion to value)
and normalises; `gather_reserve` gives the primary peers gather_share and the reserve peers the rest
(within a group, in proportion to score^weight_power; a group with nobody in it passes its share to
the other). Scores are divided by the largest before the power, so no power can overflow. An optional
burn_share goes to burn_uid. When NOBODY has a positive score, nobody has earned anything and nobody
is paid: all weight goes to burn_uid if one is configured, else the weight vector is EMPTY and the
validator sets nothing this window (the chain keeps the validator's last weights, which were earned;
a uniform vector would pay idle uids for nothing). MinAllowedWeights padding (issue 16) belongs in
`chain_weights`, the one place a weight vector becomes the lists handed to set_weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from gauntlet.evaluate import binary_moving_average
from gauntlet.ratings import Rating, fresh_rating, rate_window
from gauntlet.records import EvalResult, FilterResult, UidState, WindowEntry, WindowEvals
from gauntlet.state import ScoringState, StateConfig
from protocol.hparams import GauntletHParams, PeerHParams


def final_score(value: float, memory: float, sync: float) -> float:
    """max(0, value) × memory × sync, memory and sync clamped to [0, 1]; 0 if any factor is not finite."""
    if not (math.isfinite(value) and math.isfinite(memory) and math.isfinite(sync)):
        return 0.0
    return max(0.0, value) * min(1.0, max(0.0, memory)) * min(1.0, max(0.0, sync))


def memory_factor(binary_ma: float, indicators: int, hp: GauntletHParams) -> float:
    """The memory protection (`EvalResult.indicator`: did the update remember its assigned samples?) as a factor in [0, 1].

    The binary MA starts at 0, so after n indicators it is (1 − (1 − α)^n) × the true average: dividing
    by that (bias correction, as Adam does) makes miners evaluated 5 and 10 times comparable. The
    corrected average of an honest miner is ≈ 0.9, of a freeloader or copier (its update helps its own
    assigned samples no more than the other miners' updates do) ≈ −0.5 (docs/incentives.md); the
    factor ramps linearly from 0 at memory_floor to 1 at memory_full. No indicator yet: 0.
    """
    if indicators <= 0 or not math.isfinite(binary_ma):
        return 0.0
    corrected = binary_ma / (1.0 - (1.0 - hp.binary_ma_alpha) ** indicators)
    return min(1.0, max(0.0, (corrected - hp.memory_floor) / (hp.memory_full - hp.memory_floor)))


def shrunk_value(average: float, evaluations: int, hp: GauntletHParams) -> float:
    """The value that pays: the average relative score × n / (n + value_shrink_windows)."""
    if evaluations <= 0 or not math.isfinite(average):
        return 0.0
    return average * evaluations / (evaluations + hp.value_shrink_windows)


def update_value(average: float, evaluations: int, relative: float, hp: GauntletHParams) -> float:
    """The moving average after one more relative score (clipped; −inf/NaN count as −value_clip)."""
    r = relative if math.isfinite(relative) else -hp.value_clip
    r = max(-hp.value_clip, min(hp.value_clip, r))
    if evaluations <= 0 or not math.isfinite(average):
        return r
    return (1.0 - hp.value_alpha) * average + hp.value_alpha * r


def slash(score: float, factor: float) -> float:
    """Multiply a positive score by a factor in [0, 1]; a non-positive score is returned unchanged."""
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"slash factor must be in [0, 1], got {factor}")
    return score * factor if score > 0 else score


def zero_small(score: float, hp: GauntletHParams) -> float:
    """Scores below score_zero_threshold (and any non-positive score) become exactly 0."""
    return score if score >= hp.score_zero_threshold and score > 0 else 0.0


def select_peers(scores: Mapping[int, float], peers: PeerHParams) -> tuple[list[int], list[int]]:
    """Top `primary` then next `reserve` uids by score; positive finite scores only; ties by lower uid."""
    ranked = sorted((u for u, s in scores.items() if math.isfinite(s) and s > 0), key=lambda u: (-scores[u], u))
    return ranked[: peers.primary], ranked[peers.primary : peers.primary + peers.reserve]


def _proportional(
    scores: Mapping[int, float], uids: list[int], share: float, power: float
) -> dict[int, float]:
    top = max((scores[u] for u in uids), default=0.0)
    if top <= 0:
        return {}
    mass = {u: (scores[u] / top) ** power for u in uids}  # in (0, 1]: no power overflows
    total = sum(mass.values())
    return {u: share * m / total for u, m in mass.items()} if total > 0 else {}


def compute_weights(
    scores: Mapping[int, float], uids: list[int], hp: GauntletHParams, peers: PeerHParams
) -> dict[int, float]:
    """Weight per uid (every uid in `uids`, plus burn_uid), summing to 1; EMPTY if nobody earned anything
    and there is no burn_uid (set nothing). See the module docstring."""
    out = dict.fromkeys(sorted(set(uids) | ({hp.burn_uid} if hp.burn_uid is not None else set())), 0.0)
    positive = {u: s for u, s in scores.items() if math.isfinite(s) and s > 0 and u in out}
    if not positive:
        if hp.burn_uid is not None:
            out[hp.burn_uid] = 1.0
            return out
        return {}
    if hp.weight_mode == "power":
        earned = _proportional(positive, sorted(positive), 1.0, hp.weight_power)
    else:
        primary, reserve = select_peers(positive, peers)
        share = hp.gather_share if reserve else 1.0
        earned = _proportional(positive, primary, share, hp.weight_power)
        earned |= _proportional(positive, reserve, 1.0 - share, hp.weight_power)
    keep = 1.0 - (hp.burn_share if hp.burn_uid is not None else 0.0)
    for u, w in earned.items():
        out[u] += keep * w
    if hp.burn_uid is not None:
        out[hp.burn_uid] += 1.0 - keep
    return out


def chain_weights(weights: Mapping[int, float]) -> tuple[list[int], list[float]]:
    """(uids ascending, weights) as `set_weights` takes them; empty lists mean: set nothing.

    Hook for the chain rules (issue 16): padding up to MinAllowedWeights with zero-weight uids goes here.
    """
    uids = sorted(weights)
    return uids, [weights[u] for u in uids]


@dataclass(frozen=True)
class WindowOutcome:
    """What the validator does with a scored window: set `weights`, publish the peer list."""

    window: int
    weights: dict[int, float]  # uid -> weight, sums to 1
    scores: dict[int, float]  # uid -> final score
    primary: list[int]  # peers chosen from this window's scores
    reserve: list[int]

    def as_lists(self) -> tuple[list[int], list[float]]:
        """(uids ascending, weights) as `set_weights` takes them; empty: nobody earned, set nothing."""
        return chain_weights(self.weights)


def _fresh(hotkey: str, hp: GauntletHParams) -> UidState:
    r = fresh_rating(hp)
    return UidState(hotkey=hotkey, mu=r.mu, sigma=r.sigma)


def _absence(e: WindowEntry) -> str:
    if not e.present:
        return "missing shard"
    return "late shard" if not e.timely else f"rejected shard ({e.reject_reason})"


def score_window(
    state: ScoringState,
    window: int,
    hotkeys: Mapping[int, str],
    filters: Mapping[int, FilterResult],
    evals: Mapping[int, EvalResult],
    hp: GauntletHParams,
    peers: PeerHParams,
    config: StateConfig | None = None,
) -> WindowOutcome:
    """Fold one window's stage-1 and stage-2 results into `state` (in place) and compute weights.

    `hotkeys` is the metagraph (uid → hotkey) at scoring time; `filters` has a record for every uid
    a shard was looked for (a uid without one counts as missing); `evals` the uids evaluated, each
    of which must have passed stage 1 (a `WindowEvals` also says why a chosen uid was not evaluated:
    written in its entry, not held against it).
    """
    config = config or StateConfig()
    for uid in [u for u in state.uids if u not in hotkeys]:
        del state.uids[uid]
    for uid, hk in hotkeys.items():
        if uid not in state.uids or state.uids[uid].hotkey != hk:
            state.uids[uid] = _fresh(hk, hp)
    for uid in evals:
        f = filters.get(uid)
        if uid not in hotkeys or f is None or not f.eligible or f.hotkey != hotkeys[uid]:
            raise ValueError(f"uid {uid} was evaluated but did not pass stage 1 with its current hotkey")

    relative = {u: r.relative_score for u, r in evals.items()}
    usable = {u: x for u, x in relative.items() if x is not None}
    if usable:  # scores relative to the window's reference; the reference player scores 1
        rated = rate_window({u: Rating(state.uids[u].mu, state.uids[u].sigma) for u in usable}, usable, hp, 1.0)
    else:  # no reference this window: rank raw loss scores among the evaluated miners, as before
        rated = rate_window(
            {u: Rating(state.uids[u].mu, state.uids[u].sigma) for u in evals},
            {u: r.loss_score for u, r in evals.items()},
            hp,
        )
    previous = {u: us.history[-1].weight for u, us in state.uids.items() if us.history}
    entries: dict[int, WindowEntry] = {}
    for uid in sorted(hotkeys):
        us, f, ev = state.uids[uid], filters.get(uid), evals.get(uid)
        rel = indicator = None
        if ev is not None:
            if uid in rated:
                us.mu, us.sigma = rated[uid].mu, rated[uid].sigma
            rel = relative.get(uid)
            if rel is not None:
                us.value_ema = update_value(us.value_ema, us.evaluations, rel, hp)
                us.evaluations += 1
            indicator = ev.indicator(hp.memory_margin)
            bma = binary_moving_average(us.binary_ma, indicator, hp.binary_ma_alpha)
            if math.isfinite(bma):
                us.binary_ma, us.indicators = bma, us.indicators + 1
            us.last_evaluated = window
        value = shrunk_value(us.value_ema, us.evaluations, hp)
        memory = memory_factor(us.binary_ma, us.indicators, hp)
        e = WindowEntry(
            window=window,
            hotkey=us.hotkey,
            mu=us.mu,
            sigma=us.sigma,
            binary_ma=us.binary_ma,
            indicator=indicator,
            evaluated=ev is not None,
            losses=ev,
            relative_score=rel if rel is None or math.isfinite(rel) else -hp.value_clip,
            value=value,
            memory=memory,
            evaluations=us.evaluations,
            previous_weight=previous.get(uid),
        )
        if ev is None and isinstance(evals, WindowEvals):
            e.not_evaluated = evals.not_evaluated.get(uid)
        if f is not None and f.hotkey == us.hotkey:
            e.present, e.timely = f.present, f.timely
            e.first_seen, e.reject_reason = f.first_seen, f.reject_reason
        if f is None or f.hotkey != us.hotkey or not f.eligible:
            why = _absence(e)
            score = slash(us.score, hp.missing_penalty)
            e.slashes.append(f"{why}: previous score {us.score:.6g} × {hp.missing_penalty:g}")
        else:
            sync = f.sync.sync if f.sync is not None else 1.0
            score = e.raw_score = final_score(value, memory, sync)
            if f.sync is not None:
                e.steps_behind, e.sync, e.sync_penalised = f.sync.steps_behind, f.sync.sync, f.sync.penalised
                e.sync_reason = f.sync.reason
                if f.sync.penalised:
                    score = slash(score, hp.missing_penalty)
                    e.slashes.append(
                        f"poor sync (> {hp.sync_penalty_steps:g} steps behind) × {hp.missing_penalty:g}"
                    )
            if f.copy_verdict is not None:
                c = f.copy_verdict
                e.copy_overlap, e.copied_from, e.copy_factor = c.overlap, c.copied_from, c.factor
                if c.factor < 1.0:
                    score = slash(score, c.factor)
                    e.slashes.append(
                        f"copy of uid {c.copied_from} (overlap {100 * c.overlap:.1f}%) × {c.factor:g}"
                    )
        us.score = e.score = zero_small(score if math.isfinite(score) else 0.0, hp)
        entries[uid] = e

    scores = {u: state.uids[u].score for u in sorted(hotkeys)}
    primary, reserve = select_peers(scores, peers)
    weights = compute_weights(scores, list(hotkeys), hp, peers)
    roles = {u: "primary" for u in primary} | {u: "reserve" for u in reserve}
    for uid, e in entries.items():
        e.weight, e.role = weights.get(uid, 0.0), roles.get(uid)
        us = state.uids[uid]
        us.history = (us.history + [e])[-config.history_windows :]
    state.last_window = window
    return WindowOutcome(window=window, weights=weights, scores=scores, primary=primary, reserve=reserve)
