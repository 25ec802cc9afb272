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


def test_error_feedback_of_tensors_not_row_aligned_is_counted_whole_on_every_rank():
    """`neurons.sharding` replicates a tensor whose R row shards are not whole chunk rows (error feedback
    whole on every rank, Δ all-gathered); the plan counted every tensor as sharded. tiny at 3 ranks
    shards none (4096 and 688 rows are not multiples of 3): a real 3-rank run saved 3,679,488 error-feedback
    elements per rank, n, where the plan said n/3; at 2 ranks 1,840,384 (n/2 and the 1-D norms whole)."""
    tiny = load_hparams("tiny")
    three, two = plan(tiny, 3, None, "fp32"), plan(tiny, 2, None, "fp32")
    n = three["parameters"]
    assert three["replicated_fraction"] == 1.0 and three["bytes_per_rank"]["error_feedback"] == 4 * n
    assert n == 3_679_488 and three["bytes_per_rank"]["error_feedback"] == 4 * 3_679_488
    assert two["bytes_per_rank"]["error_feedback"] == 4 * 1_840_384
    eight = plan(load_hparams("8b"), 8, 1, "bf16", True)  # the vocabulary's rows: 128256 / 8 is not whole chunks
    assert 0 < eight["replicated_fraction"] < 0.2
    assert eight["bytes_per_rank"]["error_feedback"] > 4 * -(-eight["parameters"] // 8)
