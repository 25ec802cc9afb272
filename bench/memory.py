"""`crucible bench memory`: how much memory a miner needs per rank, and how many GPUs that makes.

    crucible bench memory --preset 8b --ranks 8 --micro-batch 2
    crucible bench memory --preset tiny --measure        # also measure this process's peak (CPU, 1 rank)
    crucible bench memory --preset tiny --ranks 2 --measure   # each FSDP2 rank's peak (gloo, CPU processes)

Bytes per rank, by what holds them:
- parameters, gradients: float32 master weights and their gradients (N·4 each), divided by the ranks
  when FSDP2-sharded (`--ranks R`, R > 1; 1 means one process holding everything); plus the compute
  copy: with FSDP the running group and the prefetched one all-gathered in the compute dtype and the
  largest group's whole float32 gradient and reduce-scatter copy, without it under bf16 autocast a
  bf16 copy of every weight (autocast's cast cache). Gradients are set to None at each inner step's
  start, so at the training peak (the backward's start) only `gradients_at_training_peak` exist: the
  head's whole gradient (1 rank; under FSDP2 it is in the gathered term), or with accumulation
  (several micro-batches per step) all of them.
- optimizer: AdamW's two float32 moments (N·8, sharded like the parameters).
- error feedback: the SparseLoCo buffer (N·4, sharded; a tensor whose R row shards are not whole chunk
  rows is replicated whole on every rank, with its Δ: `replicated_fraction` says how much of N that is).
- window: θ_w kept for the pseudo-gradient and the Δ itself (N·8, sharded): the miner holds both
  while it compresses.
- codec: the |x| scratch of the largest tensor (float32) and the encoded pieces (≈ 2.6 % of N bytes).
- activations: what autograd saves for the backward pass for one micro-batch (seq_len tokens per
  sample), counted exactly by running one and two decoder layers on the meta device (no memory
  used) and extrapolating per layer, plus the logits' float32 softmax buffers. With
  `--checkpointing`, only each layer's input is kept plus one layer's recomputation.

The smallest GPU count is the smallest R (each rank then running ⌈batch/R⌉ samples, --micro-batch at
a time: its own activations, not those of --ranks) whose per-rank total, plus 10 % for allocator
fragmentation and the CUDA context, fits each GPU size (80 GB, 141 GB by default). Everything is an
estimate; `--measure` compares it against a real run on this machine: the RSS high-water mark above
the process's baseline (torch, gloo and a warm-up window of a small model through the same code,
reported as `per_rank_baseline_bytes`) of one window of two inner steps and its encode on CPU, per
phase (`per_rank_phases`: build, step1, step2, deltas, encode). `--ranks 1`: one child process
holding the whole model; R > 1: R gloo child processes running the FSDP2 miner's path
(`neurons.sharding.build_sharded_miner` from rank 0's whole θ_0, then the sharded window), each
rank's peak. Every measured process runs glibc's malloc as `ALLOCATOR_ENV` says (one arena, fixed
1 MiB mmap threshold; why, with the numbers, at its definition), so 1 and R ranks are measured alike.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

from bench.cli import add_json_flag, print_json

GB = 10**9
GPU_SIZES_GB = (80, 141)
OVERHEAD = 1.10  # allocator fragmentation, CUDA context, NCCL buffers
RANK_CHOICES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="hparams preset or file (default tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override one hyperparameter")
    parser.add_argument("--ranks", type=int, default=1, help="FSDP2 ranks sharing the model (default 1)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="samples per forward/backward on each rank (default: the rank's whole share of "
                             "inner.batch_size)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                        help="compute precision of activations (default bf16; master weights stay fp32)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    parser.add_argument("--gpu-gb", type=float, action="append", default=None,
                        help=f"GPU memory sizes to plan for, GB (repeatable; default {', '.join(map(str, GPU_SIZES_GB))})")
    parser.add_argument("--measure", action="store_true",
                        help="also measure each rank's peak over one window (CPU child processes; gloo FSDP2 when --ranks > 1)")
    add_json_flag(parser)


def _saved_bytes(hp, layers: int, micro: int, precision: str) -> int:
    """Bytes autograd saves for one forward of `micro` samples through a `layers`-layer model (meta device)."""
    from unittest import mock

    import torch
    from transformers import LlamaForCausalLM, masking_utils

    from protocol.model import llama_config

    config = llama_config(hp)
    config.num_hidden_layers = layers
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = {id(p) for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    seq = hp.model.seq_len
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in params:
            return t  # a weight (or its transpose): counted as parameters
        if base.dim() == 2 and (tuple(base.shape) in weight_shapes or tuple(base.shape[::-1]) in weight_shapes):
            return t  # autocast's bf16 copy of a weight: counted with the parameters (`compute_copy`)
        if base.dim() >= 2 and tuple(base.shape[-2:]) == (seq, seq):
            return t  # attention scores/probabilities: meta runs the math kernel; the fused (flash)
            # kernels CPUs and GPUs run keep only O(seq) per head instead
        seen[id(base)] = base  # keeps it alive, so ids stay unique; a tensor saved twice counts once
        return t

    ids = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    # the packed-sequence check reads position ids (.item()), which meta tensors cannot; training
    # inputs are never packed, so skip it
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast, \
            mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
        model(input_ids=ids, labels=ids)
    return sum(t.numel() * t.element_size() for t in seen.values())


def activation_bytes(hp, micro: int, precision: str = "bf16", checkpointing: bool = False) -> dict[str, int]:
    """Saved activations for one micro-batch: per layer and the rest (embeddings, norm, logits, loss)."""
    one, two = _saved_bytes(hp, 1, micro, precision), _saved_bytes(hp, 2, micro, precision)
    per_layer, rest = two - one, 2 * one - two
    # the loss's backward materialises float32 logits-sized buffers next to the saved logits (the
    # gradient through the loss and through log-softmax, and its input): three, measured on tiny
    logits_grad = 3 * micro * hp.model.seq_len * hp.model.vocab_size * 4
    layers = hp.model.num_layers
    if checkpointing:
        act_bf = 2 if precision == "bf16" else 4
        layer_inputs = layers * micro * hp.model.seq_len * hp.model.hidden_size * act_bf
        total = layer_inputs + per_layer + rest + logits_grad
    else:
        total = layers * per_layer + rest + logits_grad
    return {"per_layer": per_layer, "other": rest + logits_grad, "total": total}


_ACTIVATIONS: dict[tuple[str, str, bool], dict[int, int]] = {}  # (model, precision, checkpointing) → micro → bytes


def plan(hp, ranks: int, micro: int | None = None, precision: str = "bf16", checkpointing: bool = False,
         gpu_sizes_gb: tuple[float, ...] = GPU_SIZES_GB) -> dict[str, Any]:
    from neurons.sharding import row_aligned
    from protocol.codec import ChunkLayout
    from protocol.model import param_shapes

    shapes = param_shapes(hp)
    n = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values())
    layer0 = sum(math.prod(s) for name, s in shapes.items() if ".layers.0." in name)
    head = max(math.prod(s) for name, s in shapes.items() if "embed_tokens" in name or "lm_head" in name)
    wire = sum(ChunkLayout.for_shape(s, hp.sparseloco).wire_bytes for s in shapes.values())
    asked_micro = micro
    acts_of = _ACTIVATIONS.setdefault((hp.model.model_dump_json(), precision, checkpointing), {})

    def micro_at(r: int) -> int:  # each of r ranks runs ⌈batch/r⌉ samples, --micro-batch at a time
        rows = math.ceil(hp.inner.batch_size / r)
        return min(asked_micro or rows, rows)

    def per_rank(r: int) -> dict[str, int]:
        m = micro_at(r)
        if m not in acts_of:  # the activations of r ranks' micro-batch (not --ranks's: gpus_needed tries every r)
            acts_of[m] = activation_bytes(hp, m, precision, checkpointing)["total"]
        acts = acts_of[m]
        shard = math.ceil(n / r)
        # tensors whose row shards are not whole chunk rows fall back to replication (`neurons.sharding`):
        # Δ all-gathered and error feedback held whole on every rank
        whole = 0 if r == 1 else sum(math.prod(s) for s in shapes.values() if not row_aligned(s, r, hp.sparseloco))
        coded = math.ceil((n - whole) / r) + whole  # elements of error feedback / Δ on this rank
        if r == 1:  # autocast keeps a bf16 copy of every weight it used until the backward is done
            gathered = 2 * n if precision == "bf16" else 0
        else:  # FSDP2 (`neurons.sharding`: embeddings, each layer, the head in groups of their own)
            # all-gathers the running group and prefetches the next in the compute dtype; the largest
            # group's backward also holds its whole float32 gradient and the reduce-scatter's copy of it
            group = max(layer0, head)
            gathered = (group + layer0) * (2 if precision == "bf16" else 4) + 2 * 4 * group
        parts = {
            "parameters": 4 * shard + gathered,
            "gradients": 4 * shard,
            "optimizer": 8 * shard,
            "error_feedback": 4 * coded,
            "window_buffers": 4 * shard + 4 * coded,  # θ_w's rows, Δ (rows, or whole where replicated)
            "codec": 4 * (min(largest, shard) if r > 1 and not whole else largest) + wire,
            "activations": acts,
        }
        # gradients are set to None at each step's start, so the forward's activations meet only the
        # gradients the backward has made so far: the first (the head's, whole; under FSDP2 already in
        # `gathered`), or with accumulation (several micro-batches per step) every gradient of the step
        if math.ceil(math.ceil(hp.inner.batch_size / r) / m) > 1:  # accumulation at r ranks
            parts["gradients_at_training_peak"] = parts["gradients"]
        else:
            parts["gradients_at_training_peak"] = 4 * head if r == 1 else 0
        resident = parts["parameters"] + parts["gradients"] + parts["optimizer"] + parts["error_feedback"]
        # training holds θ_w (half the window buffers) and the activations; publishing holds θ_w, Δ and
        # the codec's buffers after the activations are gone: the peak is the larger phase
        parts["peak_training"] = (resident - parts["gradients"] + parts["gradients_at_training_peak"]
                                  + parts["window_buffers"] // 2 + acts)
        parts["peak_publishing"] = resident + parts["window_buffers"] + parts["codec"]
        parts["total"] = max(parts["peak_training"], parts["peak_publishing"])
        return parts

    def gpus_needed(size_gb: float) -> int | None:
        for r in RANK_CHOICES:
            if per_rank(r)["total"] * OVERHEAD <= size_gb * GB:
                return r
        return None

    micro = micro_at(ranks)
    accumulation = math.ceil(math.ceil(hp.inner.batch_size / ranks) / micro)
    return {
        "preset": hp.name, "parameters": n, "ranks": ranks, "micro_batch": micro, "batch_size": hp.inner.batch_size,
        "accumulation_steps": accumulation, "precision": precision, "checkpointing": checkpointing,
        "bytes_per_rank": per_rank(ranks),
        "replicated_fraction": round(sum(math.prod(s) for s in shapes.values()
                                         if ranks > 1 and not row_aligned(s, ranks, hp.sparseloco)) / n, 3),
        "gb_per_rank": round(per_rank(ranks)["total"] / GB, 3),
        "gpus_needed": {f"{g:g}GB": gpus_needed(g) for g in gpu_sizes_gb},
        "overhead_factor": OVERHEAD,
    }


def _rss_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _Phases:
    """Peak RSS above the baseline (RSS when made) per phase: the high-water mark is reset at each mark."""

    def __init__(self) -> None:
        self.base, self.peaks, self.started = _rss(), {}, time.perf_counter()
        self._reset()

    @staticmethod
    def _reset() -> None:
        try:  # reset the high-water mark to the RSS now (Linux ≥ 4.0); without it each phase's is the run's so far
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def mark(self, name: str) -> None:
        self.peaks[name] = _rss_hwm() - self.base
        self._reset()

    def result(self) -> dict[str, Any]:
        return {"peak_bytes": max(self.peaks.values()), "phases": self.peaks, "baseline_bytes": self.base,
                "seconds": round(time.perf_counter() - self.started, 1)}


def _small(hp):
    return hp.model_copy(update={
        "model": hp.model.model_copy(update={"hidden_size": 64, "intermediate_size": 128, "num_layers": 1,
                                             "num_heads": 2, "num_kv_heads": 2, "vocab_size": 512, "seq_len": 32}),
        "inner": hp.inner.model_copy(update={"steps": 1, "batch_size": 2})})


def _warm_up(hp, settings, ctx=None) -> None:
    """One window of a small model through the same code (autocast or FSDP2 and gloo, AdamW, codec), freed."""
    import torch

    from neurons.sharding import build_sharded_miner
    from neurons.training import inner_train, make_inner_optimizer
    from protocol.codec import Compressor
    from protocol.model import build_model

    small = _small(hp)
    samples = torch.randint(0, 512, (2, 32))
    if ctx is not None:
        miner = build_sharded_miner(build_model(small) if ctx.is_main else None, small, ctx, settings, "cpu")
        miner.window(samples, 0, b"warm-up")
        return
    model = build_model(small)
    inner_train(model, make_inner_optimizer(model, small), samples, small, 0, settings=settings)
    Compressor(small.sparseloco).encode_all({n: p.detach() for n, p in model.named_parameters()})


def _measure_one(_: int, hp_json: str, micro: int | None, precision: str, checkpointing: bool, steps: int,
                 out: str) -> None:
    """One process, the whole model (torch.multiprocessing.spawn target, like the ranks: same allocator)."""
    import json

    import torch

    from neurons.training import TrainSettings, inner_train, make_inner_optimizer, prepare_model
    from protocol.codec import Compressor
    from protocol.hparams import HParams
    from protocol.model import build_model

    hp = HParams.model_validate_json(hp_json)
    settings = TrainSettings(micro_batch=micro, precision=precision, checkpointing=checkpointing)
    samples = torch.randint(0, hp.model.vocab_size, (hp.inner.batch_size * steps, hp.model.seq_len),
                            generator=torch.Generator().manual_seed(0))
    _warm_up(hp, settings)  # load kernels and code pages first: they are not the model's memory
    phases = _Phases()
    model = prepare_model(build_model(hp), settings)
    optimizer = make_inner_optimizer(model, hp)
    compressor = Compressor(hp.sparseloco)  # error feedback allocated first, as in a miner's steady state
    compressor.load_state_dict({name: torch.ones_like(p) for name, p in model.named_parameters()})
    theta_w = {name: p.detach().clone() for name, p in model.named_parameters()}
    phases.mark("build")
    for step in range(steps):
        batch = samples[step * hp.inner.batch_size : (step + 1) * hp.inner.batch_size]
        inner_train(model, optimizer, batch, hp, 0, settings=settings)
        phases.mark(f"step{step + 1}")
    with torch.no_grad():
        delta = {name: theta_w[name] - p for name, p in model.named_parameters()}
    phases.mark("deltas")
    compressor.encode_all(delta)
    phases.mark("encode")
    with open(f"{out}/rank0.json", "w") as f:
        json.dump(phases.result(), f)


def _measure_rank(rank: int, world: int, port: int, hp_json: str, micro: int | None, precision: str,
                  checkpointing: bool, steps: int, out: str) -> None:
    """One FSDP2 rank (torch.multiprocessing.spawn target): the miner's path from rank 0's whole θ."""
    import json

    import torch
    import torch.distributed as dist

    from neurons.distributed import DistContext
    from neurons.sharding import build_sharded_miner, deltas, snapshot
    from neurons.training import TrainSettings, inner_train
    from protocol.hparams import HParams
    from protocol.model import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world=world, sharded=True)
    hp = HParams.model_validate_json(hp_json)
    settings = TrainSettings(micro_batch=micro, precision=precision, checkpointing=checkpointing)
    samples = torch.randint(0, hp.model.vocab_size, (hp.inner.batch_size * steps, hp.model.seq_len),
                            generator=torch.Generator().manual_seed(0))
    _warm_up(hp, settings, ctx)
    phases = _Phases()  # from here: rank 0 builds θ_0 whole, every rank gets its rows (`build_sharded_miner`)
    miner = build_sharded_miner(build_model(hp) if ctx.is_main else None, hp, ctx, settings, "cpu")
    slots, model = miner.slots, miner.model
    miner.compressor.inner.load_state_dict({n: torch.ones(s.rows if s.aligned else s.shape[0], *s.shape[1:])
                                            for n, s in slots.items()})
    theta_w = snapshot(model)
    phases.mark("build")
    for step in range(steps):
        batch = samples[step * hp.inner.batch_size : (step + 1) * hp.inner.batch_size]
        inner_train(model, miner.optimizer, batch, hp, 0, ctx, settings)
        phases.mark(f"step{step + 1}")
    update = deltas(model, theta_w, slots)
    phases.mark("deltas")
    miner.compressor.encode_all(update)
    phases.mark("encode")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(phases.result(), f)
    dist.destroy_process_group()


# glibc's malloc, as the measured processes run it: one arena (gloo's threads would otherwise each get
# one whose freed pages stay resident), and a fixed mmap threshold, so a freed tensor of ≥ 1 MiB goes
# back to the system at once. The default threshold grows to 32 MiB after the first such free, and
# every smaller freed tensor (activations, gradients) then stays in the heap, resident, for whoever
# comes next: measured on 150m (seq 256, batch 8, fp32), that kept 0.8-1.5 GB resident that no tensor
# used, bimodal from run to run (one process 5.7 or 7.2 GB). A GPU's caching allocator reuses such
# blocks for the next tensors of the same sizes instead.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def measure(hp, ranks: int, micro: int | None, precision: str, checkpointing: bool = False,
            steps: int = 2) -> dict[str, Any]:
    """Per-rank peak RSS over a window of `steps` inner steps and its encode: one process holding the whole
    model (`ranks` 1) or `ranks` gloo FSDP2 processes on CPU; each in a child process with `ALLOCATOR_ENV`."""
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    hp = hp.model_copy(update={"inner": hp.inner.model_copy(update={"steps": steps})})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = {key: os.environ.get(key) for key in ALLOCATOR_ENV}  # the children's, not this process's for good
    for key, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)
    allocator = {key: os.environ[key] for key in ALLOCATOR_ENV}
    try:
        with tempfile.TemporaryDirectory() as out:
            if ranks == 1:
                mp.spawn(_measure_one, args=(hp.model_dump_json(), micro, precision, checkpointing, steps, out),
                         nprocs=1)
            else:
                mp.spawn(_measure_rank, args=(ranks, port, hp.model_dump_json(), micro, precision, checkpointing,
                                              steps, out), nprocs=ranks, join=True)
            per_rank = [json.load(open(f"{out}/rank{r}.json")) for r in range(ranks)]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"peak_bytes": max(r["peak_bytes"] for r in per_rank),
            "per_rank_peak_bytes": [r["peak_bytes"] for r in per_rank],
            "per_rank_phases": [r["phases"] for r in per_rank],
            # not in the peaks: each process's RSS before the model (torch, gloo, the warm-up's code pages)
            "per_rank_baseline_bytes": [r["baseline_bytes"] for r in per_rank],
            "seconds": max(r["seconds"] for r in per_rank),
            "allocator": allocator}


def run_cli(args: argparse.Namespace) -> int:
    from neurons.flags import FlagError
    from protocol.hparams import load_hparams

    for flag, value in (("--ranks", args.ranks), ("--micro-batch", args.micro_batch)):
        if value is not None and value < 1:  # 0 ranks divided by zero, negative ones made negative tensor sizes
            raise FlagError(f"{flag}: must be at least 1, got {value}")
    if args.gpu_gb and min(args.gpu_gb) <= 0:
        raise FlagError(f"--gpu-gb: must be positive, got {min(args.gpu_gb):g}")
    hp = load_hparams(args.preset, args.overrides)
    sizes = tuple(args.gpu_gb) if args.gpu_gb else GPU_SIZES_GB
    result = plan(hp, args.ranks, args.micro_batch, args.precision, args.checkpointing, sizes)
    if args.measure:
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        measured = measure(hp, args.ranks, args.micro_batch, args.precision, args.checkpointing)
        estimate = result["bytes_per_rank"]["total"]
        result["measured"] = {**measured, "estimate_bytes": estimate,
                              "estimate_over_measured": round(estimate / max(1, measured["peak_bytes"]), 3),
                              "with_overhead_over_measured": round(estimate * OVERHEAD / max(1, measured["peak_bytes"]), 3)}
    return print_json(result, args)
