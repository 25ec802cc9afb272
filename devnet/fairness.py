"""Does pay track contribution? The devnet report's fairness numbers (issue 20, docs/incentives.md).

Pure functions over what the report already holds (final incentive and weights per window per uid)
and, when the launcher measured it, each uid's *contribution* (held-out loss change of its accepted
updates alone; larger = more useful):
* the honest pay spread: min/max of the honest miners' final incentive (1 = equal pay, 0 = one honest
  miner earns nothing) and the Gini coefficient over them (0 = equal);
* each uid's mean weight over the windows scored;
* Spearman and Kendall (tau-b) rank correlations between final incentive (and mean weight) and
  contribution, over the uids with a contribution.

`python -m devnet.fairness REPORT.json [CONTRIBUTION.json]` prints the summary of a stored report
(contribution file: {"uid": value}).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, Field


class FairnessSummary(BaseModel):
    honest_pay: dict[int, float] = Field(description="Final incentive per honest uid.")
    honest_pay_min_max: float | None = Field(
        description="min/max of the honest miners' final incentive (1 = equal pay); None without honest pay.")
    honest_pay_gini: float | None = Field(description="Gini coefficient of the honest miners' final incentive.")
    mean_weight: dict[int, float] = Field(description="Weight per uid averaged over the windows scored.")
    contribution: dict[int, float] = Field(
        default_factory=dict, description="Per uid: held-out loss decrease of its accepted updates alone, mean.")
    spearman_incentive: float | None = Field(None, description="Spearman(final incentive, contribution).")
    kendall_incentive: float | None = Field(None, description="Kendall tau-b(final incentive, contribution).")
    spearman_mean_weight: float | None = Field(None, description="Spearman(mean weight, contribution).")
    kendall_mean_weight: float | None = Field(None, description="Kendall tau-b(mean weight, contribution).")


def gini(values: Sequence[float]) -> float | None:
    """Gini coefficient of non-negative values (0 = all equal, → 1 = one takes all); None if empty/all 0."""
    xs = sorted(max(0.0, v) for v in values)
    total = sum(xs)
    if not xs or total <= 0:
        return None
    n = len(xs)
    return sum((2 * i - n + 1) * x for i, x in enumerate(xs)) / (n * total)


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None below 3 points or without variation."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def kendall(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Kendall tau-b; None below 3 points or without variation."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom > 0 else None


def summarize(
    incentive: Mapping[int, float | None],
    kinds: Mapping[int, str],
    weights_per_window: Mapping[int, Mapping[int, float]],
    contribution: Mapping[int, float] | None = None,
    honest: str = "honest",
) -> FairnessSummary:
    """The fairness numbers from final incentive per uid, kind per uid, weights per window, contribution."""
    honest_pay = {u: float(incentive.get(u) or 0.0) for u, k in sorted(kinds.items()) if k == honest}
    pays = list(honest_pay.values())
    mean_weight: dict[int, float] = {}
    windows = [w for w in weights_per_window.values() if w]
    for u in sorted(kinds):
        mean_weight[u] = statistics.fmean(float(w.get(u, 0.0)) for w in windows) if windows else 0.0
    out = FairnessSummary(
        honest_pay=honest_pay,
        honest_pay_min_max=(min(pays) / max(pays)) if pays and max(pays) > 0 else None,
        honest_pay_gini=gini(pays),
        mean_weight=mean_weight,
    )
    if contribution:
        uids = sorted(u for u in contribution if u in kinds and math.isfinite(contribution[u]))
        c = [contribution[u] for u in uids]
        inc = [float(incentive.get(u) or 0.0) for u in uids]
        mw = [mean_weight.get(u, 0.0) for u in uids]
        out.contribution = {u: contribution[u] for u in uids}
        out.spearman_incentive, out.kendall_incentive = spearman(inc, c), kendall(inc, c)
        out.spearman_mean_weight, out.kendall_mean_weight = spearman(mw, c), kendall(mw, c)
    return out


def from_report(report: Mapping, contribution: Mapping[int, float] | None = None) -> FairnessSummary:
    """The summary of a stored report.json (as loaded JSON)."""
    per_uid = {int(u): v for u, v in report["per_uid"].items()}
    weights = {int(w): {int(u): x for u, x in ws.items()} for w, ws in report.get("weights_per_window", {}).items()}
    return summarize({u: v.get("incentive") for u, v in per_uid.items()},
                     {u: v["kind"] for u, v in per_uid.items()}, weights, contribution)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m devnet.fairness REPORT.json [CONTRIBUTION.json]", file=sys.stderr)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    contribution = None
    if len(argv) > 1:
        contribution = {int(u): float(v) for u, v in json.loads(Path(argv[1]).read_text()).items()}
    print(from_report(report, contribution).model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
