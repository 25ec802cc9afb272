"""The tiny model learns on the real offline corpus: held-out loss falls within a few windows."""

import torch

from neurons.training import inner_lr, inner_train, make_inner_optimizer, mean_loss
from protocol.data import assign
from protocol.hparams import load_hparams
from protocol.model import build_model


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
