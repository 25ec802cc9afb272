"""A miner trains only the inner steps that still let it upload before the deadline (neurons/pacing.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import torch

from neurons.miner import Miner, MinerReport
from neurons.node import WindowContext
from neurons.pacing import SAFETY, Pace
from protocol.storage_keys import gradient_key
from protocol.windows import window_bounds

T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def measured(step_s: float = 1.0, finish_s: float = 2.0, block_s: float = 3.0) -> Pace:
    pace = Pace()
    pace.observe_steps(4, 4 * step_s)
    pace.observe_finish(finish_s)
    pace.observe_blocks(T0, T0 + timedelta(seconds=9 * block_s), 9)
    return pace


def test_nothing_measured_trains_every_step():
    assert Pace().steps_that_fit(8, 0.5) == 8  # the first window after a start: as before
    pace = Pace()
    pace.observe_steps(8, 8.0)
    assert pace.steps_that_fit(8, 0.5) == 8  # the upload's time is not known yet either
    assert measured().steps_that_fit(8, None) == 8
    assert Pace().seconds_left(T0, 9) is None  # no block time measured


def test_steps_that_fit_leave_room_for_the_upload():
    pace = measured(step_s=1.0, finish_s=2.0)
    assert pace.steps_that_fit(8, 100.0) == 8  # plenty of time: every planned step
    # 10 s left: 2.5 s kept for the upload, then 7.5 s / 1.25 s per step = 6 steps
    assert pace.steps_that_fit(8, 10.0) == 6
    assert pace.steps_that_fit(8, SAFETY * 2.0 + SAFETY * 1.0 - 1e-9) == 0  # not even one step
    assert pace.steps_that_fit(8, -5.0) == 0  # past the deadline already


def test_seconds_left_from_the_chains_block_time():
    pace = measured(block_s=3.0)
    assert pace.block_s == pytest.approx(3.0)
    # deadline 9 blocks after the window's first block: 27 s after T0
    assert pace.seconds_left(T0, 9, now=T0 + timedelta(seconds=5)) == pytest.approx(22.0)
    assert pace.seconds_left(T0, 9, now=T0 + timedelta(seconds=30)) == pytest.approx(-3.0)


def test_speeds_are_moving_averages_and_ignore_empty_windows():
    pace = Pace()
    pace.observe_steps(4, 4.0)
    pace.observe_steps(4, 8.0)  # a slower window moves the estimate halfway
    assert pace.step_s == pytest.approx(1.5)
    pace.observe_steps(0, 0.0)  # a window that trained nothing says nothing about the speed
    pace.observe_finish(0.0)
    pace.observe_blocks(T0, T0, 9)
    assert pace.step_s == pytest.approx(1.5) and pace.finish_s is None and pace.block_s is None


async def test_a_slow_miner_trains_what_fits_and_skips_what_cannot(network_factory, tmp_path):
    """On a real miner: the planned steps shrink to what the measured speeds allow, in sample order; with
    no step fitting, the window is not trained and nothing is uploaded (the shard would be late)."""
    net = network_factory(miners=1, validators=1, overrides=["inner.steps=16", "inner.batch_size=1"])
    miner = Miner(await net.node("miner-0"), tmp_path / "miner-0")
    window = await miner.node.current_window() + 1
    bounds = window_bounds(window, net.hp.windows)
    ctx = WindowContext(window, bounds, b"\0" * 32, datetime.now(UTC))
    blocks = bounds.deadline_block - bounds.start_block
    samples = miner.node.store.pages(miner.choose_samples(window))
    planned = len(samples) // net.hp.inner.batch_size
    assert planned >= 4

    miner.pace = Pace(step_s=1.0, finish_s=2.0, block_s=100.0)  # a whole window of time: every step
    report = MinerReport(window)
    assert torch.equal(miner.paced(ctx, samples, report), samples) and report.inner_steps == planned

    # deadline `blocks` × 1 s away; 2.5 s kept for the upload; 1.25 s per step
    miner.pace = Pace(step_s=1.0, finish_s=2.0, block_s=1.0)
    fit = (blocks - SAFETY * 2.0) // SAFETY
    assert 0 < fit < planned
    report = MinerReport(window)
    kept = miner.paced(ctx, samples, report)
    assert report.inner_steps == fit and torch.equal(kept, samples[: int(fit) * net.hp.inner.batch_size])
    assert f"trained {int(fit)} of {planned} inner steps" in report.note

    miner.pace = Pace(step_s=1e6, finish_s=1.0, block_s=1.0)  # not even one step
    report = MinerReport(window)
    await miner._train_and_publish(await miner.node.open_window(window), report)  # Miner.step's first half
    assert not report.trained and not report.uploaded and report.inner_steps == 0, report
    assert "not even one inner step fits before the deadline" in report.note
    assert not miner.node.bucket.exists(gradient_key(window, miner.node.hotkey))
    await net.close()


def _paced(pace: Pace, samples: torch.Tensor, blocks: int = 11) -> tuple[torch.Tensor | None, MinerReport]:
    """`Miner.paced` on a stand-in miner (it reads only `hp.inner.batch_size` and `pace`): no network."""
    from types import SimpleNamespace

    miner = SimpleNamespace(hp=SimpleNamespace(inner=SimpleNamespace(batch_size=1)), pace=pace)
    bounds = SimpleNamespace(start_block=0, deadline_block=blocks)
    ctx = SimpleNamespace(window=3, bounds=bounds, start_time=datetime.now(UTC))
    report = MinerReport(3)
    return Miner.paced(miner, ctx, samples, report), report


def test_a_skipped_window_does_not_skip_every_later_one():
    """A window that trains nothing measures nothing: the speeds that made it skip (one window under a load
    spike) must not stay frozen, or every later window skips too, for good. The next window trains every step
    and measures again (before: skipped forever, even once the machine was fast again)."""
    samples = torch.zeros(8, 4, dtype=torch.long)
    pace = Pace(step_s=10.0, finish_s=1.5, block_s=1.0)  # one loaded window: 10 s per step in an 11 s window
    kept, report = _paced(pace, samples)
    assert kept is None and report.inner_steps == 0 and "not even one inner step fits" in report.note
    assert pace.block_s == 1.0  # the chain's block time is still known
    kept, report = _paced(pace, samples)  # the load is gone: train, and measure the speeds again
    assert kept is not None and torch.equal(kept, samples) and report.inner_steps == 8, report
