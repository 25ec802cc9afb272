"""Which miners stage 2 evaluates: unpredictable without the secret, yet fair when the budget is small."""

from __future__ import annotations

import hashlib

from neurons.scoring import STALENESS_CAP, evaluation_order

UIDS = list(range(1, 9))


def _seed(window: int) -> bytes:
    return hashlib.blake2b(f"window {window}".encode(), digest_size=32).digest()


def _counts(budget: int, windows: int, use_staleness: bool) -> dict[int, int]:
    last: dict[int, int | None] = dict.fromkeys(UIDS)
    counts = dict.fromkeys(UIDS, 0)
    for w in range(windows):
        staleness = {u: STALENESS_CAP if last[u] is None else w - last[u] for u in UIDS} if use_staleness else None
        for uid in evaluation_order(UIDS, budget, _seed(w), b"secret", staleness):
            counts[uid] += 1
            last[uid] = w
    return counts


def test_order_is_seeded_by_window_and_secret():
    a = evaluation_order(UIDS, 8, _seed(1), b"secret-a")
    assert a == evaluation_order(UIDS, 8, _seed(1), b"secret-a") and sorted(a) == UIDS
    others = {tuple(evaluation_order(UIDS, 8, _seed(1), s)) for s in (b"secret-b", b"secret-c", b"secret-d")}
    others |= {tuple(evaluation_order(UIDS, 8, _seed(w), b"secret-a")) for w in (2, 3, 4)}
    assert len(others - {tuple(a)}) >= 5  # a miner cannot tell its turn without the secret and the seed
    assert evaluation_order(UIDS, 3, _seed(1), b"secret-a") == a[:3]
    assert evaluation_order([], 3, _seed(1), b"x") == []


def test_staleness_spreads_a_small_budget_evenly():
    fair, plain = _counts(2, 40, True), _counts(2, 40, False)
    assert sum(fair.values()) == sum(plain.values()) == 80
    assert max(fair.values()) - min(fair.values()) < max(plain.values()) - min(plain.values())
    assert min(fair.values()) >= 7, fair  # 10 each on average; nobody is starved


def test_a_never_evaluated_miner_is_drawn_first_most_of_the_time():
    staleness = dict.fromkeys(UIDS, 1) | {5: STALENESS_CAP}
    firsts = [evaluation_order(UIDS, 1, _seed(w), b"s", staleness)[0] for w in range(200)]
    assert firsts.count(5) > 200 * 0.9  # p = 400 / 407
