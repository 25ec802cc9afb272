"""A small real network for neuron tests: devnet chain process + rclone S3 + the tiny dataset.

`network_factory(miners=2, validators=1)` starts a chain with those wallets registered (validators
staked), one bucket per participant on the session S3 server, and returns a `TestNetwork` whose
`node(name)` builds a connected `Node` with its read credentials committed on chain — the same
objects `crucible miner` / `crucible validator` build, minus argument parsing.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from devnet.bootstrap import BootstrapConfig, subnet_params_for
from devnet.participant import DEVNET_ENDPOINT_OVERRIDES
from devnet.s3 import S3Server
from neurons.node import Node
from neurons.node_cli import ensure_commitment
from protocol.data import PageStore
from protocol.hparams import HParams, load_hparams
from protocol.model import build_model
from tests.plugins.chain import ChainProcess, start_chain
from transport.bucket import Bucket, BucketCredentials, StorageConfig

# Windows of 20 blocks at 0.25 s (5 s): room for a few tiny inner steps on 2 shared cores. The buckets
# are on the session S3 server, http on 127.0.0.1: the devnet's endpoint allowance, as `crucible devnet`.
NET_OVERRIDES = [
    "windows.blocks_per_window=20", "windows.upload_grace_blocks=2", "inner.steps=2", "inner.batch_size=4",
    "gauntlet.eval_batches=1", "checkpoints.every_windows=2", "peers.primary=4", "peers.reserve=2",
    *DEVNET_ENDPOINT_OVERRIDES,
    "fetch.record_grace_blocks=12", "fetch.poll_seconds=0.5", "fetch.object_seconds=4",
]
BLOCK_TIME_S = 0.25
# A test sets up its nodes (about 1.5 s on 2 loaded cores), then waits for the next window to start: the
# chain starts this many seconds before window 1 instead of a whole window before it (5 s here, 8 s with
# 32-block windows), so the wait is short. A slower setup only waits for window 2, as it always could.
FIRST_WINDOW_LEAD_S = 3.0


def lead_in(hp: HParams, block_time: float = BLOCK_TIME_S) -> int:
    """`start_chain(start_block=...)`: the head at start, FIRST_WINDOW_LEAD_S before window 1 starts."""
    return max(0, hp.windows.blocks_per_window - math.ceil(FIRST_WINDOW_LEAD_S / block_time))


NET_STORAGE = StorageConfig(connect_timeout_s=2.0, read_timeout_s=20.0, max_attempts=3,
                            backoff_base_s=0.05, backoff_max_s=0.2)


@dataclass
class TestNetwork:
    chain: ChainProcess
    s3: S3Server
    hp: HParams
    store: PageStore
    nodes: list[Node] = field(default_factory=list)
    tag: str = field(default_factory=lambda: secrets.token_hex(4))

    async def node(self, name: str, endpoint: str | None = None) -> Node:
        """A connected node with its bucket's read credentials committed on chain.

        `endpoint` puts the node's bucket behind another server (e.g. the hostile proxy of
        tests/plugins/hostile_s3.py in front of the same rclone): the node writes through it and
        commits it, so every other node reads this node's shards from there. It must pass the
        network's endpoint allowance (http on 127.0.0.0/8 here) like any committed endpoint.
        """
        chain = self.chain.chain(name)
        chain.endpoints = self.hp.endpoints.allowance()  # what open_node gives a node: the network's allowance
        await chain.connect()
        bucket_name = f"b-{self.tag}-{name}"  # fresh per network: no object of an earlier test is found
        self.s3.ensure_bucket(bucket_name)
        creds = self.s3.credentials(bucket_name)
        if endpoint is not None:
            creds = BucketCredentials(read=creds.read.model_copy(update={"endpoint_url": endpoint}),
                                      write=creds.write_config().model_copy(update={"endpoint_url": endpoint}))
        bucket = Bucket(creds.write_config(), NET_STORAGE)
        node = Node(self.hp, chain, bucket, self.store, build_model(self.hp))
        await ensure_commitment(node, creds)
        self.nodes.append(node)
        return node

    async def publish(self, validator, window: int):
        """The validator's on-time duty for one window (its record), as `Validator.run` does alongside scoring."""
        ctx = await validator.node.window(window)
        miners = [hk for hk in ctx.graph.hotkeys if hk != validator.node.hotkey]
        return await validator.publisher.publication(ctx, miners)

    async def close(self) -> None:
        for node in self.nodes:
            await node.chain.close()


@pytest.fixture
def network_factory(tmp_path_factory, bt_cache_env, s3_server, tiny_store) -> Iterator[Callable[..., TestNetwork]]:
    started: list[ChainProcess] = []

    def make(miners: int = 2, validators: int = 1, overrides: list[str] | None = None) -> TestNetwork:
        hp = load_hparams("tiny", NET_OVERRIDES + (overrides or []))
        cfg = BootstrapConfig(miners=miners, validators=validators, subnet=subnet_params_for(hp))
        chain = start_chain(tmp_path_factory.mktemp("net"), cfg, block_time=BLOCK_TIME_S, start_block=lead_in(hp))
        started.append(chain)
        return TestNetwork(chain, s3_server, hp, tiny_store)

    yield make
    for chain in started:
        chain.stop()
