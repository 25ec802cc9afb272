"""Adversarial miners for the devnet: the behaviours the Gauntlet must not pay for.

Each kind is a `Miner` subclass that overrides one small hook (which samples to train on, what
update to publish, when to upload, whether to follow the network), so the honest path in
`neurons/miner.py` stays free of special cases. `crucible devnet miner --adversary KIND` runs one.

    noise       random update with the honest update's per-tensor norms
    zero        an all-zero update
    copycat     re-uploads another miner's shard, re-signed with its own hotkey
    late        trains honestly but uploads after the deadline
    desync      never applies the aggregated update: trains from a stale model
    poison      the honest update scaled by -10
    freeloader  trains on random samples instead of its assigned ones
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import torch

from neurons.miner import Miner, MinerReport
from neurons.node import WindowContext
from protocol.codec import EncodedTensor
from protocol.data import random_samples, samples_digest
from protocol.gather import GatherResult
from protocol.storage_keys import gradient_key
from protocol.wire import Rejection, ShardExpectation, read_shard, write_shard
from transport.bucket import StorageError

log = logging.getLogger(__name__)


class NoiseMiner(Miner):
    def make_update(self, window: int, delta: dict[str, torch.Tensor]) -> dict[str, EncodedTensor]:
        gen = torch.Generator().manual_seed(window)
        noise = {}
        for name, d in delta.items():
            r = torch.randn(d.shape, generator=gen)
            noise[name] = r * (d.norm() / r.norm().clamp_min(1e-12))
        return self.compressor.encode_all(noise)


class ZeroMiner(Miner):
    def make_update(self, window: int, delta: dict[str, torch.Tensor]) -> dict[str, EncodedTensor]:
        return self.compressor.encode_all({name: torch.zeros_like(d) for name, d in delta.items()})


class PoisonMiner(Miner):
    def make_update(self, window: int, delta: dict[str, torch.Tensor]) -> dict[str, EncodedTensor]:
        return self.compressor.encode_all({name: -10.0 * d for name, d in delta.items()})


class FreeloaderMiner(Miner):
    def choose_samples(self, window: int) -> list[int]:
        seed = hashlib.blake2b(f"freeload:{self.node.hotkey}:{window}".encode()).digest()
        return random_samples(seed, self.hp.samples_per_window, self.node.store.num_train)


class LateMiner(Miner):
    async def upload(self, ctx: WindowContext, blob: bytes, report: MinerReport) -> None:
        await self.node.wait_for_block(ctx.bounds.deadline_block + 1)
        await asyncio.to_thread(self.node.bucket.put, gradient_key(ctx.window, self.node.hotkey), blob)
        report.uploaded = True
        report.note = "uploaded after the deadline on purpose"


class DesyncMiner(Miner):
    """Trains every window but never applies the network's aggregated update."""

    def apply_aggregate(self, result: GatherResult) -> bool:
        return False

    async def ensure_in_sync(self, found, report: MinerReport) -> bool:
        return True  # ignores the record's θ digest: it never recovers either


class CopycatMiner(Miner):
    """Waits for an honest peer's shard, downloads it and re-uploads it as its own."""

    async def _train_and_publish(self, ctx: WindowContext, report: MinerReport) -> None:
        started, window = time.perf_counter(), ctx.window
        creds = await self.node.credentials()
        victims = sorted(h for h in creds if h != self.node.hotkey)
        while await self.node.chain.block() < ctx.bounds.deadline_block - 1:
            for victim in victims:
                try:
                    data = await asyncio.to_thread(
                        self.node.pool.get(creds[victim]).get, gradient_key(window, victim), 10**9)
                except StorageError:
                    continue
                shard = read_shard(data, ShardExpectation(self.node.netuid, window, victim, self.node.shard_rules))
                if isinstance(shard, Rejection):
                    continue
                blob = write_shard(
                    shard.tensors, keypair=self.keypair, netuid=self.node.netuid, window=window,
                    revision=self.hp.revision(), data_digest=samples_digest(self.choose_samples(window)),
                    debug_values=shard.debug_values,
                )
                report.compute_s = time.perf_counter() - started
                report.note = f"copied {victim[:8]}"
                await self.upload(ctx, blob, report)
                return
            await asyncio.sleep(0.2)
        report.note = "found no shard to copy"


KINDS: dict[str, type[Miner]] = {
    "noise": NoiseMiner, "zero": ZeroMiner, "copycat": CopycatMiner, "late": LateMiner,
    "desync": DesyncMiner, "poison": PoisonMiner, "freeloader": FreeloaderMiner,
}


def make_adversary(kind: str, node, state_dir) -> Miner:
    if kind not in KINDS:
        raise ValueError(f"unknown adversary kind '{kind}' (known: {', '.join(KINDS)})")
    return KINDS[kind](node, state_dir, kind=kind)
