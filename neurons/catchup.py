"""Joining late or restarting: get to the global θ at the start of the current window.

A node starts from its own saved state if it has one, else from the latest checkpoint a validator
published, else from the network's deterministic θ_0. It then replays every window since, in
order, exactly as live nodes stepped: with the window's `AggregateRecord` (the exact shards, checked
by content hash, from the publishing validator's mirror first) and no step for a window that had no
record in time (live nodes did not step either). Afterwards the node is in sync for the next
window, not one behind.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from neurons.node import Directory, Node
from protocol.model import CheckpointError, build_model, load_checkpoint
from protocol.storage_keys import (
    CHECKPOINT_CONFIG_FILE,
    CHECKPOINT_MODEL_FILE,
    KeyKind,
    checkpoint_key,
    parse_key,
)
from transport.bucket import Bucket
from transport.bucket_errors import StorageError
from transport.fetch import first_from_validators

log = logging.getLogger(__name__)
MAX_RECORD_BYTES = 256 * 1024


async def load_latest_checkpoint(node: Node, before_window: int, directory: Directory) -> int | None:
    """Load the newest validator checkpoint of θ at the start of a window ≤ before_window into the model.

    Returns that window, or None when no usable checkpoint exists (the model is then left as it is).
    A checkpoint is a validator's untrusted output: one that cannot be downloaded (`StorageError`) or
    loaded (`CheckpointError`: garbage, truncated, not float32, ...) is logged and the next older one is tried.
    """
    limit = 4 * sum(p.numel() for p in node.model.parameters()) + (1 << 20)  # float32 θ + its header

    async def newest(uid: int, hotkey: str, bucket: Bucket) -> int | None:
        objects = await asyncio.to_thread(bucket.list, f"{KeyKind.CHECKPOINT}/")
        windows = sorted({p.window for o in objects if (p := parse_key(o.key)) and p.name == CHECKPOINT_MODEL_FILE
                          and p.window is not None and p.window <= before_window}, reverse=True)
        for window in windows:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    await asyncio.to_thread(bucket.get_file, checkpoint_key(window), Path(tmp) / CHECKPOINT_MODEL_FILE,
                                            limit)
                    config = await asyncio.to_thread(bucket.get, checkpoint_key(window, CHECKPOINT_CONFIG_FILE), 1 << 20)
                    (Path(tmp) / CHECKPOINT_CONFIG_FILE).write_bytes(config)
                    loaded = load_checkpoint(tmp, node.hp)
                except StorageError as exc:
                    log.warning("checkpoint %d of validator uid %d could not be downloaded: %s", window, uid, exc)
                    continue
                except CheckpointError as exc:
                    log.warning("checkpoint %d of validator uid %d unusable: %s", window, uid, exc)
                    continue
            node.model.load_state_dict(loaded.state_dict())
            log.info("loaded checkpoint of window %d from validator uid %d", window, uid)
            return window
        return None

    graph, credentials = directory
    return await first_from_validators(graph, credentials, node.pool, newest, "checkpoints")


class OutOfSync(RuntimeError):
    """This node's θ is not the network's: a record's θ digest differs, or a record cannot be reproduced."""


async def replay_window(node: Node, window: int, directory: Directory | None = None) -> str:
    """Apply one past window's update, exactly as its aggregate record names it; returns what was done.

    OutOfSync when the record says θ at the window's start was something else than this node holds.
    """
    ctx = await node.window(window, directory)
    try:
        found = await node.find_record(ctx, replaying=True)
    except StorageError as exc:
        raise OutOfSync(f"window {window}: a validator's aggregate record could not be read ({exc}); "
                        "cannot tell which record the network applied") from None
    if found is None:
        return f"window {window}: no aggregate record was published in time; nothing to replay"
    if (drift := node.drift(found.record)) is not None:
        raise OutOfSync(f"window {window}: {drift}")
    result = await node.gather_record(ctx, found)
    if result.used != found.record.peers:
        missing = sorted(set(found.record.peers) - set(result.used))
        raise OutOfSync(f"window {window}: shards of {missing} unavailable or changed ({result.skipped}); "
                        "cannot replay it")
    node.apply(result)
    return f"window {window}: replayed the record of {len(result.used)} peers"


async def catch_up(node: Node, model_window: int | None, target_window: int) -> int:
    """Bring the model from the start of `model_window` (None: unknown) to the start of `target_window`.

    Raises OutOfSync when a replayed window's record disagrees with this node's θ or cannot be
    reproduced: the node then holds θ at the start of that window's predecessor chain, not the network's.
    """
    if model_window is not None and model_window == target_window:
        return target_window
    directory = await node.directory()  # one read of who is registered, for every window replayed
    if model_window is None or model_window > target_window:
        checkpoint = await load_latest_checkpoint(node, target_window, directory)
        if checkpoint is None:
            node.model.load_state_dict(build_model(node.hp, "cpu").state_dict())  # θ_0, on every node alike
        model_window = checkpoint if checkpoint is not None else first_window(node, target_window)
    for window in range(model_window, target_window):
        log.info(await replay_window(node, window, directory))
    return target_window


async def sync_to(node: Node, model_window: int | None, target_window: int) -> int:
    """`catch_up` for start-up and skipping ahead: a window that cannot be replayed is logged, not fatal.

    The node then carries on; the next record's θ digest shows the drift and starts `recover`.
    """
    try:
        return await catch_up(node, model_window, target_window)
    except OutOfSync as exc:
        log.warning("not in sync after catch-up: %s; recovery is retried at the next window", exc)
        return target_window


async def recover(node: Node, target_window: int) -> str | None:
    """From the latest checkpoint (else θ_0), replay the records up to `target_window`; None if in sync now.

    Never claims a sync it does not have: the reason is returned when a record cannot be replayed.
    """
    try:
        await catch_up(node, None, target_window)
    except OutOfSync as exc:
        return str(exc)
    return None


def first_window(node: Node, target_window: int) -> int:
    """With no checkpoint, θ_0 is the model at the start of the retention horizon."""
    return max(0, target_window - node.hp.checkpoints.retention_windows)
