"""Worker for test_distributed.py: one rank of a 2-process gloo run of the miner's inner loop."""

import sys

import torch
from safetensors.torch import save_file

from neurons.distributed import init_distributed
from neurons.training import inner_train, make_inner_optimizer
from protocol.data import PageStore, assign
from protocol.hparams import load_hparams
from protocol.model import build_model

OVERRIDES = ["inner.steps=3", "inner.batch_size=4"]


def main(data: str, out: str) -> None:
    torch.set_num_threads(1)
    dist = init_distributed()
    hp = load_hparams("tiny", OVERRIDES)
    store = PageStore(data, hp)
    model = build_model(hp)
    optimizer = make_inner_optimizer(model, hp)
    samples = store.pages(assign("ddp", 0, hp.data.seed, hp.samples_per_window, store.num_train))
    stats = inner_train(model, optimizer, samples, hp, 0, dist)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    tensors["losses"] = torch.tensor(stats.losses)
    save_file(tensors, f"{out}/rank{dist.rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
