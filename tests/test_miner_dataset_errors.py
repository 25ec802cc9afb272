"""A miner whose pinned dataset bucket fails a page (down, or a page that does not match the manifest) raised
DatasetError out of Miner.step and the whole process exited with a traceback, every window again after each
restart (nothing between `store.pages` and `run_node` catches it). The window is now
skipped for training with a note; the miner goes on to apply the window's record."""

import asyncio
from types import SimpleNamespace

from neurons.distributed import DistContext
from neurons.miner import Miner, MinerReport
from protocol.data import DatasetError


class _FailingStore:
    def pages(self, indices, split="train"):
        raise DatasetError("dataset/abc/train-00000.npy page 3: hash … does not match the manifest's page table")


def test_a_page_that_fails_verification_skips_training_not_the_process():
    miner = Miner.__new__(Miner)
    miner.node = SimpleNamespace(store=_FailingStore(), model=None)
    miner.sharded, miner.dist = None, DistContext()
    miner.choose_samples = lambda window: [3, 4]
    report = MinerReport(7)
    asyncio.run(miner._train_and_publish(SimpleNamespace(window=7, seed=b"s"), report))
    assert not report.trained and not report.uploaded
    assert "dataset pages unavailable" in report.note and "page 3" in report.note
