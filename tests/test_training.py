"""The tiny model learns on the real offline corpus: held-out loss falls within a few windows; micro-batches
and bf16 compute train the same way without changing the network's rules."""

import torch

from neurons.training import TrainSettings, inner_lr, inner_train, make_inner_optimizer, mean_loss
from protocol.codec import Compressor
from protocol.codec_aggregate import aggregate_encoded, apply_outer_step, update_norm
from protocol.data import assign
from protocol.hparams import load_hparams
from protocol.model import build_model, param_digest


def test_heldout_loss_falls(tiny_hp, tiny_store):
    model = build_model(tiny_hp)
    optimizer = make_inner_optimizer(model, tiny_hp)
    heldout = tiny_store.pages(range(32), "heldout")
    before = mean_loss(model, heldout)
    first = None
    for window in range(4):
        samples = tiny_store.pages(assign("hk", window, 0, tiny_hp.samples_per_window, tiny_store.num_train))
        stats = inner_train(model, optimizer, samples, tiny_hp, window)
        first = first or stats.losses[0]
        assert stats.tokens == samples.numel()
        assert all(n >= 0 for n in stats.grad_norms)
    after = mean_loss(model, heldout)
    assert after < before - 1.0, (before, after)
    assert stats.losses[-1] < first


def test_warmup_schedule():
    hp = load_hparams("tiny", ["inner.warmup_windows=4"])
    assert inner_lr(hp, 0) == hp.inner.lr / 4
    assert inner_lr(hp, 3) == inner_lr(hp, 50) == hp.inner.lr


def test_mean_loss_restores_train_mode(tiny_hp, tiny_store):
    model = build_model(tiny_hp).train()
    mean_loss(model, tiny_store.pages([0, 1]))
    assert model.training
    assert torch.is_grad_enabled()


# --- gradient accumulation and mixed precision (issue 17) ------------------------------------------------


def _train(hp, samples, settings):
    model = build_model(hp)
    stats = inner_train(model, make_inner_optimizer(model, hp), samples, hp, 0, settings=settings)
    return model, stats


def test_micro_batches_give_the_same_update(tiny_hp, tiny_store):
    """1 × 8 and 4 × 2 micro-batches per inner step: the same update within fp32 tolerance.

    Accumulating changes only the order of float32 sums inside the backward pass (≈ 1e-7 relative on
    each gradient). Adam divides by √v, which turns that noise into up to ±lr steps on the few
    elements whose gradients are near zero, so, like the DDP test, the updates are compared as a
    whole per tensor: ‖gap‖ ≤ 1 % of ‖update‖ (measured on 2 steps: median 7e-6, max 6e-5 of ‖update‖);
    the losses to 1e-5 (measured 1.2e-6).
    """
    hp = load_hparams("tiny", ["inner.steps=2", "inner.batch_size=8"])
    samples = tiny_store.pages(assign("accum", 0, hp.data.seed, hp.samples_per_window, tiny_store.num_train))
    whole, whole_stats = _train(hp, samples, TrainSettings())
    micro, micro_stats = _train(hp, samples, TrainSettings(micro_batch=2))
    theta0 = build_model(hp).state_dict()
    micro_params = dict(micro.named_parameters())
    for name, p in whole.named_parameters():
        update = (p.detach() - theta0[name]).norm()
        gap = (micro_params[name].detach() - p.detach()).norm()
        assert update > 0 and gap <= 0.01 * update, (name, float(gap), float(update))
    assert torch.allclose(torch.tensor(whole_stats.losses), torch.tensor(micro_stats.losses), rtol=0, atol=1e-5)
    assert whole_stats.tokens == micro_stats.tokens == samples.numel()


def test_one_micro_batch_is_bit_identical_to_no_micro_batching(tiny_hp, tiny_store):
    hp = load_hparams("tiny", ["inner.steps=1", "inner.batch_size=4"])
    samples = tiny_store.pages(range(4))
    a, sa = _train(hp, samples, TrainSettings())
    b, sb = _train(hp, samples, TrainSettings(micro_batch=4))
    assert sa.losses == sb.losses
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_bf16_trains_with_fp32_master_weights(tiny_hp, tiny_store):
    hp = load_hparams("tiny", ["inner.steps=8"])
    model = build_model(hp)
    optimizer = make_inner_optimizer(model, hp)
    bf16 = TrainSettings(precision="bf16", micro_batch=4)
    first = last = None
    for window in range(2):
        samples = tiny_store.pages(assign("bf16", window, 0, hp.samples_per_window, tiny_store.num_train))
        stats = inner_train(model, optimizer, samples, hp, window, settings=bf16)
        first = first if first is not None else stats.losses[0]
        last = stats.losses[-1]
    assert last < first - 0.5, (first, last)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s.dtype == torch.float32 for st in optimizer.state.values() for s in st.values() if s.dim() > 0)


def test_theta_after_the_outer_step_is_identical_whatever_the_precision(tiny_store):
    """A bf16 node and an fp32 node publish different Δs, but given the same aggregate both take the
    same θ: the error feedback, aggregation and outer step are float32 and start from θ_w."""
    hp = load_hparams("tiny", ["inner.steps=2"])
    samples = tiny_store.pages(range(hp.samples_per_window))
    theta_w = build_model(hp)
    nodes, encoded = [], {}
    for precision in ("fp32", "bf16"):
        model = build_model(hp)
        inner_train(model, make_inner_optimizer(model, hp), samples, hp, 0, settings=TrainSettings(precision=precision))
        start = dict(theta_w.named_parameters())
        with torch.no_grad():
            delta = {n: start[n].detach() - p for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                p.copy_(start[n])
        compressor = Compressor(hp.sparseloco)
        encoded[precision] = compressor.encode_all(delta)
        assert all(e.dtype == torch.float32 for e in compressor.state_dict().values())
        nodes.append(model)
    assert not torch.equal(encoded["fp32"]["lm_head.weight"].values(), encoded["bf16"]["lm_head.weight"].values())
    aggregated = aggregate_encoded(encoded, norms={k: update_norm(v) for k, v in encoded.items()})
    for model in nodes:
        apply_outer_step(model, aggregated, hp.outer.lr)
    assert param_digest(nodes[0]) == param_digest(nodes[1])
    assert param_digest(nodes[0]) != param_digest(theta_w)
