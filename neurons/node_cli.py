"""Flags and start-up checks shared by `crucible miner` and `crucible validator`.

Both commands take the bittensor flags (`--netuid`, `--network`, `--wallet.*`), the hparams
(`--preset`, `--set`), the dataset folder, a local state folder, the device and the node's own
bucket (flags or CRUCIBLE_BUCKET_* environment variables; write keys never leave the machine).
`open_node` refuses to start with one clear line when the wallet is missing, the hotkey is not
registered or the bucket is unreachable, and (re-)commits the bucket's read credentials on chain
when what is there differs.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
from bittensor.wallet import DEFAULT_WALLET_PATH

from neurons.data_cli import add_hparams_arguments
from neurons.node import Node
from protocol.data import DatasetError, PageStore
from protocol.hparams import load_hparams
from protocol.model import build_model
from protocol.storage_config import BucketConfig, BucketCredentials
from transport.bucket import Bucket, StorageError
from transport.chain import Chain, ChainAccessError, ChainConfig

ENV_PREFIX = "CRUCIBLE_BUCKET_"
BUCKET_FIELDS = {
    "endpoint": "S3 endpoint URL (R2: https://ACCOUNT.r2.cloudflarestorage.com)",
    "region": "signing region ('auto' on R2)",
    "name": "bucket name",
    "read-key": "read-only access key id (published on chain)",
    "read-secret": "read-only secret (published on chain)",
    "write-key": "write access key id (stays on this machine)",
    "write-secret": "write secret (stays on this machine)",
}


def add_chain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the bittensor-convention chain flags shared by every Crucible command."""
    group = parser.add_argument_group("chain")
    group.add_argument("--netuid", type=int, required=False, default=None, help="Subnet uid.")
    group.add_argument("--network", "--subtensor.network", dest="network", default="finney",
                       help="finney | test | local | ws(s)://host:port | devnet://host:port (default finney).")
    group.add_argument("--wallet.name", dest="wallet_name", default="default", help="Wallet name.")
    group.add_argument("--wallet.hotkey", dest="wallet_hotkey", default="default", help="Hotkey name.")
    group.add_argument("--wallet.path", dest="wallet_path", default=DEFAULT_WALLET_PATH, help="Wallet folder.")
    return parser


def chain_config_from_args(args: argparse.Namespace, default_netuid: int | None = None) -> ChainConfig:
    netuid = args.netuid if args.netuid is not None else default_netuid
    if netuid is None:
        raise ValueError("--netuid is required")
    return ChainConfig(network=args.network, netuid=netuid, wallet_name=args.wallet_name,
                       wallet_hotkey=args.wallet_hotkey, wallet_path=args.wallet_path)


class StartupError(RuntimeError):
    """A reason the node cannot start, as one line for the operator."""


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    add_chain_arguments(parser)
    add_hparams_arguments(parser)
    parser.add_argument("--data", type=Path, default=Path("data/tiny"), help="prepared dataset folder")
    parser.add_argument("--state-dir", type=Path, default=None, help="local state folder (default ~/.crucible/HOTKEY)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--windows", type=int, default=None, help="stop after this many windows (default: run forever)")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    parser.add_argument("--metrics.port", dest="metrics_port", type=int, default=None,
                        help="serve Prometheus metrics on 127.0.0.1:PORT (default: off)")
    parser.add_argument("--metrics.addr", dest="metrics_addr", default="127.0.0.1",
                        help="address the metrics endpoint binds (0.0.0.0 inside a container)")
    group = parser.add_argument_group("bucket (flags or environment variables)")
    for name, help_text in BUCKET_FIELDS.items():
        env = ENV_PREFIX + name.upper().replace("-", "_")
        group.add_argument(f"--bucket.{name}", dest=f"bucket_{name.replace('-', '_')}", default=os.environ.get(env),
                           help=f"{help_text} [${env}]")


def start_metrics(args: argparse.Namespace, role: str):
    """A NodeMetrics served on --metrics.port, or None when the flag is not given."""
    if args.metrics_port is None:
        return None
    from neurons.metrics import NodeMetrics

    metrics = NodeMetrics(role)
    metrics.serve(args.metrics_port, args.metrics_addr)
    return metrics


def bucket_credentials(args: argparse.Namespace) -> BucketCredentials:
    values = {name: getattr(args, f"bucket_{name.replace('-', '_')}") for name in BUCKET_FIELDS}
    missing = [name for name in ("name", "read-key", "read-secret", "write-key", "write-secret") if not values[name]]
    if missing:
        raise StartupError(f"bucket not configured: set --bucket.{missing[0]} (or ${ENV_PREFIX}"
                           f"{missing[0].upper().replace('-', '_')})")
    try:
        common = dict(endpoint_url=values["endpoint"], region=values["region"] or "auto", bucket=values["name"])
        return BucketCredentials(
            read=BucketConfig(**common, access_key_id=values["read-key"], secret_access_key=values["read-secret"]),
            write=BucketConfig(**common, access_key_id=values["write-key"], secret_access_key=values["write-secret"]),
        )
    except ValueError as exc:
        raise StartupError(f"bad bucket settings: {str(exc).splitlines()[0]}") from None


async def open_node(args: argparse.Namespace, need_permit: bool = False) -> tuple[Node, Path]:
    """Build and check everything a miner or validator needs; StartupError with one line otherwise."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hp = load_hparams(args.preset, args.overrides)
    try:
        config = chain_config_from_args(args)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    creds = bucket_credentials(args)
    chain = Chain(config)
    try:
        hotkey = chain.hotkey
    except Exception as exc:  # the SDK raises several types for a missing or unreadable keyfile
        raise StartupError(f"wallet '{config.wallet_name}/{config.wallet_hotkey}' not usable under "
                           f"{config.wallet_path}: {exc}") from None
    try:
        await chain.connect()
        graph = await chain.metagraph()
    except ChainAccessError as exc:
        raise StartupError(f"chain {config.network}: {exc}") from None
    uid = graph.uid_of(hotkey)
    if uid is None:
        raise StartupError(f"hotkey {hotkey} is not registered on subnet {config.netuid}")
    if need_permit and not graph.validator_permit[uid]:
        raise StartupError(f"uid {uid} ({hotkey}) has no validator permit on subnet {config.netuid}")
    bucket = Bucket(creds.write_config())
    try:
        bucket.list("peers/")
    except StorageError as exc:
        raise StartupError(f"bucket '{creds.read.bucket}' unreachable: {exc}") from None
    try:
        store = PageStore(args.data, hp)
    except DatasetError as exc:
        raise StartupError(f"dataset: {exc}") from None
    model = build_model(hp, args.device)
    node = Node(hp, chain, bucket, store, model)
    await ensure_commitment(node, creds)
    state_dir = args.state_dir or Path.home() / ".crucible" / hotkey
    return node, state_dir


async def ensure_commitment(node: Node, creds: BucketCredentials) -> None:
    """Commit our read credentials on chain unless exactly these are already there."""
    current = await node.credentials(refresh=True)
    if current.get(node.hotkey) == creds.read:
        return
    await node.chain.commit_credentials(creds.read_only())
    await node.credentials(refresh=True)
