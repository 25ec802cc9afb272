"""How many inner steps a miner can train this window and still upload before the deadline.

A miner trains its assigned samples in H = ⌈samples / inner.batch_size⌉ inner steps, then encodes, signs
and uploads its shard. A shard that reaches the bucket after the window's deadline block counts for
nothing (`protocol.windows.WindowBounds.on_time`; docs/protocol.md §3). A fixed H fits the hardware a
preset was sized for. On a slower or busier machine the last steps run past the deadline, and the whole
window's work is thrown away.

`Pace` keeps that window. It measures three things, each as an exponential moving average of the
windows seen so far:
- the seconds per inner step;
- the seconds from the end of training to the end of the upload;
- the chain's seconds per block (from the window's start and deadline block timestamps).

From these it plans the steps that fit before the deadline, with a safety factor, and always in order.
The first samples are the ones trained. The shard still names every assigned sample
(`data_digest`): a miner that trains fewer steps simply shows less memory of its samples in the
Gauntlet, and is paid less. Nothing is planned before anything has been measured: the first window
after a start trains all H steps, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

SAFETY = 1.25  # measured seconds are stretched by this much when planning (a step can run slower than the last ones)
EMA = 0.5  # weight of the newest window in each moving average


@dataclass(frozen=True)
class Plan:
    """One window's training plan: the rows to train (None: not trained) and what to tell the operator."""

    samples: torch.Tensor | None  # [steps · batch, seq_len], the window's first samples; None when no step fits
    steps: int  # inner steps planned
    note: str  # "" when every step fits, else why fewer (seconds left, per step, to encode and upload)


@dataclass
class Pace:
    """Measured speeds of this miner; `None` until a window has measured them."""

    step_s: float | None = None  # seconds per inner step (training only)
    finish_s: float | None = None  # seconds from the end of training to the end of the upload
    block_s: float | None = None  # the chain's seconds per block

    def observe_steps(self, steps: int, seconds: float) -> None:
        if steps > 0 and seconds > 0:
            self.step_s = _ema(self.step_s, seconds / steps)

    def observe_finish(self, seconds: float) -> None:
        if seconds > 0:
            self.finish_s = _ema(self.finish_s, seconds)

    def observe_blocks(self, start: datetime, deadline: datetime, blocks: int) -> None:
        """The chain timestamps of a window's first block and of its deadline block, `blocks` apart."""
        seconds = (deadline - start).total_seconds()
        if blocks > 0 and seconds > 0:
            self.block_s = _ema(self.block_s, seconds / blocks)

    def seconds_left(self, start: datetime, blocks_to_deadline: int, now: datetime | None = None) -> float | None:
        """Seconds from `now` until the deadline block, `blocks_to_deadline` after the block stamped `start`."""
        if self.block_s is None:
            return None
        deadline = start.timestamp() + blocks_to_deadline * self.block_s
        return deadline - (now or datetime.now(UTC)).timestamp()

    def forget_speeds(self) -> None:
        """Drop the measured step and finish seconds (not the chain's block time). Called after a window that
        trained nothing: such a window measures nothing, so without this the speeds that said "not even one
        step fits" (one window under a load spike, one slow upload) would stay as they are and skip every
        later window for good. The next window trains every step, as after a start, and measures afresh."""
        self.step_s = self.finish_s = None

    def steps_that_fit(self, planned: int, seconds_left: float | None) -> int:
        """How many of `planned` inner steps fit in `seconds_left`, leaving room to encode and upload.

        Returns `planned` while any speed is still unmeasured (or `seconds_left` is unknown), and 0 when not
        even one step fits."""
        if seconds_left is None or self.step_s is None or self.finish_s is None:
            return planned
        room = seconds_left - SAFETY * self.finish_s
        return max(0, min(planned, math.floor(room / (SAFETY * self.step_s))))

    def plan(self, samples: torch.Tensor, batch: int, start: datetime, blocks_to_deadline: int) -> Plan:
        """The first of the window's `samples` [n, seq_len] that leave time to encode and upload before the
        deadline block, `blocks_to_deadline` after the block stamped `start`. A window that cannot train one
        step forgets the speeds (`forget_speeds`), so the next one measures afresh."""
        planned = math.ceil(len(samples) / batch)
        left = self.seconds_left(start, blocks_to_deadline)
        steps = self.steps_that_fit(planned, left)
        if steps == 0:
            self.forget_speeds()
            room = f"{left:.1f} s left" if left is not None else "no samples"
            return Plan(None, 0, f"not even one inner step fits before the deadline ({room}); not trained "
                                 "(the next window trains every step and measures the speeds again). ")
        if steps == planned:
            return Plan(samples, steps, "")
        note = (f"trained {steps} of {planned} inner steps: more would miss the deadline ({left:.1f} s left, "
                f"{self.step_s:.2f} s per step, {self.finish_s:.2f} s to encode and upload). ")
        return Plan(samples[: steps * batch].clone(), steps, note)  # own storage: followers get only these rows


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
