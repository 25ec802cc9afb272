"""Final scores, on-chain weights and the peer list: the last step of the Gauntlet each window.

final = max(0, ordinal) × max(0, binary moving average) × sync, never negative. Each factor is
clamped BEFORE multiplying, so two negative factors can never make a positive score (templar
#45/#108), and slashes are multipliers in [0, 1] applied to positive scores only:
* a missing, late or rejected shard: the previous score × missing_penalty (it decays every window
  the miner is absent and becomes exactly 0 below score_zero_threshold, templar #592); a miner
  that passed stage 1 but was not picked for evaluation keeps a score recomputed from its rating;
* more than sync_penalty_steps behind: × missing_penalty;
* a copy of an earlier uploader: × 0.5 or × 0 (`filters.copy_verdicts`).
A uid whose hotkey changed starts from a fresh state (rating, moving average, score, history:
templar #178), and uids that left the metagraph are forgotten.

Weights: `power` mode raises positive scores to weight_power and normalises; `gather_reserve`
gives the primary peers gather_share and the reserve peers the rest (within a group, in proportion
to score^weight_power; a group with nobody in it passes its share to the other). An optional
burn_share goes to burn_uid. When no uid has a positive score, all weight goes to burn_uid if one
is configured, else it is spread uniformly over the metagraph: nobody has earned anything, and a
uniform vector favours nobody while still being a valid weight vector to set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gauntlet.evaluate import binary_moving_average
from gauntlet.ratings import Rating, fresh_rating, rate_window
from gauntlet.records import EvalResult, FilterResult, UidState, WindowEntry
from gauntlet.state import ScoringState, StateConfig
from protocol.hparams import GauntletHParams, PeerHParams


def final_score(ordinal: float, binary_ma: float, sync: float) -> float:
    """max(0, ordinal) × max(0, binary MA) × sync, with sync clamped to [0, 1]."""
    return max(0.0, ordinal) * max(0.0, binary_ma) * min(1.0, max(0.0, sync))


def slash(score: float, factor: float) -> float:
    """Multiply a positive score by a factor in [0, 1]; a non-positive score is returned unchanged."""
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"slash factor must be in [0, 1], got {factor}")
    return score * factor if score > 0 else score


def zero_small(score: float, hp: GauntletHParams) -> float:
    """Scores below score_zero_threshold (and any non-positive score) become exactly 0."""
    return score if score >= hp.score_zero_threshold and score > 0 else 0.0


def select_peers(scores: Mapping[int, float], peers: PeerHParams) -> tuple[list[int], list[int]]:
    """Top `primary` then next `reserve` uids by score; positive scores only; ties by lower uid."""
    ranked = sorted((u for u, s in scores.items() if s > 0), key=lambda u: (-scores[u], u))
    return ranked[: peers.primary], ranked[peers.primary : peers.primary + peers.reserve]


def _proportional(
    scores: Mapping[int, float], uids: list[int], share: float, power: float
) -> dict[int, float]:
    mass = {u: scores[u] ** power for u in uids}
    total = sum(mass.values())
    return {u: share * m / total for u, m in mass.items()} if total > 0 else {}


def compute_weights(
    scores: Mapping[int, float], uids: list[int], hp: GauntletHParams, peers: PeerHParams
) -> dict[int, float]:
    """Weight per uid (every uid in `uids`, plus burn_uid), summing to 1. See the module docstring."""
    out = dict.fromkeys(sorted(set(uids) | ({hp.burn_uid} if hp.burn_uid is not None else set())), 0.0)
    positive = {u: s for u, s in scores.items() if s > 0 and u in out}
    if not positive:
        if hp.burn_uid is not None:
            out[hp.burn_uid] = 1.0
        elif out:
            out = dict.fromkeys(out, 1.0 / len(out))
        return out
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


@dataclass(frozen=True)
class WindowOutcome:
    """What the validator does with a scored window: set `weights`, publish the peer list."""

    window: int
    weights: dict[int, float]  # uid -> weight, sums to 1
    scores: dict[int, float]  # uid -> final score
    primary: list[int]  # peers chosen from this window's scores
    reserve: list[int]

    def as_lists(self) -> tuple[list[int], list[float]]:
        """(uids ascending, weights) as `set_weights` takes them."""
        uids = sorted(self.weights)
        return uids, [self.weights[u] for u in uids]


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
    of which must have passed stage 1.
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

    rated = rate_window(
        {u: Rating(state.uids[u].mu, state.uids[u].sigma) for u in evals},
        {u: r.loss_score for u, r in evals.items()},
        hp,
    )
    entries: dict[int, WindowEntry] = {}
    for uid in sorted(hotkeys):
        us, f, ev = state.uids[uid], filters.get(uid), evals.get(uid)
        if ev is not None:
            us.mu, us.sigma = rated[uid].mu, rated[uid].sigma
            us.binary_ma = binary_moving_average(us.binary_ma, ev.indicator, hp.binary_ma_alpha)
            us.last_evaluated = window
        e = WindowEntry(
            window=window,
            hotkey=us.hotkey,
            mu=us.mu,
            sigma=us.sigma,
            binary_ma=us.binary_ma,
            evaluated=ev is not None,
            losses=ev,
        )
        if f is not None and f.hotkey == us.hotkey:
            e.present, e.timely = f.present, f.timely
            e.first_seen, e.reject_reason = f.first_seen, f.reject_reason
        if f is None or f.hotkey != us.hotkey or not f.eligible:
            why = _absence(e)
            score = slash(us.score, hp.missing_penalty)
            e.slashes.append(f"{why}: previous score {us.score:.6g} × {hp.missing_penalty:g}")
        else:
            sync = f.sync.sync if f.sync is not None else 1.0
            score = e.raw_score = final_score(us.ordinal, us.binary_ma, sync)
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
        us.score = e.score = zero_small(score, hp)
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
