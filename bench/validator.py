"""`crucible bench validator`: one validator window's costs, against honest floors measured in the same run.

Real mode (default) trains `--miners` fake miners on a small dataset and times stage 2 per miner:
decode its shard, clip it to the window's norm, loss on its assigned batches before and after
applying it, loss on the random batches after, loss on its assigned batches with the window's mean
update applied instead (the memory control), restore θ. The floor is FOUR plain forward passes per
miner (assigned before/after/control, random after) plus ONE per window (random before, shared by
every miner), per miner, so the ratio is what the evaluation machinery costs beyond the unavoidable
model work. `miners_per_window` is how many such evaluations fit the real stage-2 budget:
`eval_time_fraction` × the window, less stage 1 over these miners and the gather of the window's
peers (both timed here).

`--synthetic` skips the model: for each N of `--miners` (e.g. `16,64,256`) it builds N synthetic
shards of the preset's real shapes (one real encoding, each miner's in-chunk indices permuted by its
own affine map per chunk, random codes; the last two miners are copies of miner 0, seen later) and
times, with the peak resident memory of each phase beyond what was resident when it started:
stage 1's copy detection over all N (the encoded shards are read slab by slab), stage 2's decode of
`eval_miners_per_window` miners (plain `decode` into one reused buffer per tensor, against a fresh
`decode` and a single-peer `aggregate_encoded`) and the gather (`aggregate_encoded`) of
`peers.primary` peers, against one decode. Peak memory is sampled from /proc/self/statm every 2 ms
(torch's CPU allocations are invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cli import add_json_flag, print_json
from bench.resident import PeakRSS, resident_bytes
from gauntlet.evaluate import Evaluator, mean_loss, scale_update
from gauntlet.filters import copy_verdicts
from neurons.corpus import stdlib_documents
from neurons.dataset import prepare_dataset
from neurons.node_config import HPARAMS_FLAGS
from neurons.scoring import mean_update
from neurons.training import inner_train, make_inner_optimizer
from protocol.codec import ChunkLayout, Compressor, EncodedTensor, compress, decode, layouts_for, pack12
from protocol.codec_aggregate import aggregate_encoded, clip_factors, update_norm
from protocol.data import PageStore, assign, random_samples
from protocol.model import build_model, param_shapes


def _miners_arg(text: str) -> list[int]:
    counts = [int(x) for x in str(text).split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("--miners takes positive counts, e.g. 4 or 16,64,256")
    return counts


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    HPARAMS_FLAGS.add_to(parser)
    parser.add_argument("--data", type=Path, help="prepared dataset (default: build a small one in a temp folder)")
    parser.add_argument("--miners", type=_miners_arg, default=[4],
                        help="miners (real mode: the first count) or a comma list of N for --synthetic")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the minimum is reported)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--synthetic", action="store_true",
                        help="no model: stage 1, stage-2 decode and the gather on synthetic shards for each N")


# ---- memory and time -------------------------------------------------------------------------------


def _measure(fn: Callable[[], object], repeats: int) -> tuple[float, int]:
    """Minimum seconds over `repeats` runs and the largest peak memory beyond the start of a run."""
    seconds, peak = [], 0
    for _ in range(max(1, repeats)):
        with PeakRSS() as mem:
            started = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - started)
            del out
        peak = max(peak, mem.beyond)
    return min(seconds), peak


# ---- synthetic shards -------------------------------------------------------------------------------


def _coprime_multiplier(size: int, uid: int) -> int:
    a = 2 * uid + 1
    while math.gcd(a, size) != 1:
        a += 2
    return a % size or 1


def _permuted(enc: EncodedTensor, uid: int, gen: torch.Generator) -> EncodedTensor:
    """A miner's shard for one tensor: in-chunk indices under i ↦ (a·i + b) mod chunk_size, re-sorted."""
    lay = enc.layout
    if uid == 0:
        return enc
    a, b = _coprime_multiplier(lay.chunk_size, uid), (uid * 7919) % lay.chunk_size
    idx = (enc.indices() * a + b) % lay.chunk_size
    idx = idx.sort(dim=1).values
    codes = torch.randint(0, 256, enc.codes.shape, dtype=torch.uint8, generator=gen)
    return EncodedTensor(pack12(idx), codes, enc.lookup, lay)


def synthetic_shards(layouts: dict[str, ChunkLayout], hp, n: int, seed: int = 0) -> dict[int, dict[str, EncodedTensor]]:
    """n miners' shards over the real layouts; miners n−1 and n−2 (when n ≥ 4) copy miner 0."""
    gen = torch.Generator().manual_seed(seed)
    base = {name: compress(torch.randn(lay.shape, generator=gen), lay, hp.sparseloco) for name, lay in layouts.items()}
    shards: dict[int, dict[str, EncodedTensor]] = {}
    for uid in range(n):
        if n >= 4 and uid >= n - 2:
            shards[uid] = dict(shards[0])
        else:
            shards[uid] = {name: _permuted(enc, uid, gen) for name, enc in base.items()}
    return shards


def synthetic(hp, counts: list[int], repeats: int, device: str) -> dict:
    layouts = layouts_for(param_shapes(hp), hp.sparseloco)
    numel = sum(lay.numel for lay in layouts.values())
    evaluated, peers = hp.gauntlet.eval_miners_per_window, hp.peers.primary
    runs = []
    outs = {name: torch.empty(lay.numel, dtype=torch.float32, device=device) for name, lay in layouts.items()}
    for n in counts:
        rss_before = resident_bytes()
        shards = synthetic_shards(layouts, hp, n)
        shard_bytes = sum(enc.nbytes for s in shards.values() for enc in s.values())
        times = {uid: float(uid) for uid in shards}
        stage1_s, stage1_mem = _measure(lambda s=shards, t=times: copy_verdicts(s, t, hp.gauntlet), repeats)
        verdicts = copy_verdicts(shards, times, hp.gauntlet)
        norms_s, _ = _measure(lambda s=shards: {u: update_norm(x) for u, x in s.items()}, 1)
        first = shards[min(shards)]
        k_eval = min(n, evaluated)
        ids = sorted(shards)[:k_eval]

        def stage2(ids=ids, s=shards):
            for uid in ids:
                for name, enc in s[uid].items():
                    decode(enc, device, out=outs[name])

        decode_s, decode_mem = _measure(stage2, repeats)
        fresh_s, fresh_mem = _measure(lambda f=first: {name: decode(enc, device) for name, enc in f.items()}, repeats)
        one_peer_s, _ = _measure(lambda f=first: aggregate_encoded({"x": f}, device), repeats)
        gather = {f"peer-{uid:04d}": shards[uid] for uid in sorted(shards)[: min(n, peers)]}
        gather_s, gather_mem = _measure(lambda g=gather: aggregate_encoded(g, device), repeats)
        runs.append({
            "miners": n,
            "shard_bytes": shard_bytes,
            "resident_growth_with_shards_bytes": resident_bytes() - rss_before,
            "stage1_s": round(stage1_s, 4),
            "stage1_s_per_miner": round(stage1_s / n, 5),
            "stage1_peak_beyond_shards_bytes": stage1_mem,
            "stage1_copies_caught": sorted(u for u, v in verdicts.items() if v.factor == 0.0),
            "norms_s": round(norms_s, 4),
            "stage2_decode_miners": k_eval,
            "stage2_decode_s_per_miner": round(decode_s / k_eval, 4),
            "stage2_decode_peak_bytes": decode_mem,
            "plain_decode_fresh_s": round(fresh_s, 4),
            "plain_decode_fresh_peak_bytes": fresh_mem,
            "one_peer_aggregate_s": round(one_peer_s, 4),
            "stage2_decode_vs_plain_decode": round(decode_s / k_eval / fresh_s, 3),
            "gather_peers": len(gather),
            "gather_s": round(gather_s, 4),
            "gather_peak_bytes": gather_mem,
            "gather_vs_one_decode": round(gather_s / fresh_s, 2),
        })
        del shards, gather, verdicts
    out = {"preset": hp.name, "device": device, "threads": torch.get_num_threads(), "params": numel,
           "repeats": repeats, "synthetic": True, "runs": runs}
    if len(runs) > 1:
        out["stage1_per_miner_growth"] = round(runs[-1]["stage1_s_per_miner"] / runs[0]["stage1_s_per_miner"], 3)
    return out


# ---- real miners ---------------------------------------------------------------------------------


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
    counts = args.miners if isinstance(args.miners, list) else [int(args.miners)]
    repeats = max(1, int(args.repeats))
    if getattr(args, "synthetic", False):
        return synthetic(hp, counts, repeats, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            prepare_dataset(hp, data, list(stdlib_documents(1_000_000)))
        store = PageStore(data, hp)
        model = build_model(hp, args.device)
        shards = _miner_updates(hp, store, model, counts[0])
        n_eval = hp.gauntlet.eval_batches * hp.inner.batch_size
        random_pages = _batches(store.pages(random_samples(b"bench", n_eval, store.num_train)), hp.inner.batch_size)
        factors = clip_factors({h: update_norm(s) for h, s in shards.items()})
        step = hp.gauntlet.eval_step_scale * hp.outer.lr
        assigned = {
            h: _batches(store.pages(assign(h, 0, hp.data.seed, hp.samples_per_window, store.num_train)[:n_eval]),
                        hp.inner.batch_size)
            for h in shards
        }
        reference = mean_update([(shards[h], factors[h]) for h in sorted(shards)], torch.device(args.device))
        eval_times, floor_times = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            evaluator = Evaluator(model, random_pages)
            for hotkey, shard in shards.items():
                update = scale_update({n: decode(enc, args.device) for n, enc in shard.items()}, factors[hotkey])
                evaluator.evaluate(update, assigned[hotkey], step, reference=reference)
            eval_times.append((time.perf_counter() - started) / len(shards))
            started = time.perf_counter()
            mean_loss(model, random_pages)  # once per window: θ before, on the random batches
            for hotkey in shards:
                for batches in (assigned[hotkey], assigned[hotkey], assigned[hotkey], random_pages):
                    mean_loss(model, batches)
            floor_times.append((time.perf_counter() - started) / len(shards))
        uids = dict(enumerate(sorted(shards)))
        stage1_s, _ = _measure(lambda: copy_verdicts({u: shards[h] for u, h in uids.items()},
                                                     {u: float(u) for u in uids}, hp.gauntlet), repeats)
        gather = {h: shards[h] for h in sorted(shards)[: hp.peers.primary]}
        gather_s, _ = _measure(lambda: aggregate_encoded(gather, args.device), repeats)
    per_miner, floor = min(eval_times), min(floor_times)
    window_s = hp.windows.blocks_per_window * hp.windows.expected_block_time_s
    budget_s = hp.gauntlet.eval_time_fraction * window_s - stage1_s - gather_s
    return {
        "preset": hp.name, "device": args.device, "miners": len(shards), "eval_tokens_per_side": n_eval * hp.model.seq_len,
        "seconds_per_miner": per_miner, "floor_s": floor, "floor": "4 forward passes per miner + 1 per window",
        "ratio_vs_floor": per_miner / floor, "stage1_s": stage1_s, "gather_s": gather_s,
        "gather_peers": len(gather), "window_s": window_s, "stage2_budget_s": budget_s,
        "miners_per_window": max(0, int(budget_s // per_miner)),
    }


def run_cli(args: argparse.Namespace) -> int:
    return print_json(benchmark(args), args)
