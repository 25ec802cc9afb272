"""Commit-reveal of weights on the devnet chain: subtensor's timelocked commits (CR v3/v4) and their reveal.

With `CommitRevealWeightsEnabled` on, the SDK's `SetWeights` does not send weights: it encrypts them to a
future drand quicknet round (`bittensor_core.get_encrypted_commit_v2`) and sends
`commit_timelocked_mechanism_weights(netuid, mecid, commit, reveal_round, commit_reveal_version=4)`. The
real chain stores the ciphertext and, once its drand pallet holds the pulse of `reveal_round`, decrypts it
and applies the weights as `set_weights` would. The rules here follow opentensor/subtensor:

- **commit** (`subnets/weights.rs` `internal_commit_timelocked_weights`, `guards/check_weights.rs`):
  NotEnoughStakeToSetWeights (StakeThreshold), InvalidRevealRound (`reveal_round < Drand.LastStoredRound`,
  i.e. decryptable already), MechanismDoesNotExist, CommitRevealDisabled, IncorrectCommitRevealVersion
  (`CommitRevealWeightsVersion`, default 4), HotKeyNotRegisteredInSubNet, CommittingWeightsTooFast
  (`check_rate_limit`: WeightsSetRateLimit since LastUpdate, a never-set uid passes), TooManyUnrevealedCommits
  (10 per hotkey in the epoch's queue); the commit is appended to `TimelockedWeightCommits[netuid][epoch]`
  (epoch = `SubnetEpochIndex`), `TimelockedWeightsCommitted` is emitted and LastUpdate set to the commit
  block. A commit over `MAX_CRV3_COMMIT_SIZE_BYTES` (5000) does not decode (`chain_state.validate_call`).
- **reveal** (`coinbase/reveal_commits.rs` `reveal_crv3_commits_for_subnet`, every block before the epoch):
  reveal_epoch = current epoch (with the look-ahead of an epoch due this block) − `RevealPeriodEpochs`;
  queues of older epochs are dropped (expired); each commit of reveal_epoch whose pulse is stored is
  deserialised and decrypted with the pulse's BLS signature (here the real library,
  `bittensor_core.decrypt_with_signature`), decoded as `WeightsTlockPayload {hotkey, uids, values,
  version_key}` (the hotkey must be the committer; the legacy payload without hotkey is accepted) and
  applied through `chain_state.set_weights` — every set_weights check (version key, permit, MinAllowedWeights,
  MaxWeightsLimit, …) except the rate limit, which the commit paid; LastUpdate is not touched. A commit that
  fails any step is dropped silently (the chain only traces it); one whose pulse is missing waits, retried
  every block of the reveal epoch, and expires with it. `TimelockedWeightsRevealed` is emitted per success.

**Pulses.** The real drand pallet's offchain worker writes every quicknet pulse. The devnet has no such
worker: the chain process asks a `PulseSource` (`devnet/chain_pulses.py`) for the rounds its queued commits
wait on and stores what it gets (`feed_pulses`, like `write_pulse`). Offline (no `--drand-url`), a future
round is in no recorded file, so on a devnet with commit-reveal on commits land and are stored, weights
stay **pending reveal** and expire unrevealed: Yuma sees no weights from those validators and pays no
incentive. This is the honest limit of an offline chain; the reveal path itself is proven with a real
recorded quicknet pulse (tests/test_commit_reveal.py). Simplified: the devnet runs mechanism 0 only; pulses
are not BLS-verified on arrival (a wrong signature simply fails to decrypt, AES-GCM authenticated).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import bittensor_core

from devnet.chain_state import (
    CALL_HANDLERS,
    COMMIT_CALLS,
    ChainState,
    DispatchError,
    Event,
    Subnet,
    TimelockedCommit,
    make_event,
    set_weights,
)
from devnet.chain_wire import hex_bytes

COMMIT_REVEAL_WEIGHTS_VERSION = 4  # DefaultCommitRevealWeightsVersion (pallets/subtensor/src/lib.rs)
MAX_UNREVEALED_COMMITS = 10  # per hotkey and epoch queue (internal_commit_timelocked_weights)


def _sub(name: str, detail: str = "") -> DispatchError:
    return DispatchError("SubtensorModule", name, detail)


def current_epoch(sn: Subnet, block: int, lookahead: bool = False) -> int:
    """`current_epoch_with_lookahead`: SubnetEpochIndex, plus one when the epoch is due at `block` and has not
    run yet (the reveal step runs before the epoch in the same block)."""
    due = lookahead and block - sn.last_epoch_block >= sn.params.tempo
    return sn.epoch_index + (1 if due else 0)


def commit_timelocked(state: ChainState, hotkey: str, netuid: int, commit: bytes, reveal_round: int,
                      commit_reveal_version: int) -> list[Event]:
    """`commit_timelocked_mechanism_weights`, checks in subtensor's order (module docstring)."""
    sn = state.subnet(netuid, missing="MechanismDoesNotExist")
    p = sn.params
    if state.hotkey_stake(netuid, hotkey) < p.weights_min_stake:
        raise _sub("NotEnoughStakeToSetWeights")
    if reveal_round < state.last_stored_round:
        raise _sub("InvalidRevealRound", f"round {reveal_round} < LastStoredRound {state.last_stored_round}")
    if not p.commit_reveal_enabled:
        raise _sub("CommitRevealDisabled")
    if commit_reveal_version != COMMIT_REVEAL_WEIGHTS_VERSION:
        raise _sub("IncorrectCommitRevealVersion", f"{commit_reveal_version} != {COMMIT_REVEAL_WEIGHTS_VERSION}")
    uid = sn.uid_of(hotkey)
    if uid is None:
        raise _sub("HotKeyNotRegisteredInSubNet")
    neuron = sn.neurons[uid]
    last = neuron.last_update
    if last and p.weights_rate_limit and state.block - last < p.weights_rate_limit:
        raise _sub("CommittingWeightsTooFast", f"last update at block {last}")
    epoch = current_epoch(sn, state.block)
    queue = state.timelocked.setdefault(netuid, {}).setdefault(epoch, [])
    if sum(1 for c in queue if c.hotkey == hotkey) >= MAX_UNREVEALED_COMMITS:
        raise _sub("TooManyUnrevealedCommits")
    queue.append(TimelockedCommit(hotkey=hotkey, block=state.block, commit="0x" + commit.hex(),
                                  reveal_round=int(reveal_round)))
    neuron.last_update = state.block
    return [make_event("TimelockedWeightsCommitted", {"who": hotkey, "netuid": netuid,
                                                      "commit_hash": _blake2_256(commit), "reveal_round": reveal_round})]


def _commit_call(state: ChainState, signer: str, params: dict) -> list[Event]:
    if int(params.get("mecid", 0)) != 0:
        raise _sub("MechanismDoesNotExist", "the devnet runs mechanism 0 only")
    return commit_timelocked(state, signer, int(params["netuid"]), hex_bytes(params["commit"]),
                             int(params["reveal_round"]), int(params["commit_reveal_version"]))


for _call in COMMIT_CALLS:
    CALL_HANDLERS[_call] = _commit_call


def _blake2_256(data: bytes) -> str:
    return "0x" + hashlib.blake2b(data, digest_size=32).hexdigest()


# --- SCALE, the little the payload needs -------------------------------------------------------------------


def scale_compact(n: int) -> bytes:
    """SCALE compact encoding of a non-negative integer (single-byte, two-byte, four-byte and big modes)."""
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    if n < 1 << 30:
        return ((n << 2) | 2).to_bytes(4, "little")
    raw = n.to_bytes((n.bit_length() + 7) // 8, "little")
    return bytes([((len(raw) - 4) << 2) | 3]) + raw


def _read_compact(buf: bytes, at: int) -> tuple[int, int]:
    mode = buf[at] & 3
    if mode == 0:
        return buf[at] >> 2, at + 1
    if mode == 1:
        return int.from_bytes(buf[at:at + 2], "little") >> 2, at + 2
    if mode == 2:
        return int.from_bytes(buf[at:at + 4], "little") >> 2, at + 4
    size = (buf[at] >> 2) + 4
    return int.from_bytes(buf[at + 1:at + 1 + size], "little"), at + 1 + size


def _read_vec(buf: bytes, at: int, width: int) -> tuple[list[int], int]:
    n, at = _read_compact(buf, at)
    end = at + n * width
    if end > len(buf):
        raise ValueError("Not enough data to decode vector")
    return [int.from_bytes(buf[i:i + width], "little") for i in range(at, end, width)], end


def encode_payload(hotkey_public_key: bytes, uids: list[int], values: list[int], version_key: int) -> bytes:
    """SCALE `WeightsTlockPayload {hotkey: Vec<u8>, uids: Vec<u16>, values: Vec<u16>, version_key: u64}`."""
    out = scale_compact(len(hotkey_public_key)) + bytes(hotkey_public_key)
    out += scale_compact(len(uids)) + b"".join(int(u).to_bytes(2, "little") for u in uids)
    out += scale_compact(len(values)) + b"".join(int(v).to_bytes(2, "little") for v in values)
    return out + int(version_key).to_bytes(8, "little")


def decode_payload(data: bytes) -> tuple[bytes | None, list[int], list[int], int]:
    """(hotkey or None for the legacy payload, uids, values, version_key); ValueError when neither decodes."""
    try:
        hk, at = _read_vec(data, 0, 1)
        uids, at = _read_vec(data, at, 2)
        values, at = _read_vec(data, at, 2)
        if at + 8 > len(data):
            raise ValueError("short payload")
        return bytes(hk), uids, values, int.from_bytes(data[at:at + 8], "little")
    except (ValueError, IndexError):
        uids, at = _read_vec(data, 0, 2)
        values, at = _read_vec(data, at, 2)
        if at + 8 > len(data):
            raise ValueError("payload decodes as neither WeightsTlockPayload nor the legacy one") from None
        return None, uids, values, int.from_bytes(data[at:at + 8], "little")


def decrypt_commit(commit: bytes, reveal_round: int, signature_hex: str) -> bytes:
    """Decrypt a stored commit (a compressed `TLECiphertext<TinyBLS381>`) with the round's BLS signature.

    `decrypt_with_signature` reads the SDK's `UserData` envelope (SCALE `Vec<u8>` ciphertext + u64 round,
    what `encrypt_at_round` returns); the chain stores the bare ciphertext, so it is wrapped first.
    Raises ValueError when the signature is not the round's (AES-GCM authentication fails).
    """
    envelope = scale_compact(len(commit)) + commit + int(reveal_round).to_bytes(8, "little")
    return bytes(bittensor_core.decrypt_with_signature(envelope, signature_hex))


# --- pulses and the reveal step ----------------------------------------------------------------------------


def waiting_rounds(state: ChainState) -> set[int]:
    """Rounds some queued commit waits on and the chain has no pulse for."""
    return {c.reveal_round for queues in state.timelocked.values() for q in queues.values() for c in q
            if c.reveal_round not in state.pulses}


def store_pulse(state: ChainState, round_: int, signature_hex: str) -> None:
    """Drand's `write_pulse` for one round: Pulses[round] and LastStoredRound."""
    state.pulses[int(round_)] = signature_hex.removeprefix("0x")
    state.last_stored_round = max(state.last_stored_round, int(round_))


def feed_pulses(state: ChainState, lookup: Callable[[int], str | None]) -> int:
    """Ask `lookup` (a PulseSource's `signature`) for every round a queued commit waits on; store what comes."""
    got = 0
    for round_ in sorted(waiting_rounds(state)):
        sig = lookup(round_)
        if sig:
            store_pulse(state, round_, sig)
            got += 1
    return got


def _account_public_key(ss58: str) -> bytes | None:
    try:
        return bytes(bittensor_core.ss58_decode(ss58))
    except Exception:  # noqa: BLE001 - a devnet test hotkey that is not ss58 has no public key
        return None


def reveal_due(state: ChainState, sn: Subnet) -> list[Event]:
    """One block's `reveal_crv3_commits_for_subnet` (module docstring); call it before the subnet's epoch."""
    netuid, queues = sn.netuid, state.timelocked.get(sn.netuid)
    if not queues:
        return []
    cur = current_epoch(sn, state.block, lookahead=True)
    reveal_epoch = cur - sn.params.reveal_period_epochs
    for epoch in [e for e in queues if e < reveal_epoch]:
        del queues[epoch]  # expired, never revealed
    if reveal_epoch < 0 or reveal_epoch not in queues:
        return []
    events: list[Event] = []
    unrevealed: list[TimelockedCommit] = []
    for c in queues.pop(reveal_epoch):
        sig = state.pulses.get(c.reveal_round)
        if sig is None:
            unrevealed.append(c)  # retried every block of the reveal epoch
            continue
        try:
            hotkey, uids, values, version_key = decode_payload(decrypt_commit(hex_bytes(c.commit), c.reveal_round, sig))
            if hotkey is not None and hotkey != _account_public_key(c.hotkey):
                continue  # "hotkey mismatch in payload"
            set_weights(state, c.hotkey, netuid, uids, values, version_key)
        except (ValueError, DispatchError):
            continue  # undecryptable, undecodable or refused by set_weights: dropped, as on chain
        events.append(make_event("TimelockedWeightsRevealed", {"netuid": netuid, "who": c.hotkey}))
    if unrevealed:
        queues[reveal_epoch] = unrevealed
    _prune_pulses(state)
    return events


def _prune_pulses(state: ChainState) -> None:
    used = {c.reveal_round for queues in state.timelocked.values() for q in queues.values() for c in q}
    for round_ in [r for r in state.pulses if r not in used]:
        del state.pulses[round_]


def pending_commits(state: ChainState, netuid: int) -> dict[str, int]:
    """Hotkey → number of its commits still waiting to be revealed (for logs and reports)."""
    out: dict[str, int] = {}
    for q in state.timelocked.get(netuid, {}).values():
        for c in q:
            out[c.hotkey] = out.get(c.hotkey, 0) + 1
    return out
