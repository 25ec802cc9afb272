"""The reference loss curve: a tiny SparseLoCo run must reproduce the stored losses bit for bit.

`bench.reference_loss` runs 2 peers × 4 windows of `run_sparseloco` on the tiny model, on a
synthetic corpus that no Python or tokenizers version can change, and
`tests/assets/losses/tiny_sparseloco.json` holds what it gave. The comparison is EXACT (float ==):
the run was found bit-reproducible across processes and across 1, 2 and 4 torch threads
(torch 2.13.0+cpu), because θ_0 comes from a private RNG and the aggregate is summed in float64 in
sorted peer order. So any difference means training changed. If that was the intent (a model,
codec, inner-loop or outer-step change), regenerate the file with
`.venv/bin/crucible bench reference-loss --write` and commit it with the change.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.reference_loss import REGENERATE, THREADS, WINDOWS, load_reference, run_reference, settings


def first_difference(stored: list[float], fresh: list[float]) -> tuple[int, float | None, float | None] | None:
    """(index, stored, fresh) of the first value that is not bit-identical, or None if all are."""
    for i in range(max(len(stored), len(fresh))):
        a = stored[i] if i < len(stored) else None
        b = fresh[i] if i < len(fresh) else None
        if a != b:
            return i, a, b
    return None


def assert_same_curve(name: str, stored: dict, fresh: dict, offset: int) -> None:
    """`offset` is the window index of the curve's first entry (0: θ_0 before training, 1: window 1)."""
    diff = first_difference(stored[name], fresh[name])
    if diff is None:
        return
    i, a, b = diff
    env = ""
    if stored["made_with"]["torch"] != torch.__version__:
        env = f" (stored with torch {stored['made_with']['torch']}, running {torch.__version__})"
    rel = f", relative difference {abs(a - b) / abs(a):.3g}" if a is not None and b is not None and a else ""
    pytest.fail(
        f"{name} differs first at window {i + offset}: stored {a!r}, this run {b!r}{rel}{env}. "
        f"If training was meant to change, regenerate with `{REGENERATE}` and commit the file."
    )


@pytest.fixture(scope="module")
def stored() -> dict:
    return load_reference()


@pytest.fixture(scope="module")
def fresh() -> dict:
    return run_reference(THREADS)


def test_stored_reference_is_a_learning_curve_for_these_settings(stored):
    assert stored["settings"] == {**settings(), "dataset_pages": stored["settings"]["dataset_pages"]}, (
        f"the reference run's settings changed; regenerate with `{REGENERATE}`"
    )
    curve = stored["heldout_loss"]
    assert len(curve) == WINDOWS + 1 and len(stored["train_loss"]) == WINDOWS
    assert all(math.isfinite(v) for v in curve + stored["train_loss"])
    assert 8.0 < curve[0] < 8.7  # untrained: near ln(4096) ≈ 8.32
    assert all(later < earlier for earlier, later in zip(curve, curve[1:], strict=False)), curve


def test_sparseloco_reproduces_the_reference_losses_exactly(stored, fresh):
    assert fresh["settings"] == stored["settings"], f"settings differ; regenerate with `{REGENERATE}`"
    assert fresh["tokens"] == stored["tokens"]
    assert_same_curve("heldout_loss", stored, fresh, offset=0)
    assert_same_curve("train_loss", stored, fresh, offset=1)


def test_first_difference_names_the_window_and_both_values():
    assert first_difference([1.0, 2.0], [1.0, 2.0]) is None
    assert first_difference([1.0, 2.0, 3.0], [1.0, 2.0 + 1e-15, 3.5]) == (1, 2.0, 2.0 + 1e-15)
    assert first_difference([1.0], [1.0, 4.0]) == (1, None, 4.0)


@pytest.mark.slow
def test_reference_losses_do_not_depend_on_the_thread_count(stored):
    other = run_reference(1 if THREADS != 1 else 2)
    assert_same_curve("heldout_loss", stored, other, offset=0)
    assert_same_curve("train_loss", stored, other, offset=1)
