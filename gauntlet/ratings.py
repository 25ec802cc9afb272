"""OpenSkill Plackett–Luce ratings of the miners, from the relative scores of each evaluated window.

A window's evaluation is one "match": the miners evaluated in it, plus a fixed REFERENCE player, are
ranked by relative score (loss score / the loss score of the window's reference update, the mean of
the eligible miners' clipped updates, so the reference scores exactly 1), best first. Scores closer
than `rating_tie_margin` to the best score of their group share a rank: the measured noise between
equal honest miners is of that size (docs/incentives.md), and ranking inside the noise would turn
coin flips into rating gaps. Non-finite scores come last. The reference player always has the fresh
rating (μ 25, σ 25/3) and its own update is discarded, so a miner evaluated ALONE in a window is still
rated: against what the average eligible update of that window achieved. Without a reference (none
computed, or not positive), a window with fewer than two evaluated miners leaves ratings unchanged.

Ratings are what `crucible explain` and the dashboard show about a miner's standing; the pay itself
comes from the value (`weights.py`), a shrunk moving average of the same relative scores, because
ranks throw away how much better a miner is. A non-finite rating coming out of the model is never
stored: the previous rating is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from openskill.models import PlackettLuce

from protocol.hparams import GauntletHParams

ORDINAL_Z = 3.0  # ordinal = μ − 3σ: the skill the miner has with ~99.7 % confidence


@dataclass(frozen=True)
class Rating:
    mu: float
    sigma: float

    @property
    def ordinal(self) -> float:
        return self.mu - ORDINAL_Z * self.sigma


def rating_model(hp: GauntletHParams) -> PlackettLuce:
    return PlackettLuce(beta=hp.openskill_beta, tau=hp.openskill_tau)


def fresh_rating(hp: GauntletHParams) -> Rating:
    """The rating of a uid never rated (or whose hotkey just changed)."""
    model = rating_model(hp)
    return Rating(model.mu, model.sigma)


def ranks_from_scores(scores: Mapping[int, float], margin: float = 0.0) -> dict[int, int]:
    """Competition ranks (1 = best) by descending score; NaN/−inf last.

    Scores within `margin` of the best score of their group share its rank (margin 0: equal scores).
    """

    def key(uid: int) -> float:
        s = scores[uid]
        return -s if math.isfinite(s) or s == math.inf else math.inf

    ordered = sorted(scores, key=lambda u: (key(u), u))
    ranks: dict[int, int] = {}
    leader: float | None = None
    for pos, uid in enumerate(ordered):
        k = key(uid)
        if leader is not None and (k == leader or (math.isfinite(k) and k - leader <= margin)):
            ranks[uid] = ranks[ordered[pos - 1]]
        else:
            leader, ranks[uid] = k, pos + 1
    return ranks


REFERENCE = -1  # the reference player's key in a match (never a uid)


def rate_window(
    ratings: Mapping[int, Rating],
    scores: Mapping[int, float],
    hp: GauntletHParams,
    reference: float | None = None,
) -> dict[int, Rating]:
    """New ratings of the uids in `scores` after this window's match (others are not returned).

    `ratings` must hold a rating for every uid in `scores` (use `fresh_rating` for new ones).
    `reference`: the reference player's score (1.0: `scores` are relative scores, and scores within
    rating_tie_margin tie), or None (raw loss scores, only equal scores tie).
    """
    uids = sorted(scores)
    missing = [u for u in uids if u not in ratings]
    if missing:
        raise KeyError(f"no rating for uids {missing}")
    use_ref = reference is not None and math.isfinite(reference) and bool(uids)
    if len(uids) + (1 if use_ref else 0) < 2:
        return {u: ratings[u] for u in uids}
    model = rating_model(hp)
    field = dict(scores) | ({REFERENCE: float(reference)} if use_ref else {})
    ranks = ranks_from_scores(field, hp.rating_tie_margin if use_ref else 0.0)  # margin is in relative units
    players = uids + ([REFERENCE] if use_ref else [])
    fresh = fresh_rating(hp)
    teams = [
        [model.rating(mu=(ratings[u] if u != REFERENCE else fresh).mu,
                      sigma=(ratings[u] if u != REFERENCE else fresh).sigma)]
        for u in players
    ]
    rated = model.rate(teams, ranks=[float(ranks[u]) for u in players])
    out: dict[int, Rating] = {}
    for u, team in zip(players, rated, strict=True):
        if u == REFERENCE:
            continue
        new = Rating(float(team[0].mu), float(team[0].sigma))
        ok = math.isfinite(new.mu) and math.isfinite(new.sigma) and new.sigma > 0
        out[u] = new if ok else ratings[u]
    return out
