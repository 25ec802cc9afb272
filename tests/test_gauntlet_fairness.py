"""The devnet report's fairness numbers (devnet/fairness.py): spread, Gini, rank correlations."""

from __future__ import annotations

import pytest

from devnet.fairness import from_report, gini, kendall, spearman, summarize


def test_gini_equal_and_winner_takes_all():
    assert gini([1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.0)
    assert gini([0.0, 0.0, 0.0, 1.0]) == pytest.approx(0.75)  # n−1/n for one taker
    assert gini([]) is None and gini([0.0, 0.0]) is None


def test_rank_correlations_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # average ranks for ties
    assert spearman([1, 2], [1, 2]) is None and kendall([1, 1, 1], [1, 2, 3]) is None


def test_summary_of_a_winner_takes_all_run():
    # The run 2: four equal honest miners paid 0.00 / 0.17 / 0.75 / 0.07.
    kinds = {1: "honest", 2: "honest", 3: "honest", 4: "honest", 5: "noise"}
    pay = {1: 0.0, 2: 0.17, 3: 0.75, 4: 0.07, 5: 0.01}
    weights = {10: {1: 0.5, 2: 0.5}, 11: {3: 1.0}}
    s = summarize(pay, kinds, weights, contribution={1: 1.0, 2: 1.1, 3: 0.9, 4: 1.0, 5: -0.5})
    assert s.honest_pay_min_max == 0.0 and s.honest_pay_gini == pytest.approx(2.35 / 3.96)
    assert s.mean_weight == {1: 0.25, 2: 0.25, 3: 0.5, 4: 0.0, 5: 0.0}
    assert s.spearman_incentive is not None and s.kendall_incentive is not None
    report = {"per_uid": {str(u): {"incentive": pay[u], "kind": k} for u, k in kinds.items()},
              "weights_per_window": {"10": {"1": 0.5, "2": 0.5}, "11": {"3": 1.0}}}
    assert from_report(report).honest_pay_min_max == 0.0
