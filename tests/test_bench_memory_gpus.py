"""`crucible bench memory`'s GPU count agrees with its own per-rank bytes at that count.

`gpus_needed` is the smallest R whose per-rank total fits a GPU; at R ranks each holds ⌈batch/R⌉
samples (or --micro-batch, if smaller), so its activations must be those of R ranks, not those of
the --ranks asked for. It counted the asked ranks' activations at every R: `--preset 72b
--checkpointing` (192 samples per rank at --ranks 1) found no R at all, and `--ranks 64` a different
answer for the same model and GPU.
"""

import pytest

from bench.memory import OVERHEAD, RANK_CHOICES, plan
from protocol.hparams import load_hparams

GB = 10**9


@pytest.mark.parametrize(("preset", "ranks", "micro", "checkpointing"),
                         [("72b", 1, None, True), ("72b", 64, None, True), ("150m", 2, None, False),
                          ("8b", 1, 1, True)])
def test_gpus_needed_is_the_smallest_rank_count_whose_own_plan_fits(preset, ranks, micro, checkpointing):
    hp = load_hparams(preset)
    asked = plan(hp, ranks, micro, "bf16", checkpointing)
    for size, needed in asked["gpus_needed"].items():
        gb = float(size.removesuffix("GB"))
        fits = [r for r in RANK_CHOICES
                if plan(hp, r, micro, "bf16", checkpointing)["bytes_per_rank"]["total"] * OVERHEAD <= gb * GB]
        assert needed == (fits[0] if fits else None), (size, needed, fits[:3])
    assert asked["gpus_needed"] == plan(hp, 1, micro, "bf16", checkpointing)["gpus_needed"]  # not --ranks's


@pytest.mark.parametrize("flags", [["--ranks", "0"], ["--ranks", "-2"], ["--micro-batch", "0"], ["--gpu-gb", "0"]])
def test_nonsense_counts_are_one_line_and_exit_2(flags, capsys):
    """They were a ZeroDivisionError or a negative tensor size, with a traceback."""
    from neurons.cli import main

    assert main(["bench", "memory", "--preset", "tiny", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flags[0] in err[0], err
