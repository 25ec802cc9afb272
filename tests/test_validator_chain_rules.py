"""Validator.set_weights under the subnet's rules (issue 16): MinAllowedWeights, version key, rate limit,
a uid that changed hands — with a recording stand-in for the chain (the devnet path is in
tests/test_devnet_chain_rules.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from neurons.validator import Validator, ValidatorReport, VersionKeyMismatch
from protocol.hparams import load_hparams
from transport.chain import ChainCallFailed, WeightRules


class FakeChain:
    def __init__(self, hotkeys: list[str], rules: WeightRules, refusals: list[ChainCallFailed] | None = None):
        self.hotkeys, self.rules, self.refusals = list(hotkeys), rules, list(refusals or [])
        self.hotkey = hotkeys[0]
        self.calls: list[tuple[list[int], list[float], int]] = []
        self.head = 52  # inside window 5 (tiny: 10 blocks per window)

    async def metagraph(self):
        hotkeys = tuple(self.hotkeys)
        return SimpleNamespace(n=len(hotkeys), hotkeys=hotkeys, uid_of=lambda hk: hotkeys.index(hk))

    async def weight_rules(self) -> WeightRules:
        return self.rules

    async def block(self) -> int:
        return self.head

    async def set_weights(self, uids, weights, version_key=0):
        self.calls.append((list(uids), list(weights), version_key))
        if self.refusals:
            raise self.refusals.pop(0)
        return SimpleNamespace(success=True)


def validator(chain: FakeChain, version_key: int = 0) -> Validator:
    v = Validator.__new__(Validator)
    v.hp = load_hparams("tiny", [f"subnet.weights_version_key={version_key}"])

    async def wait_for_block(block):
        chain.head = block

    v.node = SimpleNamespace(chain=chain, netuid=1, wait_for_block=wait_for_block)
    return v


HOTKEYS = [f"hk{i}" for i in range(10)]  # uid 0 is the validator
SCORED = {u: hk for u, hk in enumerate(HOTKEYS) if u}


async def test_min_allowed_weights_8_with_2_scorers_and_version_key_3():
    chain = FakeChain(HOTKEYS, WeightRules(n=10, min_allowed_weights=8, version_key=3))
    v = validator(chain, version_key=3)
    await v.check_version_key()
    report = ValidatorReport(5)
    assert await v.set_weights(5, [3, 7], [0.8, 0.2], report, scored_hotkeys=SCORED)
    (uids, weights, key), = chain.calls
    assert key == 3 and len(uids) == 8 and 0 in uids  # own uid first among the fillers (Yuma masks it)
    shares = dict(zip(uids, weights, strict=True))
    assert shares[3] == 0.8 and shares[7] == 0.2
    assert all(shares[u] == pytest.approx(0.8 / 65535) for u in uids if u not in (3, 7))


async def test_version_key_mismatch_is_one_clear_line():
    v = validator(FakeChain(HOTKEYS, WeightRules(n=10, version_key=3)), version_key=0)
    with pytest.raises(VersionKeyMismatch) as exc:
        await v.check_version_key()
    assert "version key 3" in str(exc.value) and "subnet.weights_version_key=3" in str(exc.value)
    assert "\n" not in str(exc.value)


async def test_uid_that_changed_hands_gets_nothing():
    chain = FakeChain(HOTKEYS, WeightRules(n=10))
    chain.hotkeys[7] = "newcomer"  # uid 7 re-registered between scoring and setting weights
    v = validator(chain)
    assert await v.set_weights(5, [3, 7], [0.5, 0.5], ValidatorReport(5), scored_hotkeys=SCORED)
    (uids, weights, _), = chain.calls
    assert uids == [3] and weights == [1.0]


async def test_rate_limit_is_retried_other_refusals_are_not():
    limited = ChainCallFailed("set_weights refused: rate limit", "SettingWeightsTooFast", "rate_limited")
    chain = FakeChain(HOTKEYS, WeightRules(n=10), refusals=[limited])
    assert await validator(chain).set_weights(5, [3], [1.0], ValidatorReport(5), scored_hotkeys=SCORED)
    assert len(chain.calls) == 2 and chain.head > 52  # waited some blocks, then succeeded

    wrong_key = ChainCallFailed("set_weights failed", "IncorrectWeightVersionKey", "invalid_argument")
    chain = FakeChain(HOTKEYS, WeightRules(n=10), refusals=[wrong_key])
    report = ValidatorReport(5)
    assert not await validator(chain).set_weights(5, [3], [1.0], report, scored_hotkeys=SCORED)
    assert len(chain.calls) == 1 and "IncorrectWeightVersionKey" in report.note
    assert report.note.endswith(". ")  # the window's later notes (record, step) do not run into it

    report = ValidatorReport(5)
    report.note = "earlier. "
    assert not await validator(FakeChain(HOTKEYS, WeightRules(n=10))).set_weights(5, [], [], report)
    assert report.note == "earlier. set_weights skipped: nobody earned weight. "
