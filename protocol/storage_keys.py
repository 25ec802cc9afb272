"""The bucket key layout: the one place that says where every kind of object lives.

Miners, validators and the cleanup all derive keys from these functions, and parse them back with
`parse_key`, so a layout change is a change here only. Windowed keys carry the window as a plain
decimal path segment; the cleanup deletes by that window. Dataset pages carry no window and are
never cleaned.

    gradients/{window}/{hotkey}.safetensors   a miner's shard (its sync debug sample is inside it)
    peers/{window}.json                       a validator's peer list for the window
    aggregates/{window}.json                  which shards made the window's aggregated update (signed)
    checkpoints/{window}/{file}               a checkpoint of θ: model.safetensors, config.json, ...
    dataset/{path}                            tokenized pages and their manifest (not windowed)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class KeyKind(StrEnum):
    GRADIENT = "gradients"
    PEERS = "peers"
    AGGREGATE = "aggregates"
    CHECKPOINT = "checkpoints"
    MIRROR = "mirror"
    DATASET = "dataset"


WINDOWED_KINDS = (KeyKind.GRADIENT, KeyKind.PEERS, KeyKind.AGGREGATE, KeyKind.CHECKPOINT, KeyKind.MIRROR)

SHARD_SUFFIX = ".safetensors"
CHECKPOINT_MODEL_FILE = "model.safetensors"
CHECKPOINT_CONFIG_FILE = "config.json"

# Hotkeys are SS58 addresses on chain; any short token of safe characters is accepted so tests and
# tools can use readable names, but never a path separator or a dot that could escape the layout.
_HOTKEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_WINDOW_RE = re.compile(r"0|[1-9][0-9]{0,17}")
_MAX_DATASET_KEY = 512


class InvalidKey(ValueError):
    """A key or a key component that does not fit the layout."""


def _window(window: int) -> str:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise InvalidKey(f"window must be an int ≥ 0, got {window!r}")
    return str(window)


def _hotkey(hotkey: str) -> str:
    if not isinstance(hotkey, str) or not _HOTKEY_RE.fullmatch(hotkey):
        raise InvalidKey(f"hotkey must be 1-64 chars of [A-Za-z0-9_-], got {hotkey!r}")
    return hotkey


def _file(name: str) -> str:
    if not isinstance(name, str) or not _FILE_RE.fullmatch(name) or ".." in name:
        raise InvalidKey(f"file name must be 1-128 chars of [A-Za-z0-9_.-] without '..', got {name!r}")
    return name


def gradient_prefix(window: int) -> str:
    return f"{KeyKind.GRADIENT}/{_window(window)}/"


def gradient_key(window: int, hotkey: str) -> str:
    """Where `hotkey` uploads its shard for `window`."""
    return f"{gradient_prefix(window)}{_hotkey(hotkey)}{SHARD_SUFFIX}"


def mirror_key(window: int, hotkey: str) -> str:
    """A validator's copy of `hotkey`'s shard for `window`, as named (by content hash) in its aggregate record."""
    return f"{KeyKind.MIRROR}/{_window(window)}/{_hotkey(hotkey)}{SHARD_SUFFIX}"


def peers_key(window: int) -> str:
    """The peer list (JSON) a validator publishes for `window`."""
    return f"{KeyKind.PEERS}/{_window(window)}.json"


def aggregate_key(window: int) -> str:
    """The aggregated update of `window`, replayed by nodes catching up from a checkpoint."""
    return f"{KeyKind.AGGREGATE}/{_window(window)}.json"


def checkpoint_prefix(window: int) -> str:
    """The folder holding every file of the checkpoint taken at `window`."""
    return f"{KeyKind.CHECKPOINT}/{_window(window)}/"


def checkpoint_key(window: int, name: str = CHECKPOINT_MODEL_FILE) -> str:
    """One file of the checkpoint taken at `window`."""
    return checkpoint_prefix(window) + _file(name)


def dataset_key(path: str) -> str:
    """A dataset object under `dataset/`; `path` is relative, made of safe '/'-separated names."""
    if not isinstance(path, str) or not path or len(path) > _MAX_DATASET_KEY:
        raise InvalidKey(f"dataset path must be a non-empty string of at most {_MAX_DATASET_KEY} chars")
    for part in path.split("/"):
        _file(part)
    return f"{KeyKind.DATASET}/{path}"


@dataclass(frozen=True)
class ParsedKey:
    kind: KeyKind
    window: int | None  # None for dataset keys
    hotkey: str | None = None  # gradients only
    name: str | None = None  # checkpoint file name, or dataset path


def parse_key(key: str) -> ParsedKey | None:
    """The kind, window and parts of a layout key; None for a key outside the layout."""
    head, _, rest = key.partition("/")
    try:
        kind = KeyKind(head)
    except ValueError:
        return None
    try:
        if kind is KeyKind.DATASET:
            return ParsedKey(kind, None, name=rest) if dataset_key(rest) == key else None
        if kind in (KeyKind.PEERS, KeyKind.AGGREGATE):
            suffix = ".json"
            if not rest.endswith(suffix) or not _WINDOW_RE.fullmatch(rest[: -len(suffix)]):
                return None
            return ParsedKey(kind, int(rest[: -len(suffix)]))
        win, _, leaf = rest.partition("/")
        if not _WINDOW_RE.fullmatch(win):
            return None
        if kind in (KeyKind.GRADIENT, KeyKind.MIRROR):
            if not leaf.endswith(SHARD_SUFFIX):
                return None
            hotkey = leaf[: -len(SHARD_SUFFIX)]
            make = gradient_key if kind is KeyKind.GRADIENT else mirror_key
            return ParsedKey(kind, int(win), hotkey=hotkey) if make(int(win), hotkey) == key else None
        return ParsedKey(kind, int(win), name=leaf) if checkpoint_key(int(win), leaf) == key else None
    except InvalidKey:
        return None


def window_of_key(key: str) -> int | None:
    """The window a layout key belongs to; None for dataset keys and keys outside the layout."""
    parsed = parse_key(key)
    return parsed.window if parsed else None
