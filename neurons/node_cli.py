"""Start-up shared by `crucible miner`, `crucible validator` and the devnet's `crucible devnet miner|validator`.

`open_node` turns a `NodeConfig` into a checked, connected `Node`: it refuses to start with one
clear line when the wallet is missing, the hotkey is not registered (or has no validator permit),
the bucket is unreachable or the dataset does not match the hparams, and it (re-)commits the
bucket's read credentials on chain when what is there differs. `run_node` is the rest of a node's
life (parse and build are the caller's): open, build the role, serve metrics, run, close.

The chain client is the one seam: production passes none and `Chain` dials the network by name;
the devnet passes its own `bt.Client` (`devnet.substrate.devnet_client`), so the devnet runs this
very code without production code knowing the devnet exists.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import bittensor as bt

from neurons.metrics import NodeMetrics
from neurons.node import Node
from neurons.node_config import MetricsConfig, NodeConfig, bucket_credentials
from protocol.data import DatasetError, DataStore, PageStore, build_manifest, manifest_hash
from protocol.hparams import HParams
from protocol.model import build_model
from protocol.storage_config import BucketCredentials
from transport.bucket import Bucket, StorageError
from transport.chain import Chain, ChainAccessError


class StartupError(RuntimeError):
    """A reason the node cannot start, as one line for the operator."""


class Role(Protocol):
    """What `run_node` runs: a `Miner` (or an adversary) or a `Validator`."""

    metrics: NodeMetrics | None

    async def run(self, windows: int | None = None) -> None: ...


# Libraries whose INFO lines (connection attempts, HTTP requests, weight-loading notes) are noise in a node
# log; they log at WARNING unless --logging.trace.
NOISY_LOGGERS = ("bittensor", "botocore", "boto3", "s3transfer", "urllib3", "aiohttp", "asyncio", "websockets",
                 "transformers", "filelock", "matplotlib", "PIL")


def configure_logging(cfg: NodeConfig) -> None:
    """Root logger at the node's level, 24-hour timestamps; third-party libraries quiet unless TRACE."""
    logging.basicConfig(level=cfg.python_log_level(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    if cfg.log_level == "TRACE":
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, cfg.python_log_level()))
    # transformers has its own handler and tqdm bars, which bypass the root logger
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def start_metrics(config: MetricsConfig, role: str) -> NodeMetrics | None:
    """A NodeMetrics served on --metrics.port, or None when the flag is not given."""
    if config.port is None:
        return None
    metrics = NodeMetrics(role)
    metrics.serve(config.port, config.addr)
    return metrics


async def open_node(cfg: NodeConfig, need_permit: bool = False,
                    client: bt.Client | None = None) -> tuple[Node, Path]:
    """Build and check everything a miner or validator needs; StartupError with one line otherwise.

    `client`: a ready `bt.Client` to reach the chain through (the devnet's); None dials `cfg.chain.network`.
    """
    configure_logging(cfg)
    hp = cfg.hparams()
    try:
        endpoints = hp.endpoints.allowance()  # the network's endpoint policy (protocol/endpoint_policy.py)
        chain = Chain(cfg.chain, client=client, endpoints=endpoints)
        creds = bucket_credentials(cfg.bucket, endpoints, cfg.bucket_allow_private)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    try:
        node = await _checked_node(cfg, chain, creds, hp, need_permit)
    except BaseException:
        await chain.close()
        raise
    return node, cfg.state_folder(node.hotkey)


async def _checked_node(cfg: NodeConfig, chain: Chain, creds: BucketCredentials, hp: HParams,
                        need_permit: bool) -> Node:
    config = cfg.chain
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
    store = await open_store(cfg, hp, hotkey, chain)
    node = Node(hp, chain, bucket, store, build_model(hp, cfg.torch_device()))
    await ensure_commitment(node, creds)
    return node


async def open_store(cfg: NodeConfig, hp: HParams, hotkey: str, chain: Chain) -> DataStore:
    """The pinned dataset from its bucket (hparams data.bucket), else the --data folder; StartupError otherwise.

    A remote store prefetches this node's pages for the current and the next window at once, then each
    next window's as the miner asks for a window's pages. A local folder is checked against a pinned
    data.manifest_hash too."""
    try:
        location = hp.data.location(hp.endpoints.allowance())
    except ValueError as exc:
        raise StartupError(f"dataset bucket (hparams data.*): {str(exc).splitlines()[-1].strip()}") from None
    try:
        if location is None:
            store = PageStore(cfg.data, hp)
            if hp.data.manifest_hash is not None:
                raw = build_manifest(cfg.data)[0].to_json()
                if manifest_hash(raw) != hp.data.manifest_hash:
                    raise DatasetError(f"{cfg.data} has manifest hash {manifest_hash(raw)[:16]}…, the network pins "
                                       f"data.manifest_hash {hp.data.manifest_hash[:16]}…: a different dataset")
            return store
        from transport.dataset import RemotePageStore

        cache = cfg.state_folder(hotkey) / "dataset"
        store = await asyncio.to_thread(RemotePageStore, location, hp.data.manifest_hash, cache, hp,
                                        cache_bytes=cfg.data_cache_mb << 20)
    except DatasetError as exc:
        raise StartupError(f"dataset: {exc}") from None
    try:
        window = await chain.block() // hp.windows.blocks_per_window
    except Exception:  # the SDK raises several types; no prefetch at start then, pages come on demand
        return store
    store.follow(hotkey, hp.data.seed, hp.samples_per_window, window)
    return store


async def ensure_commitment(node: Node, creds: BucketCredentials) -> None:
    """Commit our read credentials on chain unless exactly these are already there."""
    current = await node.credentials()
    if current.get(node.hotkey) == creds.read:
        return
    await node.chain.commit_credentials(creds.read_only())


async def run_node(cfg: NodeConfig, role: str, build: Callable[[Node, Path], Role], *, prog: str,
                   client: bt.Client | None = None) -> int:
    """Open the node, build the role on it, run `cfg.windows` windows (or forever), close the chain.

    Exit code 1 with one line on stderr when the node cannot start; 0 when the run ends."""
    try:
        node, state_dir = await open_node(cfg, need_permit=role == "validator", client=client)
    except StartupError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    try:
        runner = build(node, state_dir)
        runner.metrics = start_metrics(cfg.metrics, role)
        await runner.run(cfg.windows)
    finally:
        await node.chain.close()
    return 0
