"""Blocks and epochs of the devnet chain: time advances, tempos come due, weights become emission.

Each block first reveals the timelocked weight commits that are due (`chain_commit_reveal.reveal_due`),
then runs the epochs that are due, like subtensor's `block_step`.

`produce_block` is what the chain process calls once per block; `run_epoch` is subtensor's epoch for
one subnet — consensus over the stored weights (`chain_yuma.yuma`), one tempo of emission paid into
stake by incentive (miners) and dividends (validators), and validator permits re-assigned from
stake. Pure functions over a `ChainState`, like `chain_state.py`.
"""

from __future__ import annotations

import numpy as np

from devnet.chain_commit_reveal import reveal_due
from devnet.chain_state import ChainState, Event, Subnet, make_event
from devnet.chain_yuma import yuma


def produce_block(state: ChainState, time_ms: int) -> list[Event]:
    """Advance to the next block stamped `time_ms`; run the epoch of every subnet whose tempo is due."""
    state.block += 1
    state.timestamps.append(int(time_ms))
    excess = len(state.timestamps) - state.params.timestamp_history
    if excess > 0:
        del state.timestamps[:excess]
        state.ts_base += excess
    events: list[Event] = []
    for sn in state.subnets.values():
        events.extend(reveal_due(state, sn))  # before the epoch, as subtensor's block_step does
        if state.block - sn.last_epoch_block >= sn.params.tempo:
            events.extend(run_epoch(state, sn.netuid))
    return events


def run_epoch(state: ChainState, netuid: int) -> list[Event]:
    """Consensus over the stored weights, then pay one tempo of emission into stake."""
    sn = state.subnet(netuid)
    p = sn.params
    blocks = max(0, state.block - sn.last_epoch_block)
    sn.last_epoch_block = state.block
    sn.epoch_index += 1
    n = len(sn.neurons)
    if n == 0:
        return []
    stake = np.array([state.hotkey_stake(netuid, nr.hotkey) for nr in sn.neurons], dtype=float)
    permits = np.array([nr.validator_permit for nr in sn.neurons], dtype=bool)
    active = np.array([state.block - nr.last_update <= p.activity_cutoff for nr in sn.neurons], dtype=bool)
    weights = np.zeros((n, n))
    for nr in sn.neurons:
        for uid, value in nr.weights:
            if uid < n:
                weights[nr.uid, uid] = value
    set_at = np.array([nr.last_update for nr in sn.neurons])
    reg_at = np.array([nr.registered_at for nr in sn.neurons])
    result = yuma(stake, permits, active, weights, set_at, reg_at, p.kappa)

    pot = p.emission_per_block * blocks
    miner_pot = pot * (1 - p.validator_share) if result.incentive.sum() > 0 else 0
    validator_pot = pot * p.validator_share if result.dividends.sum() > 0 else 0
    for nr in sn.neurons:
        i = nr.uid
        nr.rank, nr.trust, nr.consensus = float(result.rank[i]), float(result.trust[i]), float(result.consensus[i])
        nr.incentive, nr.dividends = float(result.incentive[i]), float(result.dividends[i])
        nr.validator_trust = float(result.validator_trust[i])
        nr.emission = int(miner_pot * result.incentive[i] + validator_pot * result.dividends[i])
        if nr.emission:
            row = state.stake.setdefault(netuid, {}).setdefault(nr.hotkey, {})
            row[nr.coldkey] = row.get(nr.coldkey, 0) + nr.emission
    _assign_permits(state, sn, stake)
    return [make_event("EpochRan", {"netuid": netuid, "block": state.block})]


def _assign_permits(state: ChainState, sn: Subnet, stake: np.ndarray) -> None:
    """Permits go to the top `max_allowed_validators` neurons by stake that meet `validator_min_stake`."""
    order = sorted(range(len(sn.neurons)), key=lambda i: (-stake[i], i))
    chosen = {i for i in order[: sn.params.max_allowed_validators] if stake[i] >= sn.params.validator_min_stake}
    for nr in sn.neurons:
        nr.validator_permit = nr.uid in chosen
