"""The validator: every window, score every miner with the Gauntlet, set weights, keep the model.

`Validator.step(window)` runs after the window's upload deadline (docs/protocol.md §3, validator steps 1–7):
download every registered miner's shard, stage 1 on all, stage 2 on as many as the budget allows,
fold the results into ratings and scores, set weights on chain, aggregate the window's peers
exactly like the miners do and apply the outer step, then publish the aggregate record and (every
K windows) a checkpoint, and persist its state atomically. The peer list chosen from window w's
scores is for window w + peers.lead_windows (2), published as soon as w is scored: a
validator has a whole window to score w before miners look for that list, and a list uploaded after
its window's deadline counts for nobody (`Node.find_peer_list`), so a slow validator never steps a
model the miners did not.

Under `torchrun --nproc_per_node R crucible validator --fsdp`, rank 0 is this validator and every rank
holds only its FSDP2 rows of θ once `run` has started (`neurons.sharded_eval`): the debug samples, θ's
digest, stage 2's forward passes, the outer step and checkpoints become collectives rank 0 announces
(`ShardedValidatorRanks.call`), and the other ranks run them in the same order (`follow_validator`).
`--precision bf16` evaluates in bf16 (FSDP2 mixed precision, or autocast on one process); θ stays float32.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from gauntlet.filters import step_change
from gauntlet.state import ScoringState, StateConfig, load_state, save_state
from gauntlet.weights import score_window
from neurons.catchup import recover, sync_to
from neurons.chain_weights import conform_weights
from neurons.distributed import DistContext, broadcast_work
from neurons.local_state import load_local_state, save_local_state
from neurons.metrics import NodeMetrics
from neurons.node import Node, WindowContext
from neurons.node_files import SCORES_FILE, local_secret
from neurons.publisher import Publisher
from neurons.scoring import Scorer
from neurons.sharded_eval import ShardedValidatorRanks, build_sharded_theta, whole_model
from neurons.training import TrainSettings
from protocol.model import param_digest
from protocol.peers import make_peer_list
from protocol.sample import debug_positions, gather_sample
from protocol.storage_keys import (
    peers_key,
)
from protocol.windows import window_bounds
from transport.bucket import StorageError
from transport.chain import ChainAccessError

log = logging.getLogger(__name__)


class VersionKeyMismatch(RuntimeError):
    """The subnet's WeightsVersionKey differs from hparams' subnet.weights_version_key (one line for the operator)."""

RATE_LIMIT_ERRORS = {"SettingWeightsTooFast", "rate_limited"}


@dataclass
class ValidatorReport:
    window: int
    scored: int = 0
    evaluated: int = 0
    weights: dict[int, float] = field(default_factory=dict)
    weights_set: bool = False
    stepped: bool = False
    in_sync: bool = True
    peers_used: list[str] = field(default_factory=list)
    next_primary: list[int] = field(default_factory=list)
    seconds: float = 0.0
    eval_seconds: float = 0.0
    note: str = ""


class Validator:
    def __init__(self, node: Node, state_dir: str | Path, dist: DistContext | None = None, precision: str = "fp32"):
        self.node = node
        self.dist = dist or DistContext()
        self.precision = precision  # stage 2's compute precision (node-local; θ stays float32)
        self.ranks: ShardedValidatorRanks | None = None  # FSDP2 rows (`neurons.sharded_eval`), once `run` started
        self.stopped = False  # the torchrun followers were told to stop
        self.hp = node.hp
        self.state_dir = Path(state_dir)
        self.keypair = node.chain.wallet.hotkey
        self.secret = local_secret(self.state_dir)
        self.state: ScoringState = load_state(self.state_dir / SCORES_FILE)
        self.numels = {name: p.numel() for name, p in node.model.named_parameters()}
        self.scorer = Scorer(node.model, node.store, self.hp, self.secret, settings=TrainSettings(precision=precision))
        self.publisher = Publisher(node)
        self.metrics: NodeMetrics | None = None
        self.model_window: int | None = None

    async def step(self, window: int) -> ValidatorReport:
        started = time.perf_counter()
        report = ValidatorReport(window)
        node, hp = self.node, self.hp
        ctx = await node.window(window)
        graph = ctx.require_closed()
        miners = {uid: hk for uid, hk in enumerate(graph.hotkeys) if hk != node.hotkey}
        pub = await self.publisher.publication(ctx, list(miners.values()))
        fetched = dict(pub.fetched)
        fetched.update(await node.fetch(ctx, [hk for hk in miners.values() if hk not in fetched], pub.pinned))

        positions = debug_positions(ctx.seed, self.numels, hp.shard.debug_sample_size)
        own = self.sample(positions)
        filters = self.scorer.filter_window(miners, fetched, pub.first_seen, own, positions,
                                            self.state.reference_change())
        eval_started = time.perf_counter()
        budget = hp.gauntlet.eval_time_fraction * self.window_seconds(ctx)
        last_evaluated = {uid: us.last_evaluated for uid, us in self.state.uids.items() if us.hotkey == miners.get(uid)}
        evals = await asyncio.to_thread(self.scorer.evaluate_window, ctx, miners, filters, fetched, budget,
                                        last_evaluated)
        report.eval_seconds = time.perf_counter() - eval_started
        outcome = score_window(self.state, window, miners, filters, evals, hp.gauntlet, hp.peers)
        report.scored, report.evaluated, report.weights = len(filters), len(evals), outcome.weights
        report.next_primary = outcome.primary
        primary = [miners[u] for u in outcome.primary]
        reserve = [miners[u] for u in outcome.reserve]
        target = window + hp.peers.lead_windows
        await self._put(peers_key(target), make_peer_list(self.keypair, node.netuid, target, primary, reserve))
        report.weights_set = await self.set_weights(window, *outcome.as_lists(), report, scored_hotkeys=miners)

        found = await node.find_record(ctx)  # the window's update: the highest-stake validator's record
        if found is None:
            report.note += "no aggregate record in time; model unchanged. "
        elif (drift := self.drift(found.record)) is not None and await self.recover(window, drift) is not None:
            report.in_sync = False
            report.note += f"out of sync ({drift}); model unchanged, recovery retried next window. "
        else:
            result = await node.gather_record(ctx, found, prefetched=fetched)
            if result.used == found.record.peers:
                report.stepped = self.apply(result)
                report.peers_used = result.used
            else:
                report.note += f"could not reproduce the record (skipped {result.skipped}); model unchanged. "
        self.state.record_step_change(step_change(self.sample(positions), own), StateConfig())
        self.model_window = window + 1
        self.publisher.digests[window + 1] = self.digest()  # goes in window w + 1's record
        if self.publisher.checkpoint_due(window + 1):
            await self.publish_checkpoint(window + 1)
        await asyncio.to_thread(self.save)
        await self.node.prune(window)
        report.seconds = time.perf_counter() - started
        return report

    # --- θ, whole in this process or in FSDP2 rows over the torchrun ranks ---------------------------------

    def sample(self, positions: dict) -> dict:
        """θ's values at the window's debug positions (the validator's own sample for stage 1)."""
        if self.ranks is not None:
            return self.ranks.call("sample", positions=positions)
        return gather_sample(dict(self.node.model.named_parameters()), positions)

    def digest(self) -> str:
        return self.ranks.call("digest") if self.ranks is not None else param_digest(self.node.model)

    def drift(self, record) -> str | None:
        if self.ranks is None or record.theta_digest is None:
            return self.node.drift(record)
        mine = self.digest()
        return None if mine == record.theta_digest else f"θ digest {mine[:12]}… differs from the record's"

    async def recover(self, window: int, drift: str) -> str | None:
        if self.ranks is not None:  # recovery replays on the whole model, which no rank holds
            raise SystemExit(f"window {window}: sharded θ out of sync ({drift}); restart to catch up")
        return await recover(self.node, window)

    def apply(self, result) -> bool:
        """The window's outer step: `Node.apply`, or each rank's rows from the record's encoded shards."""
        if self.ranks is None:
            return self.node.apply(result)
        if result.aggregated is None:
            return False
        shards = {h: result.fetched[h].shard.tensors for h in result.used}
        self.ranks.call("apply", shards=shards, clip=result.clip_norm)
        return True

    async def publish_checkpoint(self, window: int) -> None:
        """Sharded: θ gathered whole into a CPU model on rank 0 for the checkpoint's files, then dropped."""
        if self.ranks is None:
            await self.publisher.publish_checkpoint(window)
            return
        whole = whole_model(self.hp, self.ranks.call("gather_whole"))
        sharded, self.node.model = self.node.model, whole  # the publisher saves node.model
        try:
            await self.publisher.publish_checkpoint(window)
        finally:
            self.node.model = sharded

    def window_seconds(self, ctx: WindowContext) -> float:
        """A window's duration in chain time (start and deadline block timestamps), else the hparams' guess."""
        if ctx.seconds is not None:
            return ctx.seconds
        return self.hp.windows.blocks_per_window * self.hp.windows.expected_block_time_s

    async def set_weights(self, window: int, uids: list[int], weights: list[float], report: ValidatorReport,
                          scored_hotkeys: dict[int, str] | None = None) -> bool:
        """Set weights once for this window, fitted to the subnet's rules (`neurons.chain_weights`).

        Just before each attempt the uid → hotkey map and the subnet's weight rules are read again: a uid
        whose hotkey is no longer the one scored gets no weight. A refusal is logged with the chain's
        error name; only a rate-limit refusal (SettingWeightsTooFast) is retried, a few blocks later and
        never past the next window's deadline (scoring the next window matters more). Other refusals
        (IncorrectWeightVersionKey, NeuronNoValidatorPermit, …) would fail again unchanged."""
        retry_blocks = max(1, self.hp.windows.blocks_per_window // 4)
        give_up = window_bounds(window + 1, self.hp.windows).deadline_block
        chain = self.node.chain
        note = "set_weights not attempted"
        for attempt in range(4):
            try:
                graph = await chain.metagraph()
                rules = await chain.weight_rules()
                changed = [u for u, hk in (scored_hotkeys or {}).items()
                           if u >= graph.n or graph.hotkeys[u] != hk]
                fit = conform_weights(dict(zip(uids, weights, strict=True)), rules, graph.uid_of(chain.hotkey),
                                      changed)
                if fit.dropped:
                    log.info("window %d: no weight for uids %s (hotkey changed since scoring)", window, fit.dropped)
                if not fit.uids:
                    note = "set_weights skipped: nobody earned weight"
                    break
                await chain.set_weights(fit.uids, fit.weights, version_key=self.hp.subnet.weights_version_key)
                return True
            except ChainAccessError as exc:
                rate_limited = exc.name in RATE_LIMIT_ERRORS or "rate limit" in str(exc)
                note = f"set_weights refused ({exc.name or 'no chain error name'}): {exc}"
                wait = re.search(r"Retry in ~(\d+) blocks", str(exc))  # the SDK's preflight says how long
                retry_at = await chain.block() + (max(1, int(wait.group(1))) if wait else retry_blocks)
                if not rate_limited or attempt == 3 or retry_at >= give_up:
                    break
                await self.node.wait_for_block(retry_at)
            except ValueError as exc:
                note = f"set_weights failed: {exc}"
                break
        log.warning("window %d: %s", window, note)
        report.note += f"{note}. "  # the window's later notes follow it
        return False

    async def check_version_key(self) -> None:
        """Stop with one line when the subnet's WeightsVersionKey is not this network's hparams value."""
        rules = await self.node.chain.weight_rules()
        ours = self.hp.subnet.weights_version_key
        if rules.version_key != ours:
            raise VersionKeyMismatch(
                f"subnet {self.node.netuid} asks for weights version key {rules.version_key}, this node's hparams "
                f"send {ours} (subnet.weights_version_key): run the network's release or --set "
                f"subnet.weights_version_key={rules.version_key}")

    async def _put(self, key: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self.node.bucket.put, key, data)
        except StorageError as exc:
            log.warning("could not publish %s: %s", key, exc)

    async def publish_initial_peer_list(self, window: int) -> None:
        """With no scores yet, every miner with a bucket commitment is a peer (uid order)."""
        graph = await self.node.chain.metagraph()
        creds = await self.node.credentials()
        hotkeys = [hk for hk in graph.hotkeys if hk in creds and hk != self.node.hotkey]
        primary, reserve = hotkeys[: self.hp.peers.primary], hotkeys[self.hp.peers.primary :][: self.hp.peers.reserve]
        await self._put(peers_key(window), make_peer_list(self.keypair, self.node.netuid, window, primary, reserve))

    def save(self) -> None:
        save_state(self.state, self.state_dir / SCORES_FILE)
        if self.ranks is not None:  # not yet: a restarted sharded validator catches θ up (checkpoint + replay)
            return
        save_local_state(self.state_dir, self.model_window or 0, self.hp.revision(), self.node.model)

    async def start(self) -> int:
        await self.check_version_key()
        saved = load_local_state(self.state_dir, self.hp.revision(), self.node.model)
        current = await self.node.current_window()
        self.model_window = await sync_to(self.node, saved.window if saved else None, current)
        self.publisher.digests[current] = param_digest(self.node.model)
        for window in range(current, current + self.hp.peers.lead_windows):
            if not await asyncio.to_thread(self.node.bucket.exists, peers_key(window)):
                await self.publish_initial_peer_list(window)
        return current

    async def run(self, windows: int | None = None) -> None:
        """Score window after window; the publication of each window's record runs alongside, on time.

        Under torchrun the other ranks are told to stop however this ends (`stop_ranks`)."""
        try:
            await self._run(windows)
        finally:
            self.stop_ranks()

    async def _run(self, windows: int | None) -> None:
        try:
            window = await self.start()
        except VersionKeyMismatch as exc:  # a setting the operator must change: one line, exit 2 (no restart)
            log.error("%s", exc)
            raise SystemExit(2) from None
        if self.dist.active:
            self.shard()
        publishing = asyncio.create_task(self.publisher.run(window))
        try:
            done = 0
            while windows is None or done < windows:
                current = await self.node.current_window()
                if current > window + 1 and self.ranks is not None:
                    raise SystemExit(f"sharded validator fell behind (windows {window}..{current - 2}); restart "
                                     "to catch up")
                if current > window + 1:  # scoring fell behind: skip ahead, keep θ in step with the records
                    log.warning("windows %d..%d not scored (validator behind); replaying their records",
                                window, current - 2)
                    self.model_window = await sync_to(self.node, window, current - 1)
                    window = current - 1
                report = await self.step(window)
                log.info("window %d: scored %d, evaluated %d in %.1fs, weights %s, stepped with %d peers %s",
                         window, report.scored, report.evaluated, report.eval_seconds,
                         "set" if report.weights_set else "NOT set", len(report.peers_used), report.note)
                if self.metrics is not None:
                    self.metrics.observe_validator(report, self.state, self.node.buckets())
                done += 1
                window += 1
        finally:
            publishing.cancel()

    def stop_ranks(self) -> None:
        """Tell the torchrun followers to exit (once; nothing without torchrun)."""
        if self.dist.active and not self.stopped:
            self.stopped = True
            broadcast_work(self.dist, {"op": "stop"})

    def shard(self) -> None:
        """Rank 0's restored θ becomes every rank's FSDP2 rows (`neurons.sharded_eval`), then is freed."""
        broadcast_work(self.dist, {"op": "shard"})
        theta = build_sharded_theta(self.node.model, self.hp, self.dist, self.precision, self.node.device)
        self.node.model = self.scorer.model = theta.model  # the whole model was spent on the scatter
        self.ranks = ShardedValidatorRanks(theta)
        self.scorer.backend = self.ranks  # stage 2 on the rows
