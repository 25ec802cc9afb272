"""Pure rules of the devnet chain: Yuma consensus, registration and replacement, weights, commitments, state I/O."""

from __future__ import annotations

import numpy as np
import pytest

from devnet.chain_epoch import produce_block, run_epoch
from devnet.chain_state import (
    ChainState,
    DispatchError,
    SubnetParams,
    add_stake,
    create_subnet,
    dispatch,
    fund,
    new_chain,
    register,
    set_commitment,
    set_weights,
    validate_call,
)
from devnet.chain_store import ChainStoreError, load_state, save_state
from devnet.chain_wire import RAO_PER_TAO, U16_MAX, block_hash, block_number_of, genesis_hash
from devnet.chain_yuma import weighted_quantile_columns, yuma

TAO = RAO_PER_TAO


def chain(n_validators: int = 1, n_miners: int = 3, **params) -> tuple[ChainState, list[str], list[str]]:
    """A chain with one subnet, validators staked 1000 TAO each (permits assigned), miners registered."""
    p = SubnetParams(**{"tempo": 10, "weights_rate_limit": 2, "immunity_period": 5, "validator_min_stake": 100 * TAO,
                        **params})
    st = new_chain("test", 0)
    create_subnet(st, 1, "owner-ck", "owner-hk", p)
    vals = [f"v{i}" for i in range(n_validators)]
    miners = [f"m{i}" for i in range(n_miners)]
    for hk in vals + miners:
        fund(st, f"{hk}-ck", 2000 * TAO)
        register(st, 1, f"{hk}-ck", hk)
    for hk in vals:
        add_stake(st, f"{hk}-ck", hk, 1, 1000 * TAO)
    run_epoch(st, 1)
    return st, vals, miners


def advance(st: ChainState, blocks: int) -> None:
    for _ in range(blocks):
        produce_block(st, st.timestamps[-1] + 200)


def fails(name: str, fn, *args, **kwargs) -> None:
    with pytest.raises(DispatchError) as err:
        fn(*args, **kwargs)
    assert err.value.name == name, err.value


# --- Yuma ---------------------------------------------------------------------------------------------


def run_yuma(stake, weights, permits=None, set_at=None, reg_at=None, kappa=0.5):
    n = len(stake)
    return yuma(np.array(stake, float), np.array(permits if permits is not None else [s > 0 for s in stake]),
                np.ones(n, bool), np.array(weights, float), np.array(set_at if set_at is not None else [10] * n),
                np.array(reg_at if reg_at is not None else [0] * n), kappa)


def test_weighted_quantile_is_stake_median():
    stake = np.array([0.5, 0.3, 0.2])
    w = np.array([[0.1], [0.9], [0.5]])
    # ≥ 0.5 of stake gives at least 0.5 (0.3 + 0.2), nobody reaching 0.9 holds half the stake.
    assert weighted_quantile_columns(stake, w, 0.5)[0] == pytest.approx(0.5)
    assert weighted_quantile_columns(stake, w, 0.9)[0] == pytest.approx(0.1)


def test_yuma_majority_clips_a_colluding_minority():
    # uids 0,1,2 validators (stake 0.4/0.4/0.2); 3 honest miner, 4 the colluder's own miner.
    w = np.zeros((5, 5))
    w[0, 3] = w[1, 3] = 1.0
    w[2, 4] = 1.0
    r = run_yuma([0.4, 0.4, 0.2, 0, 0], w)
    assert r.incentive[3] == pytest.approx(1.0) and r.incentive[4] == 0.0
    assert r.consensus[4] == 0.0
    assert r.dividends[0] == pytest.approx(0.5) and r.dividends[1] == pytest.approx(0.5) and r.dividends[2] == 0
    assert r.trust[3] == pytest.approx(1.0)


def test_yuma_split_weights_give_proportional_incentive():
    w = np.zeros((3, 3))
    w[0, 1:] = [3, 1]
    r = run_yuma([1.0, 0, 0], w)
    assert r.incentive[1:] == pytest.approx([0.75, 0.25])
    assert r.incentive.sum() == pytest.approx(1.0)


def test_yuma_masks_self_weight_and_outdated_weights():
    w = np.zeros((3, 3))
    w[0] = [1.0, 1.0, 1.0]
    # uid 2 registered at block 20, after validator 0 set weights at block 10: its weight is stale.
    r = run_yuma([1.0, 0, 0], w, set_at=[10, 0, 0], reg_at=[0, 0, 20])
    assert r.incentive.tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_yuma_without_permits_pays_nobody():
    w = np.zeros((2, 2))
    w[0, 1] = 1
    r = run_yuma([1.0, 0.0], w, permits=[False, False])
    assert r.incentive.sum() == 0 and r.dividends.sum() == 0


# --- epochs, emission, permits -------------------------------------------------------------------------


def test_epoch_turns_weights_into_incentive_and_stake():
    st, (v,), miners = chain()
    assert st.subnets[1].neurons[0].validator_permit and not st.subnets[1].neurons[1].validator_permit
    advance(st, 2)
    set_weights(st, v, 1, [1, 2, 3], [U16_MAX, U16_MAX // 2, 0], 0)
    before = [st.hotkey_stake(1, hk) for hk in miners]
    advance(st, 10)  # one tempo → exactly one epoch
    ns = st.subnets[1].neurons
    assert [round(n.incentive, 3) for n in ns[1:]] == [0.667, 0.333, 0.0]
    assert ns[0].dividends == pytest.approx(1.0)
    gained = [st.hotkey_stake(1, hk) - b for hk, b in zip(miners, before, strict=True)]
    assert gained[0] > gained[1] > gained[2] == 0
    assert sum(gained) + (st.hotkey_stake(1, v) - 1000 * TAO) == pytest.approx(10 * TAO, rel=1e-6)


def test_permits_go_to_top_stake_above_minimum():
    st, vals, miners = chain(n_validators=3, max_allowed_validators=2)
    add_stake(st, "v2-ck", "v2", 1, 500 * TAO)
    fund(st, "m0-ck", 0)
    add_stake(st, "m0-ck", "m0", 1, 50 * TAO)  # below validator_min_stake
    run_epoch(st, 1)
    permits = [n.validator_permit for n in st.subnets[1].neurons]
    assert permits == [True, False, True, False, False, False]  # v0 (1000, lower uid than v1) and v2 (1500)


# --- registration ----------------------------------------------------------------------------------------


def test_registration_burns_and_checks():
    st, _, _ = chain()
    assert st.accounts["m0-ck"].free == 2000 * TAO - TAO
    fails("HotKeyAlreadyRegisteredInSubNet", register, st, 1, "m0-ck", "m0")
    create_subnet(st, 2, "owner-ck", "owner-hk", SubnetParams())
    fund(st, "other-ck", 10 * TAO)
    fails("NonAssociatedColdKey", register, st, 2, "other-ck", "m0")  # m0 belongs to m0-ck
    fails("NotEnoughBalanceToStake", register, st, 1, "poor-ck", "new")
    fails("SubnetNotExists", register, st, 7, "m0-ck", "x")
    st.subnets[1].params.registration_allowed = False
    fails("SubNetRegistrationDisabled", register, st, 1, "m0-ck", "x")


def test_registrations_per_block_limit():
    st, _, _ = chain()
    st.subnets[1].params.max_registrations_per_block = 2
    advance(st, 1)
    fund(st, "ck", 100 * TAO)
    register(st, 1, "ck", "a")
    register(st, 1, "ck", "b")
    fails("TooManyRegistrationsThisBlock", register, st, 1, "ck", "c")
    advance(st, 1)
    assert register(st, 1, "ck", "c")[0] == 6


def test_full_subnet_replaces_lowest_emission_non_immune():
    st, (v,), miners = chain(max_allowed_uids=4, immunity_period=5)
    fund(st, "new-ck", 10 * TAO)
    fails("NoNeuronIdAvailable", register, st, 1, "new-ck", "new")  # everyone is still immune
    advance(st, 2)
    set_weights(st, v, 1, [1, 2], [U16_MAX, U16_MAX], 0)  # m2 (uid 3) gets nothing
    advance(st, 10)
    uid, events = register(st, 1, "new-ck", "new")
    assert uid == 3 and st.subnets[1].neurons[3].hotkey == "new"
    assert [e["event_id"] for e in events] == ["NeuronDeregistered", "NeuronRegistered"]
    assert events[0]["attributes"]["hotkey"] == "m2"
    assert st.subnets[1].uid_of("m2") is None and len(st.subnets[1].neurons) == 4
    # The fresh uid is immune now; the next lowest non-immune is picked (ties → older, then lower uid).
    fund(st, "n2-ck", 10 * TAO)
    uid2, _ = register(st, 1, "n2-ck", "n2")
    assert uid2 == 1  # m0 and m1 earned equally and registered together: the lower uid goes


# --- weights ---------------------------------------------------------------------------------------------


def test_set_weights_rules_in_chain_order():
    st, (v,), miners = chain(min_allowed_weights=2, max_weights_limit=U16_MAX // 2 + 1)
    fails("SettingWeightsTooFast", set_weights, st, v, 1, [1, 2], [1, 1], 0)  # registered this block
    advance(st, 2)
    fails("MechanismDoesNotExist", set_weights, st, v, 9, [1], [1], 0)
    fails("WeightVecNotEqualSize", set_weights, st, v, 1, [1, 2], [1], 0)
    fails("HotKeyNotRegisteredInSubNet", set_weights, st, "stranger", 1, [1, 2], [1, 1], 0)
    fails("DuplicateUids", set_weights, st, v, 1, [1, 1], [1, 1], 0)
    fails("UidVecContainInvalidOne", set_weights, st, v, 1, [1, 99], [1, 1], 0)
    fails("NeuronNoValidatorPermit", set_weights, st, "m0", 1, [2, 3], [1, 1], 0)
    fails("WeightVecLengthIsLow", set_weights, st, v, 1, [1], [1], 0)
    fails("MaxWeightExceeded", set_weights, st, v, 1, [1, 2], [U16_MAX, 1], 0)
    st.subnets[1].params.weights_version_key = 3
    fails("IncorrectWeightVersionKey", set_weights, st, v, 1, [1, 2], [1, 1], 2)
    assert set_weights(st, v, 1, [1, 2, 3], [10, 15, 20], 3)[0]["event_id"] == "WeightsSet"
    assert st.subnets[1].neurons[0].weights == [(1, 32768), (2, 49151), (3, U16_MAX)]  # max-upscaled
    fails("SettingWeightsTooFast", set_weights, st, v, 1, [1, 2], [1, 1], 3)
    # A self-weight needs no permit and no minimum count.
    assert set_weights(st, "m0", 1, [1], [5], 3)


def test_dispatch_routes_calls_and_rejects_unknown():
    st, (v,), _ = chain()
    advance(st, 2)
    params = {"netuid": 1, "mecid": 0, "dests": [1], "weights": [1], "version_key": 0}
    assert dispatch(st, v, "SubtensorModule", "set_mechanism_weights", params)[0]["event_id"] == "WeightsSet"
    with pytest.raises(LookupError):
        dispatch(st, v, "Balances", "transfer_allow_death", {})
    with pytest.raises(LookupError):
        validate_call(st, "SubtensorModule", "register_network", {"hotkey": v})
    with pytest.raises(ValueError):
        validate_call(st, "SubtensorModule", "set_mechanism_weights", {**params, "dests": ["x"]})
    with pytest.raises(ValueError):
        validate_call(st, "Commitments", "set_commitment", {"netuid": 1, "info": {"fields": [{"Raw3": "0x01"}]}})


# --- commitments -----------------------------------------------------------------------------------------


def info(*chunks: bytes) -> dict:
    return {"fields": [{f"Raw{len(c)}": "0x" + c.hex()} for c in chunks]}


def test_commitments_need_registration_and_respect_limits():
    st, _, _ = chain()
    fails("AccountNotAllowedCommit", set_commitment, st, "stranger", 1, info(b"x"))
    fails("TooManyFieldsInCommitmentInfo", set_commitment, st, "m0", 1, info(b"a", b"b", b"c", b"d"))
    set_commitment(st, "m0", 1, info(b"a" * 128, b"b" * 10))
    assert st.commitments[1]["m0"].fields == [{"Raw128": "0x" + "61" * 128}, {"Raw10": "0x" + "62" * 10}]
    # 3100 bytes per tempo, at least 100 per commitment: 138 used, 29 more fit, the 31st does not.
    for _ in range(29):
        set_commitment(st, "m0", 1, info(b"z"))
    fails("SpaceLimitExceeded", set_commitment, st, "m0", 1, info(b"z"))
    advance(st, 10)  # next tempo: quota resets
    set_commitment(st, "m0", 1, info(b"again"))
    assert st.commitments[1]["m0"].block == st.block


# --- state, store, wire ------------------------------------------------------------------------------------


def test_state_roundtrips_through_the_store(tmp_path):
    st, (v,), _ = chain()
    advance(st, 3)
    set_weights(st, v, 1, [1, 2], [3, 4], 0)
    set_commitment(st, "m1", 1, info(b"creds"))
    save_state(tmp_path, st)
    again = load_state(tmp_path)
    assert again == st
    assert again.timestamp_ms(2) == st.timestamp_ms(2) and again.hotkey_stake(1, v) == 1000 * TAO
    (tmp_path / "chain_state.json").write_text("{not json")
    with pytest.raises(ChainStoreError):
        load_state(tmp_path)
    with pytest.raises(ChainStoreError, match="devnet init"):
        load_state(tmp_path / "missing")


def test_timestamp_history_is_bounded():
    st = new_chain("t", 1000)
    st.params.timestamp_history = 16
    for i in range(40):
        produce_block(st, 2000 + i)
    assert len(st.timestamps) == 16 and st.timestamp_ms(40) == 2039 and st.timestamp_ms(3) is None


def test_block_hash_names_its_number_and_chain():
    g = genesis_hash("a")
    assert block_number_of(g, block_hash(g, 12345)) == 12345
    assert block_number_of(genesis_hash("b"), block_hash(g, 12345)) is None
    assert block_number_of(g, "0x1234") is None and block_number_of(g, "nonsense") is None
