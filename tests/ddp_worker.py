"""Worker for test_distributed.py: one rank of a 2-process gloo run of the miner's inner loop.

Rank 0 plays the miner (it alone opens the dataset and sends the pages with the instruction, as
`Miner` does); rank 1 runs the production follower loop (`neurons.miner_ranks.follow`) with no dataset."""

import sys

import torch
from safetensors.torch import save_file

from neurons.distributed import broadcast_work, init_distributed
from neurons.miner_ranks import follow
from neurons.training import inner_train, make_inner_optimizer
from protocol.data import PageStore, assign
from protocol.hparams import load_hparams
from protocol.model import build_model

OVERRIDES = ["inner.steps=3", "inner.batch_size=4"]


def main(data: str, out: str) -> None:
    torch.set_num_threads(1)
    dist = init_distributed()
    hp = load_hparams("tiny", OVERRIDES)
    model = build_model(hp)
    if not dist.is_main:
        follow(model, hp, dist)  # until rank 0 says stop
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, f"{out}/rank{dist.rank}.safetensors")
        return
    store = PageStore(data, hp)
    optimizer = make_inner_optimizer(model, hp)
    samples = store.pages(assign("ddp", 0, hp.data.seed, hp.samples_per_window, store.num_train))
    broadcast_work(dist, {"op": "train", "window": 0, "samples": samples})
    stats = inner_train(model, optimizer, samples, hp, 0, dist)
    broadcast_work(dist, {"op": "stop"})
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    tensors["losses"] = torch.tensor(stats.losses)
    save_file(tensors, f"{out}/rank{dist.rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
