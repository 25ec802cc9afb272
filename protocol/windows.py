"""Block → window arithmetic shared by every participant.

Window `w` covers the blocks `[w·B, (w+1)·B)` with `B = hparams.windows.blocks_per_window`. A miner
trains during window `w` and must have uploaded its shard by the *upload deadline*: the window's end
plus `upload_grace_blocks`. After the deadline everybody gathers the window's shards and steps.
Because every node derives the window from the chain's block number, nobody needs a clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.hparams import WindowHParams


@dataclass(frozen=True)
class WindowBounds:
    window: int
    start_block: int  # first block of the window
    end_block: int  # first block after the window
    deadline_block: int  # shards uploaded at blocks < deadline_block are on time

    def contains(self, block: int) -> bool:
        return self.start_block <= block < self.end_block

    def on_time(self, block: int) -> bool:
        return self.start_block <= block < self.deadline_block


def window_of(block: int, hp: WindowHParams) -> int:
    """The window a block belongs to."""
    if block < 0:
        raise ValueError(f"block must be ≥ 0, got {block}")
    return block // hp.blocks_per_window


def window_bounds(window: int, hp: WindowHParams) -> WindowBounds:
    """Start, end and upload deadline (in blocks) of a window."""
    if window < 0:
        raise ValueError(f"window must be ≥ 0, got {window}")
    start = window * hp.blocks_per_window
    end = start + hp.blocks_per_window
    return WindowBounds(window, start, end, end + hp.upload_grace_blocks)


def blocks_until_deadline(block: int, window: int, hp: WindowHParams) -> int:
    """Blocks left before `window`'s upload deadline (≤ 0 once it has passed)."""
    return window_bounds(window, hp).deadline_block - block


def window_progress(block: int, hp: WindowHParams) -> float:
    """Fraction of the current window already elapsed, in [0, 1)."""
    return (block % hp.blocks_per_window) / hp.blocks_per_window
