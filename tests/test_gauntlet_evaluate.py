"""Gauntlet stage 2 on a real tiny LlamaForCausalLM: exact restore, indicator, loss score, ratings.

The data are two deterministic "languages" over disjoint halves of a 64-token vocabulary (each a
different affine successor rule with 10 % noise). A miner's assigned pages are language A; the
window's random pages are a mixture of A and B. An honest miner trains on its assigned pages; a
freeloader trains on other pages (language B); a noise miner sends random values of the same size.
"""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gauntlet.evaluate import (
    Evaluator,
    UpdateError,
    binary_moving_average,
    check_update,
    mean_loss,
    scale_update,
)
from gauntlet.ratings import fresh_rating, rate_window
from gauntlet.records import EvalResult
from protocol.hparams import GauntletHParams, OuterOptimHParams

HP = GauntletHParams()
STEP = HP.eval_step_scale * OuterOptimHParams().lr
VOCAB, SEQ, BATCH = 64, 32, 8


def language(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, SEQ, dtype=torch.long)
    cur = torch.randint(0, 32, (n,), generator=g)
    for t in range(SEQ):
        x[:, t] = cur
        nxt = (cur * 5 + 3) % 32 if kind == "A" else (cur * 11 + 7) % 32
        cur = torch.where(torch.rand(n, generator=g) < 0.1, torch.randint(0, 32, (n,), generator=g), nxt)
    return x if kind == "A" else x + 32


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, lr: float, seed: int = 0) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        b = data[torch.randint(0, len(data), (BATCH,), generator=g)]
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def pseudo_gradient(base: torch.nn.Module, data: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    local = copy.deepcopy(base)
    train(local, data, steps=10, lr=3e-3, seed=seed)
    theta = dict(base.named_parameters())
    return {k: (theta[k] - p).detach() for k, p in local.named_parameters()}


@pytest.fixture(scope="module")
def world():
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        train(model, torch.cat([language("A", 64, 1), language("B", 64, 2)]), steps=30, lr=3e-3)
    model.eval()
    assigned = language("A", 4 * BATCH, 10)
    honest = pseudo_gradient(model, assigned)
    freeloader = pseudo_gradient(model, language("B", 4 * BATCH, 11))
    g = torch.Generator().manual_seed(3)
    noise = {
        k: torch.randn(v.shape, generator=g) * v.norm() / math.sqrt(v.numel()) for k, v in honest.items()
    }
    return dict(
        model=model, assigned=list(assigned.split(BATCH)), honest=honest, freeloader=freeloader, noise=noise
    )


def random_batches(seed: int, n_batches: int = HP.eval_batches) -> list[torch.Tensor]:
    half = n_batches * BATCH // 2
    mix = torch.cat([language("A", half, 1000 + seed), language("B", half, 2000 + seed)])
    return list(mix[torch.randperm(len(mix), generator=torch.Generator().manual_seed(seed))].split(BATCH))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k  # NaN-free tensors: equal means bit-identical here


def test_evaluation_restores_model_bit_exactly(world):
    model = world["model"]
    snap = snapshot(model)
    ev = Evaluator(model, random_batches(0))
    for kind in ("honest", "freeloader", "noise"):
        r = ev.evaluate(world[kind], world["assigned"], STEP)
        assert r.loss_after_random != r.loss_before_random  # the update really was applied
        assert_bit_identical(model, snap)
    # A large update whose subtraction would not round-trip in float32 is still restored exactly.
    huge = {k: v * 1e3 + 1e-7 for k, v in world["honest"].items()}
    ev.evaluate(huge, world["assigned"], STEP)
    assert_bit_identical(model, snap)
    # Training mode is restored too.
    model.train()
    ev.evaluate(world["honest"], world["assigned"], STEP)
    assert model.training
    model.eval()


def test_bad_updates_are_refused_before_touching_the_model(world):
    model = world["model"]
    snap = snapshot(model)
    ev = Evaluator(model, random_batches(0))
    name, u = next(iter(world["honest"].items()))
    bad = {
        "unknown": {"nope.weight": torch.zeros(3)},
        "shape": {name: torch.zeros(u.numel() + 1)},
        "nan": {name: torch.full_like(u, math.nan)},
        "int": {name: torch.zeros_like(u, dtype=torch.int64)},
    }
    for upd in bad.values():
        assert check_update(model, upd) is not None
        with pytest.raises(UpdateError):
            ev.evaluate(upd, world["assigned"], STEP)
        assert_bit_identical(model, snap)
    with pytest.raises(ValueError):
        Evaluator(model, [torch.full((2, 8), VOCAB)])  # token id out of range


def test_honest_positive_freeloader_negative_indicator(world):
    ev = Evaluator(world["model"], random_batches(1))
    honest = ev.evaluate(world["honest"], world["assigned"], STEP)
    free = ev.evaluate(world["freeloader"], world["assigned"], STEP)
    assert honest.rel_assigned > honest.loss_score > 0 and honest.indicator() == 1
    assert free.loss_score > 0  # it did improve the model on random data...
    assert free.rel_assigned < free.loss_score and free.indicator() == -1  # ...but not on what it was assigned


def test_before_random_loss_is_computed_once_per_window(world):
    model = world["model"]
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        rb = random_batches(2)
        ev = Evaluator(model, rb)
        first = ev.evaluate(world["honest"], world["assigned"], STEP)
        n_first = len(calls)
        second = ev.evaluate(world["noise"], world["assigned"], STEP)
        n_second = len(calls) - n_first
    finally:
        handle.remove()
    assert n_first == len(rb) + 2 * len(world["assigned"]) + len(rb)
    assert n_second == 2 * len(world["assigned"]) + len(rb)
    assert first.loss_before_random == second.loss_before_random == mean_loss(model, rb)


def test_loss_signal_is_stable_across_random_draws(world):
    """The honest–freeloader and honest–noise gaps dwarf the spread over random batch draws."""
    scores, gaps = [], []
    for seed in range(5):
        ev = Evaluator(world["model"], random_batches(100 + seed))
        h = ev.evaluate(world["honest"], world["assigned"], STEP)
        n = ev.evaluate(world["noise"], world["assigned"], STEP)
        scores.append(h.loss_score)
        gaps.append(h.loss_score - n.loss_score)
        assert h.indicator() == 1
    spread = statistics.stdev(scores)
    assert min(gaps) > 5 * spread
    assert h.rel_assigned - statistics.mean(scores) > 5 * spread


def test_noise_rates_below_honest_over_windows(world):
    hp = HP
    ratings = {0: fresh_rating(hp), 1: fresh_rating(hp), 2: fresh_rating(hp)}
    kinds = {0: "honest", 1: "noise", 2: "freeloader"}
    for window in range(6):
        ev = Evaluator(world["model"], random_batches(200 + window))
        scores = {u: ev.evaluate(world[k], world["assigned"], STEP).loss_score for u, k in kinds.items()}
        assert scores[0] > scores[1]
        ratings = rate_window(ratings, scores, hp)
    assert ratings[0].mu > ratings[1].mu
    assert ratings[0].ordinal > ratings[1].ordinal
    assert ratings[0].ordinal > 0 > ratings[1].ordinal


def test_binary_moving_average_and_clipping():
    m = 0.0
    for _ in range(3):
        m = binary_moving_average(m, 1, 0.05)
    assert m == pytest.approx(1 - 0.95**3)
    assert binary_moving_average(m, -1, 0.05) == pytest.approx(0.95 * m - 0.05)
    with pytest.raises(ValueError):
        binary_moving_average(0.0, 0, 0.05)
    upd = {"a": torch.full((4,), 3.0), "b": torch.full((1,), 4.0)}
    halved = scale_update(upd, 0.5)
    assert torch.equal(halved["a"], torch.full((4,), 1.5)) and torch.equal(halved["b"], torch.full((1,), 2.0))
    assert scale_update(upd, 1.0)["a"] is upd["a"]  # no copy when nothing is clipped
    for bad in (math.nan, math.inf, -0.5):
        with pytest.raises(ValueError):
            scale_update(upd, bad)


def _result(own_a: float, own_r: float, ref_a: float, ref_r: float, n: int | None, twins: int = 0) -> EvalResult:
    """An EvalResult whose relative improvements are the given numbers (all before-losses are 1)."""
    return EvalResult(loss_before_assigned=1.0, loss_after_assigned=1.0 - own_a, loss_before_random=1.0,
                      loss_after_random=1.0 - own_r, step=STEP, reference_score=ref_r,
                      loss_after_assigned_reference=1.0 - ref_a, reference_count=n, reference_twins=twins)


def test_memory_margin_is_measured_against_the_other_miners_on_the_same_samples():
    # two miners; the other one's update is generic (0.05 on any data). An honest update that helps its own
    # samples twice as much as random data remembers them: margin (0.1 − 1·0.05) / 0.05 = 1
    honest = _result(own_a=0.10, own_r=0.05, ref_a=(0.10 + 0.05) / 2, ref_r=0.05, n=2)
    assert honest.memory_margin == pytest.approx(1.0)
    assert honest.indicator(0.1) == 1
    # a freeloader (generic update, same strength) helps its assigned samples exactly as the control does
    free = _result(own_a=0.05, own_r=0.05, ref_a=0.05, ref_r=0.05, n=2)
    assert free.memory_margin == pytest.approx(0.0, abs=1e-12) and free.indicator(0.1) == -1
    # ...and one twice as strong as the others, still without memory, is scaled by its strength: margin 0
    strong = _result(own_a=0.10, own_r=0.10, ref_a=(0.10 + 0.05) / 2, ref_r=(0.10 + 0.05) / 2, n=2)
    assert strong.memory_margin == pytest.approx(0.0, abs=1e-12)
    # the assigned samples may simply be easier than the random ones: the old rule calls that memory, the
    # control (which helps them as much) does not
    easy = _result(own_a=0.08, own_r=0.05, ref_a=0.08, ref_r=0.05, n=4)
    assert easy.rel_assigned > easy.loss_score and easy.memory_margin == pytest.approx(0.0, abs=1e-12)
    assert easy.indicator(0.1) == -1


def test_without_a_control_the_indicator_compares_assigned_with_random():
    lone = _result(own_a=0.08, own_r=0.05, ref_a=0.08, ref_r=0.05, n=1)  # its own update is the reference
    assert lone.memory_margin is None and lone.indicator(0.1) == 1
    old = EvalResult(loss_before_assigned=1.0, loss_after_assigned=0.97, loss_before_random=1.0,
                     loss_after_random=0.98, step=STEP)  # a record from before the control existed
    assert old.memory_margin is None and old.indicator(5.0) == 1
    harmful_others = _result(own_a=0.08, own_r=0.05, ref_a=0.0, ref_r=0.02, n=2)  # control: −0.01 on random
    assert harmful_others.memory_margin is None and harmful_others.indicator(0.1) == 1
    # beside three noise updates the control barely moves the random loss (0.002 < 0.25 × the reference
    # 0.0215): it cannot stand for a generic update, and dividing by it would blow the margin up
    among_noise = _result(own_a=0.12, own_r=0.08, ref_a=0.03, ref_r=0.0215, n=4)
    assert among_noise.memory_margin is None and among_noise.indicator(0.1) == 1
    nan = _result(own_a=0.08, own_r=0.05, ref_a=math.nan, ref_r=0.05, n=3)
    assert nan.memory_margin is None


def test_copies_are_left_out_of_the_control_so_a_copier_cannot_hide_the_originals_memory():
    # V remembers its samples (0.10 on them, 0.05 on random); X is an exact copy of V; O is generic.
    # n = 3 with the copy: R = (V + X + O) / 3 on assigned (0.10 + 0.10 + 0.05) / 3, on random 0.05
    told = _result(own_a=0.10, own_r=0.05, ref_a=0.25 / 3, ref_r=0.05, n=3, twins=1)
    assert told.memory_margin == pytest.approx(1.0)  # the same margin as beside O alone
    untold = _result(own_a=0.10, own_r=0.05, ref_a=0.25 / 3, ref_r=0.05, n=3)
    assert untold.memory_margin == pytest.approx(0.5)  # the copy inside the control would halve it
    # beside its copy only, there is no independent control: the rule that needs no other miner applies
    pair = _result(own_a=0.10, own_r=0.05, ref_a=0.10, ref_r=0.05, n=2, twins=1)
    assert pair.memory_margin is None and pair.indicator(0.1) == 1
    assert _result(own_a=0.10, own_r=0.05, ref_a=0.10, ref_r=0.05, n=2).indicator(0.1) == -1  # without twins


def test_the_control_pass_applies_the_reference_and_restores_the_model(world):
    model = world["model"]
    snap = snapshot(model)
    reference = {k: (world["honest"][k] + world["freeloader"][k] + world["noise"][k]) / 3 for k in world["honest"]}
    rb = random_batches(4)
    ev = Evaluator(model, rb)
    plain = ev.evaluate(world["honest"], world["assigned"], STEP)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        r = ev.evaluate(world["honest"], world["assigned"], STEP, reference=reference)
    finally:
        handle.remove()
    assert len(calls) == 3 * len(world["assigned"]) + len(rb)  # one more pass over the assigned batches
    assert_bit_identical(model, snap)
    assert (r.loss_after_assigned, r.loss_after_random) == (plain.loss_after_assigned, plain.loss_after_random)
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in stepped.named_parameters():
            p.sub_(reference[k], alpha=STEP)
    assert r.loss_after_assigned_reference == pytest.approx(mean_loss(stepped, world["assigned"]), rel=1e-6)


def test_the_control_separates_an_update_that_remembers_its_samples_from_one_that_does_not(world):
    updates = {k: world[k] for k in ("honest", "freeloader", "noise")}
    reference = {n: sum(u[n] for u in updates.values()) / len(updates) for n in world["honest"]}
    ev = Evaluator(world["model"], random_batches(5))
    ref_score = ev.reference_score([reference], STEP)
    margins = {}
    for kind, update in updates.items():
        r = ev.evaluate(update, world["assigned"], STEP, reference=reference)
        r.reference_score, r.reference_count = ref_score, len(updates)
        margins[kind] = r.memory_margin
    assert margins["honest"] > HP.memory_margin and margins["freeloader"] < HP.memory_margin
