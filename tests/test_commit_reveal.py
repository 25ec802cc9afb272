"""Commit-reveal of weights on the devnet chain (issue 16): the commit checks and error names of subtensor's
`commit_timelocked_mechanism_weights`, the reveal of a commit encrypted with the real timelock library and
decrypted with a real recorded drand quicknet pulse (round 1000, from subtensor's own drand tests), Yuma
seeing the revealed weights, and the validator's SetWeights path committing through the real SDK."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import bittensor as bt
import bittensor_core
import pytest

from devnet.bootstrap import BootstrapConfig
from devnet.chain_commit_reveal import (
    decode_payload,
    decrypt_commit,
    encode_payload,
    feed_pulses,
    pending_commits,
)
from devnet.chain_epoch import produce_block
from devnet.chain_pulses import RecordedPulses
from devnet.chain_state import (
    DispatchError,
    SubnetParams,
    add_stake,
    create_subnet,
    dispatch,
    fund,
    new_chain,
    register,
)
from devnet.chain_validators import read_validators
from devnet.chain_wire import RAO_PER_TAO
from devnet.scoreboard import Participant
from neurons.validator import Validator, ValidatorReport
from protocol.hparams import load_hparams
from transport.chain import ChainCallFailed

PULSES = Path(__file__).parent / "assets" / "drand" / "quicknet_pulses.json"
ROUND = 1000
KEYS = [bytes([i + 1]) * 32 for i in range(6)]  # public keys; uid 0 is the validator
HOTKEYS = [bittensor_core.ss58_encode(k, 42) for k in KEYS]


def cr_chain(**params):
    state = new_chain("commit-reveal", 0)
    create_subnet(state, 1, "owner-ck", "owner-hk", SubnetParams(**{
        "tempo": 5, "weights_rate_limit": 0, "immunity_period": 0, "commit_reveal_enabled": True, **params}))
    for i, hk in enumerate(HOTKEYS):
        fund(state, f"ck{i}", 20_000 * RAO_PER_TAO)
        register(state, 1, f"ck{i}", hk, burned=False)
    add_stake(state, "ck0", HOTKEYS[0], 1, 2000 * RAO_PER_TAO)
    for _ in range(6):  # one epoch: permits; weights must be newer than the targets' registration
        produce_block(state, 0)
    return state


def sealed(uids, values, version_key=0, signer=0, round_=ROUND) -> str:
    """What the SDK submits as `commit`, for a past round: the SCALE payload, timelock-encrypted by the real
    library (`encrypt_at_round`), unwrapped from the SDK's envelope to the bare ciphertext."""
    envelope, _ = bittensor_core.encrypt_at_round(encode_payload(KEYS[signer], uids, values, version_key), round_)
    return "0x" + bittensor_core.inner_ciphertext(envelope).hex()


def commit(state, commit_hex, signer=0, round_=ROUND, version=4, netuid=1):
    return dispatch(state, HOTKEYS[signer], "SubtensorModule", "commit_timelocked_mechanism_weights",
                    {"netuid": netuid, "mecid": 0, "commit": commit_hex, "reveal_round": round_,
                     "commit_reveal_version": version})


def refused(fn, *args, **kw) -> str:
    with pytest.raises(DispatchError) as exc:
        fn(*args, **kw)
    return exc.value.name


def run_blocks(state, n, pulses=None):
    events = []
    for _ in range(n):
        if pulses is not None:
            feed_pulses(state, pulses.signature)
        events += produce_block(state, 0)
    return [e["event_id"] for e in events]


def test_commit_refusals_carry_subtensors_error_names():
    s = cr_chain(weights_rate_limit=3, weights_min_stake=10 * RAO_PER_TAO)
    c = sealed([1, 2], [65535, 100])
    off = cr_chain(commit_reveal_enabled=False)
    assert refused(commit, off, c) == "CommitRevealDisabled"
    assert refused(commit, s, c, version=3) == "IncorrectCommitRevealVersion"
    assert refused(commit, s, c, netuid=7) == "MechanismDoesNotExist"
    assert refused(commit, s, c, signer=1) == "NotEnoughStakeToSetWeights"  # StakeThreshold, checked first
    plain = {"netuid": 1, "mecid": 0, "dests": [1, 2], "weights": [65535, 100], "version_key": 0}
    assert refused(dispatch, s, HOTKEYS[0], "SubtensorModule", "set_mechanism_weights", plain) == "CommitRevealEnabled"
    assert commit(s, c)[0]["event_id"] == "TimelockedWeightsCommitted"
    assert refused(commit, s, c) == "CommittingWeightsTooFast"  # the commit set LastUpdate
    run_blocks(s, 3)
    commit(s, c)
    s.last_stored_round = ROUND + 1  # the drand pallet already holds a later pulse: round 1000 is public
    assert refused(commit, s, c) == "InvalidRevealRound"
    unstaked = cr_chain()
    fund(unstaked, "ck9", RAO_PER_TAO)
    assert refused(dispatch, unstaked, "5" + "x" * 47, "SubtensorModule", "commit_timelocked_mechanism_weights",
                   {"netuid": 1, "mecid": 0, "commit": c, "reveal_round": ROUND,
                    "commit_reveal_version": 4}) == "HotKeyNotRegisteredInSubNet"


def test_at_most_ten_unrevealed_commits_per_epoch():
    s = cr_chain()
    c = sealed([1], [65535])
    for _ in range(10):
        commit(s, c)
    assert refused(commit, s, c) == "TooManyUnrevealedCommits"
    assert pending_commits(s, 1) == {HOTKEYS[0]: 10}


def test_real_pulse_decrypts_real_ciphertext_and_nothing_else():
    doc = json.loads(PULSES.read_text())
    good, bad = doc["pulses"][0]["signature"], doc["invalid_pulses"][0]["signature"]
    payload = encode_payload(KEYS[0], [1, 2, 3], [65535, 30000, 10000], 7)
    ciphertext = bytes.fromhex(sealed([1, 2, 3], [65535, 30000, 10000], 7)[2:])
    assert decrypt_commit(ciphertext, ROUND, good) == payload
    assert decode_payload(payload) == (KEYS[0], [1, 2, 3], [65535, 30000, 10000], 7)
    with pytest.raises(ValueError):
        decrypt_commit(ciphertext, ROUND, bad)  # not round 1000's signature
    other_round = bytes.fromhex(sealed([1], [65535], round_=ROUND + 1)[2:])
    with pytest.raises(ValueError):
        decrypt_commit(other_round, ROUND + 1, good)


def test_sdk_commit_carries_the_same_payload_layout():
    """The SDK's own commit (future round, not decryptable offline) has exactly the length of the ciphertext of
    `encode_payload` for the same weights: the same SCALE payload under the same timelock scheme."""
    uids, values = [1, 2, 5], [65535, 1234, 1]
    sdk, reveal_round = bittensor_core.get_encrypted_commit_v2(
        uids=uids, weights=values, version_key=3, last_epoch_block=100, pending_epoch_at=0, subnet_epoch_index=10,
        tempo=10, blocks_since_last_step=3, current_block=103, subnet_reveal_period_epochs=1, block_time=12.0,
        hotkey=KEYS[0])
    assert reveal_round > ROUND
    ours = bytes.fromhex(sealed(uids, values, 3)[2:])
    assert len(sdk) == len(ours) and sdk[-8:] == ours[-8:]  # the trailing cipher-suite tag: "AES_GCM_"


def test_reveal_with_a_recorded_pulse_and_yuma_sees_the_weights():
    s = cr_chain()
    pulses = RecordedPulses(PULSES)
    commit(s, sealed([1, 2, 3], [65535, 30000, 10000]))
    assert s.subnets[1].neurons[0].weights == [] and pending_commits(s, 1) == {HOTKEYS[0]: 1}
    events = run_blocks(s, 5, pulses)  # reveal epoch = commit epoch + RevealPeriodEpochs (1)
    assert "TimelockedWeightsRevealed" in events and pending_commits(s, 1) == {}
    assert s.subnets[1].neurons[0].weights == [(1, 65535), (2, 30000), (3, 10000)]
    run_blocks(s, 5)
    neurons = s.subnets[1].neurons
    assert neurons[1].incentive > neurons[2].incentive > neurons[3].incentive > 0 == neurons[4].incentive
    assert neurons[0].validator_trust == pytest.approx(1.0)
    assert s.pulses == {} and s.last_stored_round == ROUND  # pulses kept only while a commit needs them


def test_without_the_pulse_a_commit_stays_pending_then_expires():
    s = cr_chain()
    commit(s, sealed([1, 2], [65535, 100]))
    run_blocks(s, 5)  # the reveal epoch: no pulse, retried every block
    assert pending_commits(s, 1) == {HOTKEYS[0]: 1} and s.subnets[1].neurons[0].weights == []
    run_blocks(s, 5)  # the next epoch: expired, dropped unrevealed
    assert pending_commits(s, 1) == {} and s.subnets[1].neurons[0].weights == []


@pytest.mark.parametrize("case", ["hotkey", "version_key", "min_weights"])
def test_revealed_weights_face_set_weights_checks(case):
    s = cr_chain(weights_version_key=2, min_allowed_weights=2)
    if case == "hotkey":  # a payload naming another hotkey (a copied commit) is dropped
        envelope, _ = bittensor_core.encrypt_at_round(encode_payload(KEYS[1], [1, 2], [65535, 100], 2), ROUND)
        c = "0x" + bittensor_core.inner_ciphertext(envelope).hex()
    else:
        c = sealed([1, 2], [65535, 100], 1) if case == "version_key" else sealed([1], [65535], 2)
    commit(s, c)
    events = run_blocks(s, 5, RecordedPulses(PULSES))
    assert "TimelockedWeightsRevealed" not in events
    assert s.subnets[1].neurons[0].weights == [] and pending_commits(s, 1) == {}


# --- through the real SDK against the devnet chain process ----------------------------------------------


async def test_validator_commits_through_the_sdk(chain_factory):
    subnet = SubnetParams(tempo=5, weights_rate_limit=5, immunity_period=20, max_allowed_uids=16,
                          validator_min_stake=100 * RAO_PER_TAO, commit_reveal_enabled=True,
                          reveal_period_epochs=50)  # commits outlive the test: none expires mid-way
    proc = chain_factory(BootstrapConfig(miners=3, validators=1, subnet=subnet))
    async with proc.chain("validator-0") as chain:
        v = Validator.__new__(Validator)
        v.hp = load_hparams("tiny")
        v.node = SimpleNamespace(chain=chain, netuid=1, wait_for_block=chain.wait_for_block)
        graph = await chain.metagraph()
        me = graph.uid_of(chain.hotkey)
        miners = {u: graph.hotkeys[u] for u in range(graph.n) if u != me}
        window = await chain.block() // v.hp.windows.blocks_per_window + 2
        report = ValidatorReport(window)
        assert await v.set_weights(window, list(miners), [0.5, 0.3, 0.2], report, scored_hotkeys=miners), report.note
        queued = await chain.client.query_map(("SubtensorModule", "TimelockedWeightCommits"), [1])
        commits = [c for _, queue in queued for c in queue]
        assert [c[0] for c in commits] == [chain.hotkey] and commits[0][3] > ROUND
        assert not await chain.client.query(("SubtensorModule", "Weights"), [1, me])  # pending reveal

        with pytest.raises(ChainCallFailed) as too_fast:  # weights_rate_limit 5: the SDK's preflight, named
            await chain.set_weights(list(miners), [0.5, 0.3, 0.2])
        assert too_fast.value.name == "CommittingWeightsTooFast"
        # the validator retries a rate limit (a few blocks later) and the second commit lands
        assert await v.set_weights(window, list(miners), [0.5, 0.3, 0.2], ValidatorReport(window), miners)
        queued = await chain.client.query_map(("SubtensorModule", "TimelockedWeightCommits"), [1])
        assert sum(len(queue) for _, queue in queued) == 2
        me_p = Participant(name="validator-0", role="validator", kind="validator", wallet="validator-0",
                           hotkey=chain.hotkey)
        seen = await read_validators(chain, [me_p], window)  # what the devnet report shows: pending reveal
        assert seen.pending_commits == {"validator-0": 2} and seen.weights == {"validator-0": {}}

        async def raw(call):  # past the SDK's preflight: the chain itself decides
            result = await chain.client.submit_call(call, chain.wallet, signer="hotkey")
            return result.error.name if not result.success else "ok"

        assert await raw(bt.calls.SubtensorModule.set_mechanism_weights(
            netuid=1, mecid=0, dests=[1], weights=[65535], version_key=0)) == "CommitRevealEnabled"
        assert await raw(bt.calls.SubtensorModule.commit_timelocked_mechanism_weights(
            netuid=1, mecid=0, commit=b"\x01" * 64, reveal_round=10**9, commit_reveal_version=3)) \
            == "IncorrectCommitRevealVersion"


def test_commit_reveal_is_a_subnet_param_in_its_real_spellings():
    from devnet.chain_state import parse_subnet_params, subnet_param_name

    assert parse_subnet_params(["CommitRevealWeightsEnabled=true", "RevealPeriodEpochs=2"]) == {
        "commit_reveal_enabled": "true", "reveal_period_epochs": "2"}
    assert subnet_param_name("commit_reveal_period") == "reveal_period_epochs"  # the SDK's hyperparameter name
    with pytest.raises(ValueError):
        parse_subnet_params(["RevealPeriodEpochs=0"])


async def test_chain_process_reveals_with_its_drand_pulses_flag(tmp_path):
    """The chain process's own block loop (`ChainServer.produce_one`) with `--drand-pulses`: it stores the
    pulse a queued commit waits on, then reveals it; without the flag the commit only waits."""
    from devnet.chain_server import ChainServer, ChainServerConfig

    for pulses, revealed in ((PULSES, True), (None, False)):
        s = cr_chain()
        commit(s, sealed([1, 2, 3], [65535, 30000, 10000]))
        server = ChainServer(ChainServerConfig(state_dir=tmp_path / str(revealed), drand_pulses=pulses), state=s)
        for _ in range(5):
            server.produce_one()
        assert (s.subnets[1].neurons[0].weights == [(1, 65535), (2, 30000), (3, 10000)]) is revealed
        assert pending_commits(s, 1) == ({} if revealed else {HOTKEYS[0]: 1})
