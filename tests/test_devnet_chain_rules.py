"""Subnet weight rules (issue 16): the devnet chain refuses what subtensor refuses, with the same error
names, through the real SDK; and the validator's weights (neurons/chain_weights.py) pass under each
non-default setting."""

from __future__ import annotations

import asyncio

import bittensor as bt
import pytest

from devnet.bootstrap import BootstrapConfig, subnet_params_for
from devnet.chain_epoch import run_epoch
from devnet.chain_state import (
    REAL_CHAIN_DEFAULTS,
    DispatchError,
    SubnetParams,
    add_stake,
    create_subnet,
    fund,
    new_chain,
    parse_subnet_params,
    register,
    set_weights,
)
from devnet.chain_validators import weight_spread
from devnet.chain_wire import RAO_PER_TAO, U16_MAX
from neurons.chain_weights import conform_weights
from protocol.hparams import load_hparams
from transport.chain import ChainCallFailed, WeightRules, u16_weights

# --- the chain's rules, pure ------------------------------------------------------------------------------


def small_chain(n: int = 6, validators: int = 1, **params) -> tuple:
    state = new_chain("rules", 0)
    create_subnet(state, 1, "owner-ck", "owner-hk", SubnetParams(**{"tempo": 10, "weights_rate_limit": 0,
                                                                    "immunity_period": 0, **params}))
    for i in range(n):
        fund(state, f"ck{i}", 20_000 * RAO_PER_TAO)
        register(state, 1, f"ck{i}", f"hk{i}", burned=False)
    for i in range(validators):
        add_stake(state, f"ck{i}", f"hk{i}", 1, (validators - i) * 2000 * RAO_PER_TAO)
    run_epoch(state, 1)
    return state


def refused(fn, *args) -> str:
    with pytest.raises(DispatchError) as exc:
        fn(*args)
    return exc.value.name


def test_each_rule_refuses_with_the_pallet_error_name():
    s = small_chain(min_allowed_weights=4, weights_version_key=3, max_weights_limit=U16_MAX // 2)
    assert refused(set_weights, s, "hk0", 1, [1, 2, 3, 4], [9, 9, 9, 9], 2) == "IncorrectWeightVersionKey"
    assert refused(set_weights, s, "hk0", 1, [1, 2], [9, 9], 3) == "WeightVecLengthIsLow"
    assert refused(set_weights, s, "hk0", 1, [1, 2, 3, 4], [90, 1, 1, 1], 3) == "MaxWeightExceeded"
    assert refused(set_weights, s, "hk1", 1, [0, 2, 3, 4], [9, 9, 9, 9], 3) == "NeuronNoValidatorPermit"
    set_weights(s, "hk0", 1, [1, 2, 3, 4], [9, 9, 9, 9], 4)  # a newer key is accepted, like subtensor
    set_weights(s, "hk1", 1, [1], [5], 3)  # a lone self-weight is exempt from permit and minimum
    s.subnets[1].params.weights_rate_limit = 5
    assert refused(set_weights, s, "hk0", 1, [1, 2, 3, 4], [9, 9, 9, 9], 3) == "SettingWeightsTooFast"


def test_min_allowed_weights_is_capped_at_the_subnet_size():
    s = small_chain(n=3, min_allowed_weights=1024)  # the real default on a small subnet
    set_weights(s, "hk0", 1, [0, 1, 2], [1, 1, 1], 0)


def test_immunity_period_and_max_allowed_validators():
    s = small_chain(n=4, validators=3, max_allowed_uids=4, immunity_period=50, max_allowed_validators=2)
    assert [n.validator_permit for n in s.subnets[1].neurons] == [True, True, False, False]
    fund(s, "ck9", 10 * RAO_PER_TAO)
    assert refused(register, s, 1, "ck9", "hk9") == "NoNeuronIdAvailable"  # every uid still immune
    s.block += 50
    uid, _ = register(s, 1, "ck9", "hk9")
    assert s.subnets[1].neurons[uid].hotkey == "hk9"


def test_subnet_params_take_real_spellings():
    assert parse_subnet_params(["MinAllowedWeights=8", "weights_version=3", "WeightsSetRateLimit=100",
                                "ImmunityPeriod=7", "max_weights_limit=1000", "MaxAllowedValidators=2"]) == {
        "min_allowed_weights": "8", "weights_version_key": "3", "weights_rate_limit": "100",
        "immunity_period": "7", "max_weights_limit": "1000", "max_allowed_validators": "2"}
    with pytest.raises(ValueError, match="unknown subnet hyperparameter"):
        parse_subnet_params(["Bogus=1"])
    with pytest.raises(ValueError):
        parse_subnet_params(["MinAllowedWeights=-1"])
    hp = load_hparams("tiny")
    assert subnet_params_for(hp, **parse_subnet_params(["MinAllowedWeights=8"])).min_allowed_weights == 8
    assert REAL_CHAIN_DEFAULTS["min_allowed_weights"] == ("MinAllowedWeights", 1024)


# --- the validator's weights, pure -----------------------------------------------------------------------


def test_min_allowed_weights_pads_with_self_then_one_u16_step():
    fit = conform_weights({3: 0.7, 5: 0.3}, WeightRules(n=10, min_allowed_weights=8), own_uid=0)
    assert len(fit.uids) == 8 and fit.fillers[0] == 0 and 3 not in fit.fillers and 5 not in fit.fillers
    uids, values = u16_weights(fit.uids, fit.weights)
    stored = dict(zip(uids, values, strict=True))
    assert stored[3] == U16_MAX and stored[5] == round(U16_MAX * 3 / 7)
    assert all(stored[u] == 1 for u in fit.fillers)  # the smallest step the chain can store
    assert len(uids) == 8


def test_max_weights_limit_water_fills_then_parks_the_rest_on_self():
    rules = WeightRules(n=10, max_weights_limit=U16_MAX // 4)  # 25 %
    fit = conform_weights({1: 0.9, 2: 0.05, 3: 0.05}, rules, own_uid=0)
    shares = dict(zip(fit.uids, fit.weights, strict=True))
    assert max(shares.values()) <= 0.25 and shares[1] == pytest.approx(shares[2])
    assert fit.fillers[0] == 0 and sum(shares.values()) == pytest.approx(1.0)
    uids, values = u16_weights(fit.uids, fit.weights)
    assert max(values) * U16_MAX <= rules.max_weights_limit * sum(values)  # what the chain checks


@pytest.mark.parametrize("limit", [0, 1, U16_MAX // 4 - 1])
def test_a_limit_no_vector_can_meet_leaves_only_a_self_weight(limit):
    """MaxWeightsLimit · n < 65535: every vector of n uids exceeds the limit, only a lone self-weight passes."""
    rules = WeightRules(n=4, min_allowed_weights=4, max_weights_limit=limit)
    fit = conform_weights({1: 0.5, 2: 0.5}, rules, own_uid=0)
    assert (fit.uids, fit.weights) == ([0], [1.0])
    assert conform_weights({1: 0.5, 2: 0.5}, rules, own_uid=None).uids == []
    s = small_chain(n=4, min_allowed_weights=4, max_weights_limit=limit)
    assert refused(set_weights, s, "hk0", 1, [0, 1, 2, 3], [9, 9, 9, 9], 0) == "MaxWeightExceeded"
    set_weights(s, "hk0", 1, fit.uids, u16_weights(fit.uids, fit.weights)[1], 0)  # the chain accepts it


def test_changed_hotkeys_get_nothing():
    fit = conform_weights({1: 0.5, 2: 0.5}, WeightRules(n=4, min_allowed_weights=1), own_uid=0, changed=[2])
    assert fit.uids == [1] and fit.dropped == [2]
    assert conform_weights({2: 1.0}, WeightRules(n=4), own_uid=0, changed=[2]).uids == []


def test_weight_spread():
    assert weight_spread({"a": {1: 0.5, 2: 0.5}, "b": {1: 0.5, 2: 0.5}}) == 0
    assert weight_spread({"a": {1: 1.0}, "b": {2: 1.0}, "c": {}}) == pytest.approx(2.0)
    assert weight_spread({"a": {1: 1.0}}) is None


# --- through the real SDK against the devnet chain process ----------------------------------------------


async def _until(fn, ok, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    value = await fn()
    while not ok(value) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        value = await fn()
    return value


async def test_rules_through_the_sdk_and_the_validator_path(chain_factory):
    subnet = SubnetParams(tempo=5, weights_rate_limit=20, immunity_period=20, max_allowed_uids=16,
                          min_allowed_weights=8, weights_version_key=3, max_weights_limit=U16_MAX // 2)
    proc = chain_factory(BootstrapConfig(miners=9, validators=1, subnet=subnet))
    async with proc.chain("validator-0") as v:
        graph = await v.metagraph()
        me = graph.uid_of(v.hotkey)
        rules = await v.weight_rules()
        assert rules == WeightRules(n=10, min_allowed_weights=8, max_weights_limit=U16_MAX // 2, version_key=3)
        await _until(v.block, lambda b: b - graph.last_update[me] >= 20)
        miners = [u for u in range(graph.n) if u != me]

        async def raw(dests, weights, key):  # past the SDK's preflight: the chain itself decides
            call = bt.calls.SubtensorModule.set_mechanism_weights(netuid=1, mecid=0, dests=dests, weights=weights,
                                                                  version_key=key)
            result = await v.client.submit_call(call, v.wallet, signer="hotkey")
            return result.error.name if not result.success else "ok"

        assert await raw(miners[:8], [U16_MAX] * 8, 0) == "IncorrectWeightVersionKey"
        assert await raw(miners[:2], [U16_MAX] * 2, 3) == "WeightVecLengthIsLow"
        assert await raw(miners[:8], [U16_MAX] + [1] * 7, 3) == "MaxWeightExceeded"
        with pytest.raises(ChainCallFailed) as sdk_refusal:  # the SDK's own preflight, named like the chain
            await v.set_weights(miners[:2], [0.7, 0.3], version_key=3)
        assert sdk_refusal.value.name == "WeightVecLengthIsLow"
        with pytest.raises(ChainCallFailed) as old_key:
            await v.set_weights(miners[:8], [1.0] * 8, version_key=0)
        assert old_key.value.name == "IncorrectWeightVersionKey"

        # Two scorers under MinAllowedWeights 8, version key 3 and a 50 % cap: what the validator sends passes.
        fit = conform_weights({miners[0]: 0.9, miners[1]: 0.1}, rules, own_uid=me)
        assert (await v.set_weights(fit.uids, fit.weights, version_key=3)).success
        stored = dict(await v.client.query(("SubtensorModule", "Weights"), [1, me]))
        # both earners at the 50 % cap; the own uid takes the sliver the cap leaves (Yuma masks it), fillers 1 step
        assert len(stored) == 8 and stored[miners[0]] == stored[miners[1]] == U16_MAX and 0 < stored[me] < 1000
        assert all(stored[u] == 1 for u in fit.fillers if u != me)
        with pytest.raises(ChainCallFailed) as too_fast:  # weights_rate_limit 20
            await v.set_weights(fit.uids, fit.weights, version_key=3)
        assert too_fast.value.name == "SettingWeightsTooFast"
        assert await raw(fit.uids, [stored[u] for u in fit.uids], 3) == "SettingWeightsTooFast"


def test_devnet_run_flags():
    from devnet.launch_plan import DEVNET_FLAGS, DevnetConfig

    cfg = DevnetConfig(validators=3, validator_stakes=[6000, 3000, 1000], subnet_params=["MinAllowedWeights=8"],
                       kill=["validator-0@8"])
    argv = DEVNET_FLAGS.argv(cfg)
    assert {"--subnet-param=MinAllowedWeights=8", "--validator-stake=6000.0", "--kill=validator-0@8"} <= set(argv)
    with pytest.raises(ValueError, match="unknown subnet hyperparameter"):
        DevnetConfig(subnet_params=["Bogus=1"])
    with pytest.raises(ValueError, match="NAME@WINDOW"):
        DevnetConfig(kill=["validator-0"])
    with pytest.raises(ValueError, match="no node named 'validator-1'"):  # it would have killed nothing
        DevnetConfig(kill=["validator-1@8"])
    with pytest.raises(ValueError, match="validator-2 would stake 10 TAO, below the subnet's validator_min_stake of "
                                         "1000 TAO"):  # it used to start and restart forever: "no validator permit"
        DevnetConfig(validators=3, validator_stakes=[6000, 3000, 10])
    DevnetConfig(validators=3, validator_stakes=[6000, 3000, 10], subnet_params=["validator_min_stake=0"])


def test_genesis_stakes_per_validator(tmp_path):
    from devnet.bootstrap import init_devnet
    from devnet.chain_store import load_state

    cfg = BootstrapConfig(miners=1, validators=3, validator_stakes_tao=[6000, 3000, 1000],
                          subnet=SubnetParams(max_allowed_validators=2))
    manifest = init_devnet(tmp_path, cfg)
    state = load_state(tmp_path)
    stakes = [state.hotkey_stake(1, w.hotkey_ss58) // RAO_PER_TAO for w in manifest.validators]
    assert stakes == [6000, 3000, 1000]
    permits = {n.hotkey: n.validator_permit for n in state.subnets[1].neurons}
    assert [permits[w.hotkey_ss58] for w in manifest.validators] == [True, True, False]  # MaxAllowedValidators 2
