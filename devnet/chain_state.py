"""The devnet chain's state and rules: pure, deterministic, JSON-serialisable, no I/O.

It holds what subtensor holds for the parts Crucible uses — subnets and their hyperparameters,
neurons (uid, hotkey, coldkey, registration block, last update, permit, scores), balances and
nonces, stake, weights, commitments, block timestamps — and applies the same rules, failing with the
real pallet error names (`SettingWeightsTooFast`, `NeuronNoValidatorPermit`, …) so the SDK reports
them exactly as it would on mainnet. The chain process (`devnet/chain_server.py`) owns one
`ChainState`, calls `chain_epoch.produce_block` on a timer and `dispatch` for each signed extrinsic; this module
never sees a socket, a clock or a signature. Blocks and epochs live in `chain_epoch.py`.

Simplifications, on purpose: TAO→alpha is 1:1 (no AMM pools), the burn is a fixed price, fees are
zero, bonds are instantaneous (see `chain_yuma.py`), and stake is per (netuid, hotkey, coldkey).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from devnet.chain_wire import RAO_PER_TAO, U16_MAX, genesis_hash, hex_bytes

U64_MAX = (1 << 64) - 1  # the other items are u64 on the real chain (balances, block counts, version key)

STATE_VERSION = 1
MAX_CRV3_COMMIT_SIZE_BYTES = 5000  # pallets/subtensor/src/lib.rs
Event = dict[str, Any]


class DispatchError(Exception):
    """A call failed on chain with a real pallet error (`pallet`, `name`); state is unchanged."""

    def __init__(self, pallet: str, name: str, detail: str = ""):
        super().__init__(f"{pallet}.{name}" + (f": {detail}" if detail else ""))
        self.pallet = pallet
        self.name = name
        self.detail = detail


def _sub(name: str, detail: str = "") -> DispatchError:
    return DispatchError("SubtensorModule", name, detail)


def make_event(event_id: str, attributes: dict[str, Any], module: str = "SubtensorModule") -> Event:
    """An event as the SDK reads it from a receipt: module_id, event_id, attributes."""
    return {"module_id": module, "event_id": event_id, "attributes": attributes}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class SubnetParams(_Model):
    """A subnet's hyperparameters. Field defaults are the devnet's (a small, fast subnet); the real chain's
    initial values and the storage item each maps to are in `REAL_CHAIN_DEFAULTS`.

    Bounds are the real storage types' (u16 for Tempo, MinAllowedWeights, ImmunityPeriod, ActivityCutoff, …,
    u64 for WeightsSetRateLimit, WeightsVersionKey and amounts): a value the real chain could not hold is refused.

    The rules that use them follow subtensor's `pallets/subtensor/src/subnets/weights.rs` (`do_set_weights`:
    `check_version_key` → IncorrectWeightVersionKey, `check_rate_limit` → SettingWeightsTooFast,
    `check_length` → WeightVecLengthIsLow with the minimum capped at the subnet's size and a lone self-weight
    exempt, `max_weight_limited` → MaxWeightExceeded), `subnets/registration.rs` (ImmunityPeriod protects a
    uid from replacement; NoNeuronIdAvailable when every uid is immune) and `epoch/run_epoch.rs`
    (MaxAllowedValidators top-stake permits).
    """

    tempo: int = Field(10, ge=1, le=U16_MAX, description="Blocks between epochs (consensus + emission).")
    weights_rate_limit: int = Field(5, ge=0, le=U64_MAX, description="Blocks a validator must wait between set_weights.")
    min_allowed_weights: int = Field(1, ge=0, le=U16_MAX, description="Fewest non-zero weights a (non-self) set may carry.")
    max_weights_limit: int = Field(U16_MAX, ge=0, le=U16_MAX, description="Largest share one weight may take, u16.")
    weights_version_key: int = Field(0, ge=0, le=U64_MAX, description="Oldest weights version key the subnet accepts.")
    immunity_period: int = Field(50, ge=0, le=U16_MAX, description="Blocks after registration during which a uid is not replaced.")
    max_allowed_uids: int = Field(256, ge=1, le=U16_MAX, description="Uid slots; a full subnet replaces a neuron.")
    max_allowed_validators: int = Field(64, ge=1, le=U16_MAX, description="At most this many top-stake neurons get permits.")
    validator_min_stake: int = Field(1000 * RAO_PER_TAO, ge=0, le=U64_MAX, description="Stake (rao) needed for a permit.")
    weights_min_stake: int = Field(0, ge=0, le=U64_MAX, description="Stake (rao) needed to set weights (StakeThreshold).")
    activity_cutoff: int = Field(5000, ge=1, le=U16_MAX, description="Blocks without weights after which a validator is inactive.")
    kappa: float = Field(0.5, gt=0, le=1, description="Stake majority that defines consensus (0.5 = median).")
    registration_allowed: bool = Field(True, description="Whether burned registration is open.")
    burn: int = Field(RAO_PER_TAO, ge=0, le=U64_MAX, description="Registration price in rao (fixed on the devnet).")
    max_registrations_per_block: int = Field(64, ge=1, le=U16_MAX, description="Registrations accepted per block.")
    emission_per_block: int = Field(RAO_PER_TAO, ge=0, le=U64_MAX, description="Alpha (rao) emitted to the subnet per block.")
    validator_share: float = Field(0.5, ge=0, le=1, description="Share of emission paid as validator dividends.")
    commit_reveal_enabled: bool = Field(False, description="Commit-reveal (timelocked) weights; see chain_commit_reveal.")
    reveal_period_epochs: int = Field(1, ge=1, le=100, description="Epochs between a timelocked commit and its reveal.")


# The real chain's initial values (opentensor/subtensor `runtime/src/lib.rs`, `parameter_types!`:
# SubtensorInitial*; `pallets/subtensor/src/lib.rs` Default* for WeightsSetRateLimit) and the storage item
# (`SubtensorModule.<Item>`) the SDK reads each one from. A subnet owner changes them with AdminUtils'
# `sudo_set_*` calls; `crucible devnet run --subnet-param NAME=VALUE` sets them on the devnet.
REAL_CHAIN_DEFAULTS: dict[str, tuple[str, int | bool]] = {
    "tempo": ("Tempo", 360),  # INITIAL_SUBNET_TEMPO = prod_or_fast!(360, 10)
    "weights_rate_limit": ("WeightsSetRateLimit", 100),  # DefaultWeightsSetRateLimit
    "min_allowed_weights": ("MinAllowedWeights", 1024),  # SubtensorInitialMinAllowedWeights
    "max_weights_limit": ("MaxWeightsLimit", 1000),  # SubtensorInitialMaxWeightsLimit (1000/65535 ≈ 1.5 %)
    "weights_version_key": ("WeightsVersionKey", 0),  # SubtensorInitialWeightsVersionKey
    "immunity_period": ("ImmunityPeriod", 4096),  # SubtensorInitialImmunityPeriod
    "max_allowed_uids": ("MaxAllowedUids", 256),  # SubtensorInitialMaxAllowedUids
    "max_allowed_validators": ("MaxAllowedValidators", 128),  # SubtensorInitialMaxAllowedValidators
    "activity_cutoff": ("ActivityCutoff", 5000),  # SubtensorInitialActivityCutoff
    "commit_reveal_enabled": ("CommitRevealWeightsEnabled", True),  # on for new subnets (chain_commit_reveal.py)
    "reveal_period_epochs": ("RevealPeriodEpochs", 1),  # DefaultRevealPeriodEpochs (pallets/subtensor/src/lib.rs)
}

# Other spellings a subnet operator knows: the SDK's hyperparameter names (`get_subnet_hyperparams`,
# `btcli sudo set --param`) and the storage items above.
_PARAM_ALIASES: dict[str, str] = {
    "weights_version": "weights_version_key", "weights_set_rate_limit": "weights_rate_limit",
    "max_weight_limit": "max_weights_limit", "commit_reveal_weights_enabled": "commit_reveal_enabled",
    "commit_reveal_period": "reveal_period_epochs",
    **{storage.lower(): field for field, (storage, _) in REAL_CHAIN_DEFAULTS.items()},
}


def subnet_param_name(name: str) -> str:
    """The `SubnetParams` field for a hyperparameter spelled as a field, an SDK name or a storage item."""
    key = name.strip()
    if key in SubnetParams.model_fields:
        return key
    field = _PARAM_ALIASES.get(key.lower()) or _PARAM_ALIASES.get(key.lower().replace("_", ""))
    if field is None:
        raise ValueError(f"unknown subnet hyperparameter {name!r}; known: {', '.join(SubnetParams.model_fields)}")
    return field


def parse_subnet_params(items: list[str]) -> dict[str, object]:
    """`NAME=VALUE` strings (any spelling `subnet_param_name` knows) as `SubnetParams` overrides."""
    out: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"--subnet-param {item!r}: expected NAME=VALUE")
        out[subnet_param_name(name)] = value.strip()
    SubnetParams(**out)  # one clear error for a bad value, naming the field
    return out


class ChainParams(_Model):
    commitment_max_fields: int = Field(3, ge=1, description="Commitments.MaxFields: data fields per commitment.")
    commitment_raw_max: int = Field(128, ge=1, description="Largest Raw field (bytes), as the Data enum allows.")
    commitment_max_space: int = Field(3100, ge=1, description="Commitment bytes a hotkey may use per tempo.")
    commitment_min_cost: int = Field(100, ge=0, description="Bytes each set_commitment counts at least.")
    existential_deposit: int = Field(500, ge=0, description="Balances.ExistentialDeposit (rao).")
    timestamp_history: int = Field(100_000, ge=16, description="Block timestamps kept for block-pinned reads.")


class Account(_Model):
    free: int = 0
    nonce: int = 0


class Neuron(_Model):
    uid: int
    hotkey: str
    coldkey: str
    registered_at: int
    last_update: int
    validator_permit: bool = False
    weights: list[tuple[int, int]] = Field(default_factory=list)
    rank: float = 0.0
    trust: float = 0.0
    consensus: float = 0.0
    incentive: float = 0.0
    dividends: float = 0.0
    validator_trust: float = 0.0
    emission: int = 0  # rao earned in the last epoch


class Subnet(_Model):
    netuid: int
    name: str
    symbol: str
    owner_coldkey: str
    owner_hotkey: str
    registered_at: int
    params: SubnetParams
    last_epoch_block: int
    neurons: list[Neuron] = Field(default_factory=list)
    registrations_block: int = -1
    registrations_this_block: int = 0
    epoch_index: int = 0  # SubnetEpochIndex: epochs run so far (commit-reveal keys commits by it)

    def uid_of(self, hotkey: str) -> int | None:
        for n in self.neurons:
            if n.hotkey == hotkey:
                return n.uid
        return None


class Commitment(_Model):
    block: int
    deposit: int = 0
    fields: list[dict[str, str]]


class TimelockedCommit(_Model):
    """One entry of subtensor's `TimelockedWeightCommits[netuid][epoch]`: (who, commit_block, commit, reveal_round)."""

    hotkey: str
    block: int
    commit: str  # 0x-hex of the compressed TLE ciphertext, as submitted
    reveal_round: int


class SpaceUsage(_Model):
    epoch: int
    used: int


class ChainState(_Model):
    version: int = STATE_VERSION
    genesis: str
    block: int = 0
    params: ChainParams = Field(default_factory=ChainParams)
    ts_base: int = 0  # block number of timestamps[0]
    timestamps: list[int] = Field(default_factory=list)  # unix ms per block from ts_base
    accounts: dict[str, Account] = Field(default_factory=dict)
    hotkey_owner: dict[str, str] = Field(default_factory=dict)
    stake: dict[int, dict[str, dict[str, int]]] = Field(default_factory=dict)  # netuid → hotkey → coldkey → rao
    subnets: dict[int, Subnet] = Field(default_factory=dict)
    commitments: dict[int, dict[str, Commitment]] = Field(default_factory=dict)
    space: dict[int, dict[str, SpaceUsage]] = Field(default_factory=dict)
    timelocked: dict[int, dict[int, list[TimelockedCommit]]] = Field(default_factory=dict)  # netuid → epoch → queue
    pulses: dict[int, str] = Field(default_factory=dict)  # Drand.Pulses: round → BLS signature hex (only rounds in use)
    last_stored_round: int = 0  # Drand.LastStoredRound

    # --- reads -------------------------------------------------------------------------------------------

    def account(self, address: str) -> Account:
        return self.accounts.get(address) or Account()

    def timestamp_ms(self, block: int | None = None) -> int | None:
        block = self.block if block is None else block
        i = block - self.ts_base
        return self.timestamps[i] if 0 <= i < len(self.timestamps) else None

    def hotkey_stake(self, netuid: int, hotkey: str) -> int:
        return sum(self.stake.get(netuid, {}).get(hotkey, {}).values())

    def subnet(self, netuid: int, missing: str = "SubnetNotExists") -> Subnet:
        sn = self.subnets.get(netuid)
        if sn is None:
            raise _sub(missing, f"netuid {netuid}")
        return sn


def new_chain(seed: str, time_ms: int, params: ChainParams | None = None) -> ChainState:
    """Block 0 of a fresh chain whose genesis hash derives from `seed`."""
    return ChainState(genesis=genesis_hash(seed), params=params or ChainParams(), timestamps=[int(time_ms)])


def create_subnet(
    state: ChainState, netuid: int, owner_coldkey: str, owner_hotkey: str, params: SubnetParams, name: str = ""
) -> Subnet:
    if netuid in state.subnets:
        raise _sub("SubnetLimitReached", f"netuid {netuid} exists")
    sn = Subnet(
        netuid=netuid, name=name or f"devnet-{netuid}", symbol=f"α{netuid}", owner_coldkey=owner_coldkey,
        owner_hotkey=owner_hotkey, registered_at=state.block, params=params, last_epoch_block=state.block,
    )
    state.subnets[netuid] = sn
    state.hotkey_owner.setdefault(owner_hotkey, owner_coldkey)
    return sn


def fund(state: ChainState, address: str, rao: int) -> None:
    state.accounts.setdefault(address, Account()).free += int(rao)


# --- registration and stake -------------------------------------------------------------------------------


def _prune_candidate(sn: Subnet, block: int) -> Neuron:
    """The non-immune neuron with the lowest emission (ties: older registration, then lower uid)."""
    mortal = [n for n in sn.neurons if block - n.registered_at >= sn.params.immunity_period]
    if not mortal:
        raise _sub("NoNeuronIdAvailable", "every uid is still immune")
    return min(mortal, key=lambda n: (n.emission, n.incentive, n.registered_at, n.uid))


def register(state: ChainState, netuid: int, coldkey: str, hotkey: str, *, burned: bool = True) -> tuple[int, list[Event]]:
    """Give `hotkey` (owned by `coldkey`) a uid on `netuid`, replacing a neuron when the subnet is full."""
    sn = state.subnet(netuid)
    p = sn.params
    if not p.registration_allowed:
        raise _sub("SubNetRegistrationDisabled")
    if sn.registrations_block == state.block and sn.registrations_this_block >= p.max_registrations_per_block:
        raise _sub("TooManyRegistrationsThisBlock")
    if sn.uid_of(hotkey) is not None:
        raise _sub("HotKeyAlreadyRegisteredInSubNet")
    owner = state.hotkey_owner.get(hotkey)
    if owner is not None and owner != coldkey:
        raise _sub("NonAssociatedColdKey", "the hotkey belongs to another coldkey")
    cost = p.burn if burned else 0
    if state.account(coldkey).free < cost:
        raise _sub("NotEnoughBalanceToStake", "cannot pay the registration burn")
    neuron = Neuron(uid=0, hotkey=hotkey, coldkey=coldkey, registered_at=state.block, last_update=state.block)
    events: list[Event] = []
    if len(sn.neurons) < p.max_allowed_uids:
        neuron.uid = len(sn.neurons)
        sn.neurons.append(neuron)
    else:
        old = _prune_candidate(sn, state.block)
        neuron.uid = old.uid
        sn.neurons[old.uid] = neuron
        events.append(make_event("NeuronDeregistered", {"netuid": netuid, "uid": old.uid, "hotkey": old.hotkey}))
    if cost:
        state.accounts[coldkey].free -= cost
    state.hotkey_owner[hotkey] = coldkey
    if sn.registrations_block != state.block:
        sn.registrations_block, sn.registrations_this_block = state.block, 0
    sn.registrations_this_block += 1
    events.append(make_event("NeuronRegistered", {"netuid": netuid, "uid": neuron.uid, "hotkey": hotkey}))
    return neuron.uid, events


def add_stake(state: ChainState, coldkey: str, hotkey: str, netuid: int, rao: int) -> list[Event]:
    """Move `rao` TAO from the coldkey's balance into alpha stake on `hotkey` (1:1 on the devnet)."""
    sn = state.subnet(netuid)
    if hotkey not in state.hotkey_owner:
        raise _sub("HotKeyAccountNotExists")
    if sn.uid_of(hotkey) is None:
        raise _sub("HotKeyNotRegisteredInSubNet")
    if rao <= 0:
        raise _sub("AmountTooLow")
    if state.account(coldkey).free < rao:
        raise _sub("NotEnoughBalanceToStake")
    state.accounts[coldkey].free -= rao
    row = state.stake.setdefault(netuid, {}).setdefault(hotkey, {})
    row[coldkey] = row.get(coldkey, 0) + rao
    return [make_event("StakeAdded", {"coldkey": coldkey, "hotkey": hotkey, "netuid": netuid, "amount": rao})]


# --- weights and commitments ------------------------------------------------------------------------------


def set_weights(
    state: ChainState, hotkey: str, netuid: int, uids: list[int], values: list[int], version_key: int
) -> list[Event]:
    """subtensor's `internal_set_weights` checks, then store max-upscaled u16 weights.

    Also the path a revealed timelocked commit takes (`chain_commit_reveal.reveal_due`): with commit-reveal
    on, the rate limit is not checked here and LastUpdate is not touched (the commit already did both);
    the plain extrinsic is refused with CommitRevealEnabled in `dispatch`, as subtensor's dispatchable does.
    """
    sn = state.subnet(netuid, missing="MechanismDoesNotExist")
    p = sn.params
    if len(uids) != len(values):
        raise _sub("WeightVecNotEqualSize")
    if version_key < p.weights_version_key:
        raise _sub("IncorrectWeightVersionKey")
    uid = sn.uid_of(hotkey)
    if uid is None:
        raise _sub("HotKeyNotRegisteredInSubNet")
    if state.hotkey_stake(netuid, hotkey) < p.weights_min_stake:
        raise _sub("NotEnoughStakeToSetWeights")
    neuron = sn.neurons[uid]
    if not p.commit_reveal_enabled and p.weights_rate_limit and state.block - neuron.last_update < p.weights_rate_limit:
        raise _sub("SettingWeightsTooFast", f"last update at block {neuron.last_update}")
    if len(set(uids)) != len(uids):
        raise _sub("DuplicateUids")
    n = len(sn.neurons)
    if any(not 0 <= u < n for u in uids) or any(not 0 <= v <= U16_MAX for v in values):
        raise _sub("UidVecContainInvalidOne")
    is_self = uids == [uid]
    if not is_self and not neuron.validator_permit:
        raise _sub("NeuronNoValidatorPermit")
    if not is_self and len(uids) < min(p.min_allowed_weights, n):
        raise _sub("WeightVecLengthIsLow")
    if len(uids) > n:
        raise _sub("UidsLengthExceedUidsInSubNet")
    total = sum(values)
    if not is_self and len(values) > 1 and total and max(values) * U16_MAX > p.max_weights_limit * total:
        raise _sub("MaxWeightExceeded")
    top = max(values) if values else 0
    neuron.weights = [(u, round(v * U16_MAX / top)) for u, v in zip(uids, values, strict=True) if top and v > 0]
    if not p.commit_reveal_enabled:
        neuron.last_update = state.block
    return [make_event("WeightsSet", {"netuid": netuid, "uid": uid})]


def set_commitment(state: ChainState, hotkey: str, netuid: int, info: Any) -> list[Event]:
    """Commitments.set_commitment: registered hotkeys only, at most MaxFields Raw fields, a space quota."""
    cp = state.params
    sn = state.subnets.get(netuid)
    if sn is None or sn.uid_of(hotkey) is None:
        raise DispatchError("Commitments", "AccountNotAllowedCommit")
    fields = _parse_fields(info, cp.commitment_raw_max)
    if len(fields) > cp.commitment_max_fields:
        raise DispatchError("Commitments", "TooManyFieldsInCommitmentInfo")
    size = sum(len(b) for b in fields)
    cost = max(cp.commitment_min_cost, size)
    epoch = state.block // sn.params.tempo
    usage = state.space.setdefault(netuid, {}).get(hotkey)
    used = usage.used if usage is not None and usage.epoch == epoch else 0
    if used + cost > cp.commitment_max_space:
        raise DispatchError("Commitments", "SpaceLimitExceeded")
    state.space[netuid][hotkey] = SpaceUsage(epoch=epoch, used=used + cost)
    stored = [{f"Raw{len(b)}": "0x" + b.hex()} for b in fields]
    state.commitments.setdefault(netuid, {})[hotkey] = Commitment(block=state.block, fields=stored)
    return [make_event("Commitment", {"netuid": netuid, "who": hotkey}, module="Commitments")]


def _parse_fields(info: Any, raw_max: int) -> list[bytes]:
    """The byte strings of a CommitmentInfo's Raw fields; `[[...]]` (legacy nesting) is accepted too."""
    fields = info.get("fields") if isinstance(info, dict) else None
    if not isinstance(fields, list):
        raise ValueError("CommitmentInfo needs a 'fields' list")
    if len(fields) == 1 and isinstance(fields[0], list):
        fields = fields[0]
    out = []
    for entry in fields:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError("each commitment field must be one {'RawN': bytes} variant")
        (variant, value), = entry.items()
        if not variant.startswith("Raw") or not variant[3:].isdigit():
            raise ValueError(f"unsupported commitment field {variant!r} (the devnet stores Raw fields only)")
        data = hex_bytes(value) if not isinstance(value, str) or value.startswith("0x") else value.encode()
        if len(data) != int(variant[3:]) or len(data) > raw_max:
            raise ValueError(f"{variant} carries {len(data)} bytes")
        out.append(data)
    return out


# --- extrinsic dispatch -----------------------------------------------------------------------------------


def dispatch(state: ChainState, signer: str, module: str, function: str, params: dict[str, Any]) -> list[Event]:
    """Apply one signed call. Raises DispatchError (chain failure) or KeyError/ValueError (undecodable call)."""
    key = (module, function)
    if key in (("SubtensorModule", "set_mechanism_weights"), ("SubtensorModule", "set_weights")):
        if int(params.get("mecid", 0)) != 0:
            raise _sub("MechanismDoesNotExist", "the devnet runs mechanism 0 only")
        uids = [int(u) for u in params["dests"]]
        values = [int(v) for v in params["weights"]]
        if state.subnet(int(params["netuid"]), missing="MechanismDoesNotExist").params.commit_reveal_enabled:
            raise _sub("CommitRevealEnabled")
        return set_weights(state, signer, int(params["netuid"]), uids, values, int(params.get("version_key", 0)))
    if key in CALL_HANDLERS:  # calls whose rules live in modules built on this one (chain_commit_reveal)
        return CALL_HANDLERS[key](state, signer, params)
    if key == ("Commitments", "set_commitment"):
        return set_commitment(state, signer, int(params["netuid"]), params["info"])
    if key == ("SubtensorModule", "burned_register"):
        _, events = register(state, int(params["netuid"]), signer, str(params["hotkey"]), burned=True)
        return events
    if key in (("SubtensorModule", "add_stake"), ("SubtensorModule", "add_stake_limit")):
        return add_stake(state, signer, str(params["hotkey"]), int(params["netuid"]), int(params["amount_staked"]))
    raise KeyError(f"{module}.{function} is not simulated by the devnet chain")


COMMIT_CALLS = (("SubtensorModule", "commit_timelocked_mechanism_weights"),
                ("SubtensorModule", "commit_timelocked_weights"))
# (module, function) → handler(state, signer, params); chain_commit_reveal registers the commit calls on import.
CALL_HANDLERS: dict[tuple[str, str], Callable[[ChainState, str, dict[str, Any]], list[Event]]] = {}

# The calls the devnet executes, with the parameters each needs (integers unless noted).
CALL_PARAMS: dict[tuple[str, str], tuple[str, ...]] = {
    COMMIT_CALLS[0]: ("netuid", "mecid", "commit", "reveal_round", "commit_reveal_version"),
    COMMIT_CALLS[1]: ("netuid", "commit", "reveal_round", "commit_reveal_version"),
    ("SubtensorModule", "set_mechanism_weights"): ("netuid", "mecid", "dests", "weights", "version_key"),
    ("SubtensorModule", "set_weights"): ("netuid", "dests", "weights", "version_key"),
    ("SubtensorModule", "burned_register"): ("netuid", "hotkey"),
    ("SubtensorModule", "add_stake"): ("hotkey", "netuid", "amount_staked"),
    ("SubtensorModule", "add_stake_limit"): ("hotkey", "netuid", "amount_staked"),
    ("Commitments", "set_commitment"): ("netuid", "info"),
}


def validate_call(state: ChainState, module: str, function: str, params: Any) -> None:
    """What a node's decoder rejects before a call reaches the pool: unknown calls, missing or mistyped params.

    Raises LookupError for a call the devnet does not execute, ValueError for a malformed one.
    """
    names = CALL_PARAMS.get((module, function))
    if names is None:
        raise LookupError(f"{module}.{function} is not simulated by the devnet chain")
    if not isinstance(params, dict) or any(k not in params for k in names):
        raise ValueError(f"{module}.{function} needs parameters {', '.join(names)}")
    for name in ("netuid", "mecid", "version_key", "amount_staked", "reveal_round", "commit_reveal_version"):
        if name in params and (not isinstance(params[name], int) or isinstance(params[name], bool)):
            raise ValueError(f"{module}.{function}: {name} must be an integer")
    for name in ("dests", "weights"):
        if name in params:
            v = params[name]
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError(f"{module}.{function}: {name} must be a list of integers")
    if "hotkey" in params and not isinstance(params["hotkey"], str):
        raise ValueError(f"{module}.{function}: hotkey must be an ss58 address")
    if (module, function) == ("Commitments", "set_commitment"):
        _parse_fields(params["info"], state.params.commitment_raw_max)
    if (module, function) in COMMIT_CALLS:
        commit = hex_bytes(params["commit"])
        if not commit or len(commit) > MAX_CRV3_COMMIT_SIZE_BYTES:  # BoundedVec<u8, ConstU32<5000>> decode
            raise ValueError(f"{module}.{function}: commit must be 1..{MAX_CRV3_COMMIT_SIZE_BYTES} bytes")
