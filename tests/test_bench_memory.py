"""`crucible bench memory`: the per-rank plan shards what FSDP2 shards and counts activations from the real graph.

The fast tests check the plan's terms; the slow one measures tiny (1 process and 2 gloo FSDP2 ranks, the
miner's path) and checks each estimate within 15 % of its measured peak.
"""

import pytest

from bench.memory import activation_bytes, measure, plan
from protocol.hparams import load_hparams


def test_plan_shards_the_resident_state_and_scales_activations_with_the_micro_batch():
    hp = load_hparams("tiny")
    one, two = plan(hp, 1, 8, "fp32"), plan(hp, 2, 4, "fp32")
    n = one["parameters"]
    b1, b2 = one["bytes_per_rank"], two["bytes_per_rank"]
    assert b1["optimizer"] == 8 * n and b1["gradients"] == b1["error_feedback"] == 4 * n
    assert b2["optimizer"] == 8 * ((n + 1) // 2)
    assert two["accumulation_steps"] == 1 and plan(hp, 2, 1, "fp32")["accumulation_steps"] == 4
    small, big = activation_bytes(hp, 2, "fp32")["total"], activation_bytes(hp, 8, "fp32")["total"]
    assert 3 < big / small < 6  # activations grow about linearly with the micro-batch
    assert one["gpus_needed"] == {"80GB": 1, "141GB": 1}


def test_training_peak_counts_only_the_gradients_that_exist_then():
    """Gradients are None at each step's start: the forward's activations meet the head's whole gradient
    (one process), none beyond FSDP2's gathered group (sharded), or every gradient when accumulating."""
    hp = load_hparams("tiny")
    head = hp.model.vocab_size * hp.model.hidden_size
    one, two = plan(hp, 1, 8, "fp32")["bytes_per_rank"], plan(hp, 2, 4, "fp32")["bytes_per_rank"]
    assert one["gradients_at_training_peak"] == 4 * head
    assert two["gradients_at_training_peak"] == 0
    accumulating = plan(hp, 2, 1, "fp32")["bytes_per_rank"]
    assert accumulating["gradients_at_training_peak"] == accumulating["gradients"]
    assert one["peak_training"] == (one["parameters"] + one["optimizer"] + one["error_feedback"] + 4 * head
                                    + one["window_buffers"] // 2 + one["activations"])


@pytest.mark.slow
def test_estimates_are_within_15_percent_of_measured_peaks_on_tiny():
    hp = load_hparams("tiny")
    for ranks in (1, 2):
        measured = measure(hp, ranks, None, "fp32")
        estimate = plan(hp, ranks, None, "fp32")["bytes_per_rank"]["total"]
        assert len(measured["per_rank_peak_bytes"]) == ranks
        assert set(measured["per_rank_phases"][0]) == {"build", "step1", "step2", "deltas", "encode"}
        assert 0.85 <= estimate / measured["peak_bytes"] <= 1.15, (ranks, estimate, measured)
