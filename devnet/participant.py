"""`crucible devnet miner|validator`: the production node, plugged into the devnet from above.

The devnet runs the same code as mainnet: the same node flags (`neurons.node_config.NODE_FLAGS`),
the same start-up checks (`neurons.node_cli.open_node`) and the same `Miner`/`Validator`. Two things
are injected here, so production code never imports the devnet: the chain client for the
`devnet://host:port` network (`devnet.substrate.devnet_client`; production's `sdk_client` refuses
such a URL and points here), and, for `--adversary KIND`, one of `devnet.adversaries`' `Miner`
subclasses in place of the honest miner. One hparams setting is added too: the devnet's S3 server is
plain http on 127.0.0.1 (devnet/s3.py), which the endpoint policy refuses everywhere else
(protocol/endpoint_policy.py), so every devnet node, however it is started (`crucible devnet run`,
docker/compose.devnet.yml, by hand), accepts http on loopback addresses and nothing more
(`DEVNET_ENDPOINT_OVERRIDES`, before the node's own `--set`s, which may change it). With `--fault-file`
(the launcher's fault plan, devnet/faults.py), the node's bucket pool fails reads of the shards the
file names while it exists: one peer unreachable for this node only, the node's code unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from neurons.flags import FlagError
from neurons.node_config import NODE_FLAGS
from protocol.endpoint_policy import EndpointAllowance
from protocol.hparams import load_hparams

# The devnet's endpoint allowance, as `--set` overrides of HParams.endpoints.
DEVNET_ENDPOINT_OVERRIDES = ("endpoints.allow_http=true", 'endpoints.allow_networks=["127.0.0.0/8", "::1/128"]')


def devnet_endpoints() -> EndpointAllowance:
    """The allowance `DEVNET_ENDPOINT_OVERRIDES` gives (for code that reads a devnet chain directly)."""
    return load_hparams("tiny", list(DEVNET_ENDPOINT_OVERRIDES)).endpoints.allowance()


if TYPE_CHECKING:  # imported when the command runs: building the parser needs no torch
    from neurons.miner import Miner
    from neurons.node import Node
    from neurons.validator import Validator


class DevnetNode:
    """`crucible devnet ROLE`: one command per role, sharing this module."""

    def __init__(self, role: str):
        self.role = role
        self.prog = f"crucible devnet {role}"

    def add_cli(self, parser: argparse.ArgumentParser) -> None:
        NODE_FLAGS.add_to(parser)
        parser.add_argument("--fault-file", metavar="PATH", type=Path, default=None,
                            help="devnet fault plan: shards named in this JSON file, while it exists, are "
                                 "unreachable for this node (devnet/faults.py)")
        if self.role == "miner":
            parser.add_argument("--adversary", metavar="KIND", default=None,
                                help="run an adversarial miner of this kind (see devnet/adversaries.py)")
            parser.add_argument("--quality", metavar="Q", type=float, default=None,
                                help="an honest miner of update quality Q in (0, 1] (devnet/profiles.py)")

    def run_cli(self, args: argparse.Namespace) -> int:
        cfg = NODE_FLAGS.parse(args)  # a bad flag fails before torch is imported
        cfg = cfg.model_copy(update={"overrides": [*DEVNET_ENDPOINT_OVERRIDES, *cfg.overrides]})
        from devnet.substrate import devnet_client

        try:
            client = devnet_client(cfg.chain.network)
        except ValueError as exc:
            raise FlagError(f"--network: {exc}") from None
        from devnet.adversaries import KINDS, make_adversary
        from neurons.miner import Miner
        from neurons.node_cli import run_node
        from neurons.validator import Validator

        kind = getattr(args, "adversary", None)
        if kind is not None and kind not in KINDS:
            raise FlagError(f"--adversary: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        quality = getattr(args, "quality", None)
        if quality is not None and not 0.0 < quality <= 1.0:
            raise FlagError(f"--quality: must be in (0, 1], got {quality}")
        from devnet.profiles import apply_profile
        from neurons.distributed import init_distributed

        dist = init_distributed()  # under torchrun: --miner-ranks, or a validator started by hand with --fsdp
        if self.role == "validator" and dist.active and not cfg.fsdp:
            raise FlagError("--fsdp: a validator under torchrun shards θ (--fsdp); without it every rank would "
                            "run a whole validator under the same hotkey")
        if cfg.fsdp and dist.active:
            from neurons.sharding import sharded_context

            dist = sharded_context(dist)
        if not dist.is_main:
            if self.role == "validator":
                from neurons.validator_cli import _follow as follow_validator

                return follow_validator(cfg, dist)
            from neurons.miner_cli import _follow

            return _follow(cfg, dist)
        built: list[Validator] = []

        fault_file = getattr(args, "fault_file", None)

        def build(node: Node, state_dir: Path) -> Miner | Validator:
            if fault_file is not None:
                from devnet.faults import FaultyPool

                node.pool = FaultyPool(node.pool, fault_file)
            if self.role == "validator":
                built.append(Validator(node, state_dir, dist=dist, precision=cfg.precision))
                return built[0]
            if kind:
                return make_adversary(kind, node, state_dir)
            miner = Miner(node, state_dir, dist=dist, train=cfg.train_settings())
            return apply_profile(miner, quality if quality is not None else 1.0)

        try:
            return asyncio.run(run_node(cfg, self.role, build, prog=self.prog, client=client))
        finally:  # a sharded validator that could not start (or stopped early) still releases its followers
            if built:
                built[0].stop_ranks()
            elif self.role == "validator" and dist.active:
                from neurons.distributed import broadcast_work

                broadcast_work(dist, {"op": "stop"})


MINER = DevnetNode("miner")
VALIDATOR = DevnetNode("validator")
