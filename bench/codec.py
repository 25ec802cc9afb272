"""`crucible bench codec`: SparseLoCo encode/decode speed and bytes on the wire for a preset's model.

Builds the preset's real parameter shapes (from `protocol.model.param_shapes`, no weights allocated)
filled with random pseudo-gradients, then times, in the same run and on the same tensors:

- `copy`: every parameter copied into a PREALLOCATED buffer (`copy_`, no allocation, no page faults:
  a fresh `clone()` measured 3× apart within the hour on one machine, so it is no baseline);
- `floor` of encode: one read of every parameter into a preallocated |x| buffer plus `torch.topk` of
  its chunks, the work any chunked top-k must do;
- `Compressor.encode` (error feedback + chunked top-k + quantisation + packing) and `decode` back to
  dense into one reused buffer per tensor (`decode(out=)`; the fresh-allocation figure is printed too).

Each figure is the MINIMUM of `--repeats` runs after one untimed warm-up round (the least-disturbed
run on a shared machine; medians are printed too), and ratios and ns/param come from the minima.
On CPU the fresh decode's peak resident memory (`bench.resident.PeakRSS`) is printed against the
dense fp32 model size: the decoded update itself is 1×, so anything above is the decoder's
temporaries. The wire size is the length of a real signed shard written by `write_shard`, and the
reader's full verification (`read_shard`) is timed too. Anchor: 146× fewer bytes than dense fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bittensor.sp_core import Keypair

from bench.cli import add_json_flag, print_json
from bench.resident import PeakRSS
from protocol.codec import Compressor, decode, layouts_for
from protocol.hparams import load_hparams
from protocol.model import param_shapes
from protocol.wire import Shard, ShardExpectation, ShardRules, read_shard, write_shard


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    parser.add_argument("--preset", default="150m", help="hparams preset name or TOML/JSON file (default 150m)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one hyperparameter (repeatable)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each step; the median is reported")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random pseudo-gradients")


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def benchmark(args: argparse.Namespace) -> dict:
    hp = load_hparams(args.preset, overrides=list(getattr(args, "overrides", []) or []))
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    repeats = max(1, int(args.repeats))
    shapes = param_shapes(hp)
    gen = torch.Generator().manual_seed(int(args.seed))
    deltas = {n: (torch.randn(tuple(s), generator=gen) * 1e-3).to(device) for n, s in shapes.items()}
    numel = sum(d.numel() for d in deltas.values())
    compressor = Compressor(hp.sparseloco)

    layouts = layouts_for(shapes, hp.sparseloco)
    # One preallocated buffer per role, as large as the largest tensor and viewed per tensor: the work is
    # the same as with a buffer per tensor, but a 1b model's baselines no longer need 3 extra model copies.
    largest = max(d.numel() for d in deltas.values())
    scratch = {role: torch.empty(largest, dtype=torch.float32, device=device) for role in ("copy", "mag", "out")}
    copies = {n: scratch["copy"][: d.numel()].view_as(d) for n, d in deltas.items()}
    mags = {n: scratch["mag"][: d.numel()] for n, d in deltas.items()}
    outs = {n: scratch["out"][: d.numel()] for n, d in deltas.items()}

    def copy_all() -> None:
        for n, d in deltas.items():
            copies[n].copy_(d)

    def read_topk() -> None:
        for n, d in deltas.items():
            lay = layouts[n]
            grid = d.reshape(lay.rows // lay.block_rows, lay.block_rows, lay.grid_cols, lay.block_cols)
            mag = mags[n].view(grid.shape[0], grid.shape[2], grid.shape[1], grid.shape[3])
            torch.abs(grid.transpose(1, 2), out=mag)
            mag.view(lay.n_chunks, lay.chunk_size).topk(lay.k, dim=1, sorted=False)

    copy_s, floor_s, encode_s, decode_s, fresh_s = [], [], [], [], []
    encoded: dict = {}
    fresh_peak = 0
    for attempt in range(repeats + 1):  # the first round warms up allocator and caches, untimed
        copy_s.append(_timed(copy_all, device)[0])
        floor_s.append(_timed(read_topk, device)[0])
        seconds, encoded = _timed(lambda: compressor.encode_all(deltas), device)
        encode_s.append(seconds)
        decode_s.append(_timed(lambda enc=encoded: [decode(e, out=outs[n]) for n, e in enc.items()], device)[0])
        with PeakRSS() as mem:  # the whole update decoded to fresh dense tensors: what a node holds at most
            seconds, dense = _timed(lambda enc=encoded: {n: decode(e) for n, e in enc.items()}, device)
            fresh_s.append(seconds)
            del dense
        fresh_peak = max(fresh_peak, mem.beyond)
        if attempt == 0:
            for times in (copy_s, floor_s, encode_s, decode_s, fresh_s):
                times.clear()

    debug_size = hp.shard.debug_sample_size
    keypair = Keypair.create_from_uri("//crucible-bench")
    shard = write_shard(
        encoded, keypair=keypair, netuid=0, window=0, revision=hp.revision(), data_digest="0" * 32,
        debug_values=torch.randn(debug_size, generator=gen),
        debug_positions=torch.randint(0, numel, (debug_size,), generator=gen),
    )
    expected = ShardExpectation(netuid=0, window=0, hotkey=keypair.ss58_address, rules=ShardRules.from_hparams(hp, shapes))
    read_s = []
    for _ in range(repeats):
        seconds, result = _timed(lambda: read_shard(shard, expected), torch.device("cpu"))
        if not isinstance(result, Shard):
            raise RuntimeError(f"bench: own shard rejected: {result}")
        read_s.append(seconds)

    dense_bytes = 4 * numel
    payload = sum(lay.wire_bytes for lay in layouts_for(shapes, hp.sparseloco).values())
    enc, dec, copy, floor, fresh = (min(v) for v in (encode_s, decode_s, copy_s, floor_s, fresh_s))
    ns = 1e9 / numel
    return {
        "preset": hp.name,
        "revision": hp.revision(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "params": numel,
        "tensors": len(shapes),
        "dense_fp32_bytes": dense_bytes,
        "payload_bytes": payload,
        "wire_bytes": len(shard),
        "max_shard_bytes": expected.max_bytes,
        "compression_ratio": round(dense_bytes / len(shard), 2),
        "payload_ratio": round(dense_bytes / payload, 2),
        "density": hp.sparseloco.topk / hp.sparseloco.chunk_2d**2,
        "encode_s": round(enc, 4),
        "decode_s": round(dec, 4),
        "decode_fresh_s": round(fresh, 4),
        "copy_s": round(copy, 4),
        "floor_read_topk_s": round(floor, 4),
        "median_s": {k: round(statistics.median(v), 4) for k, v in
                     (("encode", encode_s), ("decode", decode_s), ("decode_fresh", fresh_s), ("copy", copy_s),
                      ("floor_read_topk", floor_s))},
        "ns_per_param": {"encode": round(enc * ns, 3), "decode": round(dec * ns, 3), "copy": round(copy * ns, 3),
                         "floor_read_topk": round(floor * ns, 3)},
        "read_shard_s": round(min(read_s), 4),
        "encode_vs_copy": round(enc / copy, 2),
        "encode_vs_floor": round(enc / floor, 2),
        "decode_vs_copy": round(dec / copy, 2),
        "decode_fresh_vs_copy": round(fresh / copy, 2),
        "decode_fresh_peak_bytes": fresh_peak if device.type == "cpu" else None,
        "decode_fresh_peak_vs_fp32_model": round(fresh_peak / dense_bytes, 3) if device.type == "cpu" else None,
    }


def run_cli(args: argparse.Namespace) -> int:
    return print_json(benchmark(args), args)
