"""Chain state seen through subtensor's storage, runtime-API and constant names, as plain decoded values.

The SDK's `Substrate` contract returns "plain decoded values" (what the transport's SCALE decoder
yields), and the SDK's read code — the metagraph builder, set-weights preflight, commitment reader,
`wait_for_epoch` — picks them apart by name. This module produces exactly those shapes from a
`ChainState`, so that code runs unmodified against the devnet. Names the devnet does not simulate
raise `LookupError`, which the server reports as a chain error naming the item.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from devnet.chain_commit_reveal import COMMIT_REVEAL_WEIGHTS_VERSION
from devnet.chain_state import ChainState, Neuron, Subnet
from devnet.chain_wire import RAO_PER_TAO, U16_MAX

SPEC_VERSION = 1


def _u16(x: float) -> int:
    return max(0, min(U16_MAX, round(x * U16_MAX)))


def _active(state: ChainState, sn: Subnet, n: Neuron) -> bool:
    return state.block - n.last_update <= sn.params.activity_cutoff


# Per-subnet scalar storage items: `query(name, [netuid])` and `query_map(name)` over all subnets.
_SUBNET_SCALARS: dict[str, Callable[[ChainState, Subnet], Any]] = {
    "NetworksAdded": lambda s, sn: True,
    "Tempo": lambda s, sn: sn.params.tempo,
    "LastEpochBlock": lambda s, sn: sn.last_epoch_block,
    "BlocksSinceLastStep": lambda s, sn: s.block - sn.last_epoch_block,
    "PendingEpochAt": lambda s, sn: 0,
    "SubnetEpochIndex": lambda s, sn: sn.epoch_index,
    "RevealPeriodEpochs": lambda s, sn: sn.params.reveal_period_epochs,
    "SubnetworkN": lambda s, sn: len(sn.neurons),
    "MaxAllowedUids": lambda s, sn: sn.params.max_allowed_uids,
    "ImmunityPeriod": lambda s, sn: sn.params.immunity_period,
    "WeightsVersionKey": lambda s, sn: sn.params.weights_version_key,
    "MinAllowedWeights": lambda s, sn: sn.params.min_allowed_weights,
    "MaxWeightsLimit": lambda s, sn: sn.params.max_weights_limit,
    "MaxAllowedValidators": lambda s, sn: sn.params.max_allowed_validators,
    "WeightsSetRateLimit": lambda s, sn: sn.params.weights_rate_limit,
    "CommitRevealWeightsEnabled": lambda s, sn: sn.params.commit_reveal_enabled,
    "Kappa": lambda s, sn: _u16(sn.params.kappa),
    "ActivityCutoff": lambda s, sn: sn.params.activity_cutoff,
    "Burn": lambda s, sn: sn.params.burn,
    "NetworkRegistrationAllowed": lambda s, sn: sn.params.registration_allowed,
    "MaxRegistrationsPerBlock": lambda s, sn: sn.params.max_registrations_per_block,
    "RegistrationsThisBlock": lambda s, sn: sn.registrations_this_block if sn.registrations_block == s.block else 0,
    "CollateralLockShare": lambda s, sn: 0,
    "SubnetEpochConsensus": lambda s, sn: "Yuma",
    "SubnetOwner": lambda s, sn: sn.owner_coldkey,
    "SubnetOwnerHotkey": lambda s, sn: sn.owner_hotkey,
    "NetworkRegisteredAt": lambda s, sn: sn.registered_at,
    "TokenSymbol": lambda s, sn: sn.symbol,
    "SubnetName": lambda s, sn: sn.name,
    "LastUpdate": lambda s, sn: [n.last_update for n in sn.neurons],
    "ValidatorPermit": lambda s, sn: [n.validator_permit for n in sn.neurons],
    "Active": lambda s, sn: [_active(s, sn, n) for n in sn.neurons],
    "Rank": lambda s, sn: [_u16(n.rank) for n in sn.neurons],
    "Trust": lambda s, sn: [_u16(n.trust) for n in sn.neurons],
    "Consensus": lambda s, sn: [_u16(n.consensus) for n in sn.neurons],
    "Incentive": lambda s, sn: [_u16(n.incentive) for n in sn.neurons],
    "Dividends": lambda s, sn: [_u16(n.dividends) for n in sn.neurons],
    "ValidatorTrust": lambda s, sn: [_u16(n.validator_trust) for n in sn.neurons],
    "Emission": lambda s, sn: [n.emission for n in sn.neurons],
}


def _timelocked(state: ChainState, netuid: int, epoch: int) -> list:
    """`TimelockedWeightCommits[netuid][epoch]`: (who, commit_block, commit bytes, reveal_round) tuples."""
    queue = state.timelocked.get(int(netuid), {}).get(int(epoch), [])
    return [(c.hotkey, c.block, c.commit, c.reveal_round) for c in queue]


def _neuron_at(state: ChainState, netuid: int, uid: int) -> Neuron | None:
    sn = state.subnets.get(int(netuid))
    return sn.neurons[int(uid)] if sn is not None and 0 <= int(uid) < len(sn.neurons) else None


def _commitment(state: ChainState, netuid: int, hotkey: str) -> dict | None:
    c = state.commitments.get(int(netuid), {}).get(hotkey)
    return None if c is None else {"deposit": c.deposit, "block": c.block, "info": {"fields": list(c.fields)}}


def _account(state: ChainState, address: str) -> dict:
    a = state.account(address)
    data = {"free": a.free, "reserved": 0, "frozen": 0, "flags": 0}
    return {"nonce": a.nonce, "consumers": 0, "providers": 1, "sufficients": 0, "data": data}


def query(state: ChainState, module: str, name: str, params: list, block: int) -> Any:
    """One storage value (None where the chain has no entry), read at the head except `Timestamp.Now`."""
    p = list(params or [])
    if module == "SubtensorModule" and name in _SUBNET_SCALARS:
        sn = state.subnets.get(int(p[0])) if p else None
        return None if sn is None else _SUBNET_SCALARS[name](state, sn)
    key = (module, name)
    if key == ("Timestamp", "Now"):
        return state.timestamp_ms(block)
    if key == ("System", "Number"):
        return state.block
    if key == ("System", "Account"):
        return _account(state, str(p[0]))
    if key == ("SubtensorModule", "Uids"):
        sn = state.subnets.get(int(p[0]))
        return None if sn is None else sn.uid_of(str(p[1]))
    if key == ("SubtensorModule", "Keys"):
        n = _neuron_at(state, p[0], p[1])
        return None if n is None else n.hotkey
    if key == ("SubtensorModule", "BlockAtRegistration"):
        n = _neuron_at(state, p[0], p[1])
        return None if n is None else n.registered_at
    if key == ("SubtensorModule", "Weights"):
        n = _neuron_at(state, p[0], p[1])
        return [] if n is None else [list(w) for w in n.weights]
    if key == ("SubtensorModule", "IsNetworkMember"):
        sn = state.subnets.get(int(p[1]))
        return sn is not None and sn.uid_of(str(p[0])) is not None
    if key == ("SubtensorModule", "Owner"):
        return state.hotkey_owner.get(str(p[0]))
    if key == ("SubtensorModule", "TotalHotkeyAlpha"):
        return state.hotkey_stake(int(p[1]), str(p[0]))
    if key == ("SubtensorModule", "StakeThreshold"):
        return min((sn.params.weights_min_stake for sn in state.subnets.values()), default=0)
    if key == ("SubtensorModule", "TotalNetworks"):
        return len(state.subnets)
    if key == ("Commitments", "CommitmentOf"):
        return _commitment(state, p[0], str(p[1]))
    if key == ("Commitments", "RevealedCommitments"):
        return None
    if key == ("Commitments", "LastCommitment"):
        c = state.commitments.get(int(p[0]), {}).get(str(p[1]))
        return None if c is None else c.block
    if key == ("Commitments", "MaxSpace"):
        return state.params.commitment_max_space
    if key == ("Commitments", "UsedSpaceOf"):
        u = state.space.get(int(p[0]), {}).get(str(p[1]))
        return None if u is None else {"last_epoch": u.epoch, "used_space": u.used}
    if key == ("MevShield", "NextKey"):
        return None
    if key == ("SubtensorModule", "CommitRevealWeightsVersion"):
        return COMMIT_REVEAL_WEIGHTS_VERSION
    if key == ("SubtensorModule", "TimelockedWeightCommits"):
        return _timelocked(state, p[0], p[1])
    if key == ("Drand", "LastStoredRound"):
        return state.last_stored_round
    if key == ("Drand", "Pulses"):
        sig = state.pulses.get(int(p[0]))
        return None if sig is None else {"round": int(p[0]), "randomness": None, "signature": "0x" + sig}
    raise LookupError(f"storage {module}.{name} is not simulated by the devnet chain")


def query_map(state: ChainState, module: str, name: str, params: list) -> list[tuple[Any, Any]]:
    """A storage map as (remaining key, value) pairs, the first key(s) fixed by `params`."""
    p = list(params or [])
    if module == "SubtensorModule" and name in _SUBNET_SCALARS and not p:
        return [(netuid, _SUBNET_SCALARS[name](state, sn)) for netuid, sn in sorted(state.subnets.items())]
    key = (module, name)
    if key == ("Commitments", "CommitmentOf") and len(p) == 1:
        return [(hk, _commitment(state, p[0], hk)) for hk in state.commitments.get(int(p[0]), {})]
    if key == ("Commitments", "RevealedCommitments"):
        return []
    if key == ("SubtensorModule", "TimelockedWeightCommits") and len(p) == 1:
        return [(epoch, _timelocked(state, p[0], epoch)) for epoch in sorted(state.timelocked.get(int(p[0]), {}))]
    sn = state.subnets.get(int(p[0])) if p else None
    if key == ("SubtensorModule", "Uids") and len(p) == 1:
        return [] if sn is None else [(n.hotkey, n.uid) for n in sn.neurons]
    if key == ("SubtensorModule", "Keys") and len(p) == 1:
        return [] if sn is None else [(n.uid, n.hotkey) for n in sn.neurons]
    if key == ("SubtensorModule", "Weights") and len(p) == 1:
        return [] if sn is None else [(n.uid, [list(w) for w in n.weights]) for n in sn.neurons if n.weights]
    raise LookupError(f"storage map {module}.{name}{p} is not simulated by the devnet chain")


def metagraph(state: ChainState, netuid: int) -> dict | None:
    """`SubnetInfoRuntimeApi.get_metagraph`: the columns `bittensor.metagraph._build` reads."""
    sn = state.subnets.get(int(netuid))
    if sn is None:
        return None
    ns = sn.neurons
    stakes = [state.hotkey_stake(sn.netuid, n.hotkey) for n in ns]
    return {
        "netuid": sn.netuid, "name": sn.name, "symbol": sn.symbol, "identity": None,
        "network_registered_at": sn.registered_at, "owner_hotkey": sn.owner_hotkey,
        "owner_coldkey": sn.owner_coldkey, "block": state.block, "tempo": sn.params.tempo,
        "last_step": sn.last_epoch_block, "blocks_since_last_step": state.block - sn.last_epoch_block,
        "num_uids": len(ns), "max_uids": sn.params.max_allowed_uids,
        "tao_in": RAO_PER_TAO, "alpha_in": RAO_PER_TAO, "moving_price": {"bits": 1 << 32},
        "immunity_period": sn.params.immunity_period, "max_validators": sn.params.max_allowed_validators,
        "hotkeys": [n.hotkey for n in ns], "coldkeys": [n.coldkey for n in ns],
        "identities": [None for _ in ns], "axons": [None for _ in ns],
        "active": [_active(state, sn, n) for n in ns],
        "validator_permit": [n.validator_permit for n in ns],
        "last_update": [n.last_update for n in ns],
        "block_at_registration": [n.registered_at for n in ns],
        "rank": [_u16(n.rank) for n in ns], "trust": [_u16(n.trust) for n in ns],
        "consensus": [_u16(n.consensus) for n in ns], "incentives": [_u16(n.incentive) for n in ns],
        "dividends": [_u16(n.dividends) for n in ns], "pruning_score": [_u16(n.incentive) for n in ns],
        "validator_trust": [_u16(n.validator_trust) for n in ns],
        "emission": [n.emission for n in ns],
        "alpha_stake": stakes, "tao_stake": [0 for _ in ns], "total_stake": stakes,
    }


def _neurons_lite(state: ChainState, netuid: int) -> list[dict] | None:
    sn = state.subnets.get(int(netuid))
    if sn is None:
        return None
    out = []
    for n in sn.neurons:
        stake = state.stake.get(sn.netuid, {}).get(n.hotkey, {})
        out.append({
            "hotkey": n.hotkey, "coldkey": n.coldkey, "uid": n.uid, "netuid": sn.netuid,
            "active": _active(state, sn, n), "axon_info": None, "prometheus_info": None,
            "stake": sorted(stake.items()), "rank": _u16(n.rank), "emission": n.emission,
            "incentive": _u16(n.incentive), "consensus": _u16(n.consensus), "trust": _u16(n.trust),
            "validator_trust": _u16(n.validator_trust), "dividends": _u16(n.dividends),
            "last_update": n.last_update, "validator_permit": n.validator_permit,
            "pruning_score": _u16(n.incentive),
        })
    return out


def _stake_info(state: ChainState, hotkey: str, coldkey: str, netuid: int, rao: int) -> dict:
    sn = state.subnets.get(netuid)
    registered = sn is not None and sn.uid_of(hotkey) is not None
    return {"hotkey": hotkey, "coldkey": coldkey, "netuid": netuid, "stake": rao, "is_registered": registered}


def _hyperparams(sn: Subnet) -> dict[str, Any]:
    """The subtensor hyperparameter names the devnet has a value for."""
    p = sn.params
    return {
        "tempo": p.tempo, "weights_rate_limit": p.weights_rate_limit, "min_allowed_weights": p.min_allowed_weights,
        "max_weights_limit": p.max_weights_limit, "weights_version": p.weights_version_key,
        "immunity_period": p.immunity_period, "max_validators": p.max_allowed_validators,
        "activity_cutoff": p.activity_cutoff, "kappa": _u16(p.kappa), "registration_allowed": p.registration_allowed,
        "min_burn": p.burn, "max_burn": p.burn, "commit_reveal_weights_enabled": p.commit_reveal_enabled,
        "commit_reveal_period": p.reveal_period_epochs,
    }


def _arg(params: Any, index: int, name: str) -> Any:
    if isinstance(params, dict):
        return params[name]
    return list(params)[index]


def runtime_call(state: ChainState, api: str, method: str, params: Any) -> Any:
    key = (api, method)
    if key == ("SubnetInfoRuntimeApi", "get_metagraph"):
        return metagraph(state, _arg(params, 0, "netuid"))
    if key in (("NeuronInfoRuntimeApi", "get_neurons_lite"), ("NeuronInfoRuntimeApi", "get_neurons")):
        return _neurons_lite(state, _arg(params, 0, "netuid"))
    if key == ("StakeInfoRuntimeApi", "get_stake_info_for_hotkey_coldkey_netuid"):
        hotkey, coldkey, netuid = str(_arg(params, 0, "hotkey")), str(_arg(params, 1, "coldkey")), int(_arg(params, 2, "netuid"))
        rao = state.stake.get(netuid, {}).get(hotkey, {}).get(coldkey, 0)
        return _stake_info(state, hotkey, coldkey, netuid, rao) if rao else None
    if key == ("StakeInfoRuntimeApi", "get_stake_info_for_coldkey"):
        coldkey = str(_arg(params, 0, "coldkey"))
        return [_stake_info(state, hk, coldkey, netuid, row[coldkey])
                for netuid, by_hotkey in sorted(state.stake.items()) for hk, row in by_hotkey.items() if row.get(coldkey)]
    if key == ("SubnetInfoRuntimeApi", "get_subnet_hyperparams_v3"):
        sn = state.subnets.get(int(_arg(params, 0, "netuid")))
        return None if sn is None else [{"name": k, "value": {type(v).__name__: v}} for k, v in _hyperparams(sn).items()]
    if key == ("SwapRuntimeApi", "current_alpha_price"):
        return RAO_PER_TAO  # 1 TAO per alpha: the devnet has no pools
    if key == ("SwapRuntimeApi", "sim_swap_tao_for_alpha"):
        tao = int(_arg(params, 1, "tao"))
        return {"alpha_amount": tao, "tao_amount": tao, "tao_fee": 0, "alpha_fee": 0}
    if key == ("SwapRuntimeApi", "sim_swap_alpha_for_tao"):
        alpha = int(_arg(params, 1, "alpha"))
        return {"alpha_amount": alpha, "tao_amount": alpha, "tao_fee": 0, "alpha_fee": 0}
    raise LookupError(f"runtime API {api}.{method} is not simulated by the devnet chain")


def constant(state: ChainState, module: str, name: str, block_time_s: float) -> Any:
    key = (module, name)
    if key == ("Aura", "SlotDuration"):
        return int(round(block_time_s * 1000))
    if key == ("Commitments", "MaxFields"):
        return state.params.commitment_max_fields
    if key == ("Balances", "ExistentialDeposit"):
        return state.params.existential_deposit
    raise LookupError(f"constant {module}.{name} is not simulated by the devnet chain")
