"""OpenSkill Plackett–Luce ratings of the miners, from the loss scores of each evaluated window.

A window's evaluation is one "match": the miners evaluated in it are ranked by loss score (best
first, equal scores share a rank, non-finite scores last) and their ratings updated with the
`openskill` Plackett–Luce model (beta and tau from hparams; μ and σ start at the package defaults
25 and 25/3, so a fresh rating has ordinal μ − 3σ = 0 and earns nothing until it has won matches).
Ratings smooth the noisy per-window loss signal: one lucky window moves μ a little and σ shrinks
only as evidence accumulates. A window with fewer than two evaluated miners is not a match and
leaves ratings unchanged. Whose rating is whose (a new hotkey on a uid starts fresh) is decided by
the caller (`weights.score_window` resets the uid's state when its hotkey changes).
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


def ranks_from_scores(scores: Mapping[int, float]) -> dict[int, int]:
    """Competition ranks (1 = best) by descending score; equal scores share a rank; NaN/−inf last."""

    def key(uid: int) -> float:
        s = scores[uid]
        return -s if math.isfinite(s) or s == math.inf else math.inf

    ordered = sorted(scores, key=lambda u: (key(u), u))
    ranks: dict[int, int] = {}
    for pos, uid in enumerate(ordered):
        prev = ordered[pos - 1] if pos else None
        ranks[uid] = ranks[prev] if prev is not None and key(prev) == key(uid) else pos + 1
    return ranks


def rate_window(
    ratings: Mapping[int, Rating], loss_scores: Mapping[int, float], hp: GauntletHParams
) -> dict[int, Rating]:
    """New ratings of the uids in `loss_scores` after this window's match (others are not returned).

    `ratings` must hold a rating for every uid in `loss_scores` (use `fresh_rating` for new ones).
    """
    uids = sorted(loss_scores)
    missing = [u for u in uids if u not in ratings]
    if missing:
        raise KeyError(f"no rating for uids {missing}")
    if len(uids) < 2:
        return {u: ratings[u] for u in uids}
    model = rating_model(hp)
    ranks = ranks_from_scores(loss_scores)
    teams = [[model.rating(mu=ratings[u].mu, sigma=ratings[u].sigma)] for u in uids]
    rated = model.rate(teams, ranks=[float(ranks[u]) for u in uids])
    return {u: Rating(team[0].mu, team[0].sigma) for u, team in zip(uids, rated, strict=True)}
