"""Several validators, seen from the chain: per-window validator trust and how far their weights disagree.

After each scored window the launcher reads, for every validator participant, what the chain holds: its
stake, permit, validator trust (Yuma's `ValidatorTrust`, the share of its weight that survived the
consensus clip) and its stored weight row (`SubtensorModule.Weights`). `weight_spread` compares the rows
over miner uids (self-weights and weights on validators left out, each row normalised to sum 1): the
largest L1 distance between any two validators' vectors, 0 when they agree and 2 when they share nothing.
On a commit-reveal subnet it also counts each validator's timelocked commits still waiting for their reveal
(`TimelockedWeightCommits`): weights that Yuma does not see yet.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, Field

from devnet.scoreboard import Participant
from transport.chain import Chain, MetagraphSnapshot


class ValidatorWindow(BaseModel):
    window: int = Field(description="Window just scored when the chain was read.")
    block: int = Field(description="Block the metagraph was read at.")
    vtrust: dict[str, float] = Field(default_factory=dict, description="Validator name → validator trust (0..1).")
    stake_share: dict[str, float] = Field(default_factory=dict, description="Validator name → share of validator stake.")
    permit: dict[str, bool] = Field(default_factory=dict, description="Validator name → holds a validator permit.")
    last_update: dict[str, int] = Field(default_factory=dict, description="Validator name → block of its last weights.")
    weights: dict[str, dict[int, float]] = Field(
        default_factory=dict, description="Validator name → miner uid → normalised weight stored on chain.")
    spread: float | None = Field(None, description="Largest pairwise L1 distance between the validators' weights.")
    pending_commits: dict[str, int] = Field(
        default_factory=dict, description="Validator name → timelocked weight commits not revealed yet (commit-reveal).")


class ValidatorSummary(BaseModel):
    uid: int | None = Field(description="Uid of the validator at the end.")
    stake_share: float | None = Field(description="Share of the validators' stake at the end.")
    vtrust: float | None = Field(description="Validator trust at the end of the run.")
    vtrust_per_window: dict[int, float] = Field(description="window → validator trust read after it.")
    pending_commits: int = Field(0, description="Its weight commits still waiting for their drand pulse at the end.")


def weight_spread(vectors: dict[str, dict[int, float]]) -> float | None:
    """Largest L1 distance between two normalised weight vectors (None with fewer than two non-empty ones)."""
    rows = [v for v in vectors.values() if v]
    if len(rows) < 2:
        return None
    return max(sum(abs(a.get(u, 0.0) - b.get(u, 0.0)) for u in set(a) | set(b))
               for a, b in itertools.combinations(rows, 2))


def _row(raw: Any, miners: set[int]) -> dict[int, float]:
    pairs = [(int(u), float(w)) for u, w in (raw or []) if int(u) in miners]
    total = sum(w for _, w in pairs)
    return {u: w / total for u, w in pairs if w > 0} if total > 0 else {}


async def read_validators(chain: Chain, participants: list[Participant], window: int,
                          graph: MetagraphSnapshot | None = None) -> ValidatorWindow:
    """Each validator participant's trust, stake share, permit and stored weights, read from the chain now."""
    graph = graph or await chain.metagraph()
    validators = [p for p in participants if p.role == "validator"]
    uids = {p.name: graph.uid_of(p.hotkey) for p in validators}
    validator_uids = {u for u in uids.values() if u is not None}
    miners = set(range(graph.n)) - validator_uids
    total = sum(graph.stake[u] for u in validator_uids) or 1.0
    trust = await chain.validator_trust()
    out = ValidatorWindow(window=window, block=graph.block)
    for name, uid in uids.items():
        if uid is None:
            continue
        out.vtrust[name] = trust[uid] if uid < len(trust) else 0.0
        out.stake_share[name] = graph.stake[uid] / total
        out.permit[name] = graph.validator_permit[uid]
        out.last_update[name] = graph.last_update[uid]
        raw = await chain.client.query(("SubtensorModule", "Weights"), [chain.config.netuid, uid])
        out.weights[name] = _row(raw, miners)
    out.spread = weight_spread(out.weights)
    queued = await chain.client.query_map(("SubtensorModule", "TimelockedWeightCommits"), [chain.config.netuid])
    by_hotkey: dict[str, int] = {}
    for _epoch, queue in queued or []:
        for entry in queue or []:
            by_hotkey[str(entry[0])] = by_hotkey.get(str(entry[0]), 0) + 1
    out.pending_commits = {p.name: by_hotkey[p.hotkey] for p in validators if by_hotkey.get(p.hotkey)}
    return out


def summarize(windows: list[ValidatorWindow], participants: list[Participant],
              graph: MetagraphSnapshot | None = None) -> dict[str, ValidatorSummary]:
    """Per validator: final trust and stake share (from the last read) and trust per window."""
    out: dict[str, ValidatorSummary] = {}
    last = windows[-1] if windows else None
    for p in participants:
        if p.role != "validator":
            continue
        out[p.name] = ValidatorSummary(
            uid=graph.uid_of(p.hotkey) if graph is not None else None,
            stake_share=last.stake_share.get(p.name) if last else None,
            vtrust=last.vtrust.get(p.name) if last else None,
            vtrust_per_window={w.window: w.vtrust[p.name] for w in windows if p.name in w.vtrust},
            pending_commits=last.pending_commits.get(p.name, 0) if last else 0,
        )
    return out
