"""`crucible bench validator`: seconds to evaluate one miner vs the floor of four forward passes.

Stage 2 must fit many miners in a window. Evaluating one miner is: decode its shard, clip it to the
window's median norm, loss on its assigned batches before and after applying it, loss on the random
batches after (the "before" on random data is shared by every miner of the window), and restore θ.
The floor is four plain forward passes over the same batches (before/after × assigned/random), so
the ratio says how much the evaluation machinery costs beyond the unavoidable model work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.cli import add_json_flag, print_json
from gauntlet.evaluate import Evaluator, mean_loss, scale_update
from neurons.corpus import stdlib_documents
from neurons.dataset import prepare_dataset
from neurons.node_config import HPARAMS_FLAGS
from neurons.training import inner_train, make_inner_optimizer
from protocol.codec import Compressor, decode
from protocol.codec_aggregate import clip_factors, update_norm
from protocol.data import PageStore, assign, random_samples
from protocol.model import build_model


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    HPARAMS_FLAGS.add_to(parser)
    parser.add_argument("--data", type=Path, help="prepared dataset (default: build a small one in a temp folder)")
    parser.add_argument("--miners", type=int, default=4, help="miners to evaluate")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median reported)")
    parser.add_argument("--device", default="cpu", help="torch device")


def _miner_updates(hp, store, model, miners: int) -> dict[str, dict]:
    """Real SparseLoCo updates: each fake miner trains a copy of θ on its assigned samples."""
    shards = {}
    for i in range(miners):
        local = build_model(hp, next(model.parameters()).device)
        local.load_state_dict(model.state_dict())
        samples = store.pages(assign(f"miner-{i}", 0, hp.data.seed, hp.samples_per_window, store.num_train))
        inner_train(local, make_inner_optimizer(local, hp), samples, hp)
        with torch.no_grad():
            delta = {n: p0 - p for (n, p0), p in zip(model.named_parameters(), local.parameters(), strict=True)}
        shards[f"miner-{i}"] = Compressor(hp.sparseloco).encode_all(delta)
    return shards


def _batches(samples: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [samples[i : i + batch] for i in range(0, len(samples), batch)]


def benchmark(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    hp = HPARAMS_FLAGS.parse(args).hparams()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            prepare_dataset(hp, data, list(stdlib_documents(1_000_000)))
        store = PageStore(data, hp)
        model = build_model(hp, args.device)
        shards = _miner_updates(hp, store, model, args.miners)
        n_eval = hp.gauntlet.eval_batches * hp.inner.batch_size
        random_pages = _batches(store.pages(random_samples(b"bench", n_eval, store.num_train)), hp.inner.batch_size)
        factors = clip_factors({h: update_norm(s) for h, s in shards.items()})
        step = hp.gauntlet.eval_step_scale * hp.outer.lr
        assigned = {
            h: _batches(store.pages(assign(h, 0, hp.data.seed, hp.samples_per_window, store.num_train)[:n_eval]),
                        hp.inner.batch_size)
            for h in shards
        }
        eval_times, floor_times, window_times = [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            evaluator = Evaluator(model, random_pages)
            for hotkey, shard in shards.items():
                update = scale_update({n: decode(enc, args.device) for n, enc in shard.items()}, factors[hotkey])
                evaluator.evaluate(update, assigned[hotkey], step)
            window_times.append(time.perf_counter() - started)
            eval_times.append(window_times[-1] / len(shards))
            started = time.perf_counter()
            for hotkey in shards:
                for batches in (assigned[hotkey], assigned[hotkey], random_pages, random_pages):
                    mean_loss(model, batches)
            floor_times.append((time.perf_counter() - started) / len(shards))
    per_miner, floor = statistics.median(eval_times), statistics.median(floor_times)
    window_s = hp.windows.blocks_per_window * hp.windows.expected_block_time_s
    return {
        "preset": hp.name, "device": args.device, "miners": len(shards), "eval_tokens_per_side": n_eval * hp.model.seq_len,
        "seconds_per_miner": per_miner, "floor_four_forwards_s": floor, "ratio_vs_floor": per_miner / floor,
        "window_s": window_s, "miners_per_window": int(window_s // per_miner),
    }


def run_cli(args: argparse.Namespace) -> int:
    return print_json(benchmark(args), args)
