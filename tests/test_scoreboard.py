"""The devnet scoreboard's held-out series: one point per scored window, each the loss of exactly the θ the
validator saved for it, whatever the order in which the watcher sees the validator's two files."""

from __future__ import annotations

import torch

from devnet.scoreboard import HeldoutEvaluator, ScoreWatcher, build_rows
from gauntlet.records import WindowEntry
from gauntlet.state import ScoringState, UidState, save_state
from neurons.local_state import save_local_state
from neurons.node_files import SCORES_FILE
from neurons.training import mean_loss
from protocol.model import build_model


class NoChain:
    async def metagraph(self):
        raise ConnectionError("no chain in this test")


def theta(hp, k: int) -> torch.nn.Module:
    """A distinct model per window: θ_0 moved by k small steps."""
    model = build_model(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.05 * k)
    return model


def scored(folder, window: int) -> None:
    """The validator's first write of a window: scores.json with the window scored."""
    history = [WindowEntry(window=w, hotkey="h1", present=True, timely=True, mu=25.0, sigma=8.0, copy_factor=0.0,
                           copied_from=2) for w in range(window + 1)]
    save_state(ScoringState(last_window=window, uids={1: UidState(hotkey="h1", mu=25.0, sigma=8.0, history=history)}),
               folder / SCORES_FILE)


async def test_one_heldout_point_per_scored_window_on_exactly_the_saved_theta(tmp_path, tiny_hp, tiny_dataset):
    folder = tmp_path / "validator-0"
    folder.mkdir()
    evaluator = HeldoutEvaluator(tiny_hp, tiny_dataset.path, pages=2)
    watcher = ScoreWatcher(folder, [], evaluator)
    models = {w: theta(tiny_hp, w) for w in range(1, 6)}
    expected = {w: mean_loss(models[w], evaluator.samples) for w in models}
    assert len(set(expected.values())) == len(expected)  # a repeat would be visible
    chain, snaps = NoChain(), []

    async def saved(window: int) -> None:  # the validator's second write: θ at the start of window + 1
        save_local_state(folder, window + 1, tiny_hp.revision(), models[window + 1])

    # window 0: the watcher polls between the two writes (the race the old code lost), then after both
    scored(folder, 0)
    assert await watcher.poll(chain, 10) == []  # scores are there, θ of window 1 is not: wait
    await saved(0)
    snaps += await watcher.poll(chain, 11)
    assert await watcher.poll(chain, 12) == []  # nothing new: no second point for the same θ
    # windows 1-3: the watcher sees both writes at once; window 4: it polls twice before θ arrives
    for w in (1, 2, 3):
        scored(folder, w)
        await saved(w)
        snaps += await watcher.poll(chain, 20 + w)
    scored(folder, 4)
    assert await watcher.poll(chain, 30) == [] and await watcher.poll(chain, 31) == []
    await saved(4)
    snaps += await watcher.poll(chain, 32)

    assert [s.window for s in snaps] == [0, 1, 2, 3, 4]  # one snapshot per scored window, in order
    assert [s.model_window for s in snaps] == [1, 2, 3, 4, 5]  # each with the θ it produced
    for s in snaps:
        assert s.heldout_loss == expected[s.model_window], s.window  # strictly the saved θ's loss
    assert snaps[0].rows[0].status == "copy of uid 2"  # readable: not "copy x0"


async def test_a_window_whose_theta_was_overwritten_is_reported_without_a_loss(tmp_path, tiny_hp, tiny_dataset):
    folder = tmp_path / "validator-0"
    folder.mkdir()
    evaluator = HeldoutEvaluator(tiny_hp, tiny_dataset.path, pages=2)
    watcher = ScoreWatcher(folder, [], evaluator, max_wait_s=60)
    for w in (0, 1):  # the watcher was busy for two whole windows
        scored(folder, w)
        save_local_state(folder, w + 1, tiny_hp.revision(), theta(tiny_hp, w + 1))
    snaps = await watcher.poll(NoChain(), 5)
    assert [(s.window, s.model_window) for s in snaps] == [(0, None), (1, 2)]
    assert snaps[0].heldout_loss is None and snaps[1].heldout_loss is not None


def test_copy_status_names_the_source_uid():
    entry = WindowEntry(window=3, hotkey="h", present=True, timely=True, mu=1.0, sigma=1.0, copy_factor=0.0,
                        copied_from=0)
    state = ScoringState(last_window=3, uids={4: UidState(hotkey="h", mu=1.0, sigma=1.0, history=[entry])})
    assert build_rows(state, 3, None, [])[0].status == "copy of uid 0"


def test_report_plots_have_round_ticks_and_axes_that_hug_the_data():
    from matplotlib.figure import Figure

    from devnet.report import _axes

    def ticks_in_view(axis, lo, hi):
        return [t for t in axis.get_ticklocs() if lo - 1e-9 <= t <= hi + 1e-9]

    ax = Figure().subplots()
    losses = [8.316, 7.997, 7.787, 7.571]
    ax.plot([3, 4, 5, 6], losses)
    _axes(ax, [3, 4, 5, 6], losses + [8.32])
    lo, hi = ax.get_ylim()
    assert 7.5 < lo < 7.571 and 8.32 < hi < 8.4  # no empty band above or below the data
    for t in ticks_in_view(ax.yaxis, lo, hi):
        assert round(t / 0.1, 6) == round(t / 0.1) or round(t / 0.25, 6) == round(t / 0.25), t  # 7.6, 7.75, ...
    assert ax.get_xlim() == (3, 6) and all(float(t).is_integer() for t in ax.xaxis.get_ticklocs())

    weights = Figure().subplots()
    weights.plot([0, 1, 2], [0.0, 1.0, 0.4])
    _axes(weights, [0, 1, 2], [0.0, 1.0, 0.4], floor=0.0, ceiling=1.0)
    assert weights.get_ylim() == (0.0, 1.0)  # a weight axis never runs to 1.08


async def test_honest_rows_carry_each_miners_own_in_sync_verdict(tmp_path, tiny_hp, tiny_dataset):
    from devnet.scoreboard import Participant, node_in_sync
    from neurons.node_files import append_metrics

    folder = tmp_path / "validator-0"
    folder.mkdir()
    miner = tmp_path / "miner-0"
    miner.mkdir()
    append_metrics(miner, {"window": 0, "stepped": True, "in_sync": True})
    append_metrics(miner, {"window": 1, "stepped": False, "in_sync": False})  # drifted in window 1 ...
    append_metrics(miner, {"window": 1, "stepped": True, "in_sync": True})  # ... a restart replayed it: last line
    append_metrics(miner, {"window": 2, "stepped": False, "in_sync": False})
    assert [node_in_sync(miner, w) for w in (0, 1, 2, 3)] == [True, True, False, None]
    people = [Participant(name="miner-0", role="miner", kind="honest", wallet="m0", hotkey="h1")]
    watcher = ScoreWatcher(folder, people, HeldoutEvaluator(tiny_hp, tiny_dataset.path, pages=2))
    scored(folder, 2)
    save_local_state(folder, 3, tiny_hp.revision(), theta(tiny_hp, 3))  # θ window 2 produced
    snaps = await watcher.poll(NoChain(), 5)
    assert snaps and all(s.rows[0].name == "miner-0" for s in snaps)
    assert {s.window: s.rows[0].in_sync for s in snaps} == {0: True, 1: True, 2: False}


async def test_an_unreadable_scores_file_is_said_not_silently_skipped(tmp_path, tiny_hp, tiny_dataset):
    """A validator of other code (a field this launcher does not know) must not look like a quiet run."""
    folder = tmp_path / "validator-0"
    folder.mkdir()
    watcher = ScoreWatcher(folder, [], HeldoutEvaluator(tiny_hp, tiny_dataset.path, pages=2))
    scored(folder, 0)
    raw = (folder / SCORES_FILE).read_text().replace('"copy_factor"', '"from_newer_code":1,"copy_factor"', 1)
    (folder / SCORES_FILE).write_text(raw)
    assert await watcher.poll(NoChain(), 1) == []
    assert watcher.unreadable is not None and "from_newer_code" in watcher.unreadable
    scored(folder, 1)  # readable again: the reason is cleared
    await watcher.poll(NoChain(), 2)
    assert watcher.unreadable is None
