"""`crucible bench memory`: the per-rank plan shards what FSDP2 shards and counts activations from the real graph."""

from bench.memory import activation_bytes, plan
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
