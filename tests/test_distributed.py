"""Data-parallel miners: 2 gloo ranks on CPU (rank 1 the production follower loop, with no dataset of its own)
compute what one process computes on the same samples."""


import torch
from safetensors.torch import load_file

from neurons.distributed import DistContext
from neurons.training import inner_train, make_inner_optimizer
from protocol.data import assign
from protocol.hparams import load_hparams
from protocol.model import build_model
from tests.conftest import REPO, torchrun
from tests.ddp_worker import OVERRIDES


def test_two_ranks_match_one_process(tmp_path, tiny_dataset, tiny_store):
    done = torchrun([str(REPO / "tests" / "ddp_worker.py"), str(tiny_dataset.path), str(tmp_path)],
                    tmp_path / "torchrun")
    assert done.returncode == 0, done.report()
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    hp = load_hparams("tiny", OVERRIDES)
    model = build_model(hp)
    samples = tiny_store.pages(assign("ddp", 0, hp.data.seed, hp.samples_per_window, tiny_store.num_train))
    stats = inner_train(model, make_inner_optimizer(model, hp), samples, hp, 0)
    theta0 = build_model(hp).state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        # Adam turns float-summation noise on near-zero gradients into ±lr steps on a few elements,
        # so compare the updates as a whole: the difference must be tiny next to the update itself.
        update = (p.detach() - theta0[name]).norm()
        gap = (ranks[0][name] - p.detach()).norm()
        assert update > 0 and gap <= 0.02 * update, (name, float(gap), float(update))
    assert torch.allclose(ranks[0]["losses"], torch.tensor(stats.losses), atol=1e-4)


def test_shards_cover_the_batch_once():
    batch = torch.arange(10).view(10, 1)
    parts = [DistContext(rank=r, world=3).shard(batch) for r in range(3)]
    assert sorted(torch.cat(parts).view(-1).tolist()) == list(range(10))
