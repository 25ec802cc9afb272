"""`crucible bench gpu`: the device check: one real miner window on this machine's accelerator, as JSON.

    crucible bench gpu --preset 150m                # on a GPU: bf16, the preset's whole window
    crucible bench gpu --preset 1b --micro-batch 4
    crucible bench gpu --preset tiny --set inner.steps=2   # CPU (fp32): what CI runs

One window as a miner computes it (`neurons.training.inner_train` over inner.steps × inner.batch_size
samples of seq_len tokens, with the node options `--precision`, `--micro-batch`, `--checkpointing`,
`--compile`), then the codec (error-feedback encode of Δ, decode of the shard) and one stage-2
evaluation of that update as a validator runs it (`gauntlet.evaluate.Evaluator`: losses on
`gauntlet.eval_batches` assigned and random batches before and after, θ restored). Tokens are random
(throughput does not depend on the text); the assigned batches are the window's own samples, so the
update must lower their loss, which the JSON reports.

Printed: tokens/s; model FLOPS utilisation = 6·N·tokens/s ÷ the device's peak, N every parameter
(embeddings included; attention's seq² FLOPs are left out, so MFU is slightly understated); the peak
is the vendor datasheet's dense (no sparsity) bf16 tensor-core figure for known GPUs (`PEAK_TFLOPS`),
fp32 when `--precision fp32`, or `--peak-tflops`; unknown devices and CPUs report MFU as null. Peak
memory is torch's allocator high-water mark on a GPU, the process's RSS high-water mark on a CPU.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.cli import add_json_flag, print_json

# Dense tensor-core peaks from NVIDIA's datasheets, TFLOPS: (bf16, fp32 via TF32 dense)
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.4, 494.7),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.4, 494.7),  # SXM
    "A100": (312.0, 156.0),
    "L40S": (362.05, 183.0),
    "L4": (121.0, 60.0),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="hparams preset or file (default tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override one hyperparameter")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="compute precision (default bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--micro-batch", type=int, default=None, help="samples per forward/backward")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, TFLOPS (for MFU)")
    add_json_flag(parser)


def peak_tflops(device: torch.device, precision: str, given: float | None) -> tuple[float | None, str]:
    """The peak to divide by, and where it came from."""
    if given is not None:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for this device (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return (bf16 if precision == "bf16" else fp32), f"NVIDIA datasheet, dense, {precision}: {key} ({name})"
    return None, f"unknown GPU {name!r} (pass --peak-tflops)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from bench.memory import _rss_hwm

    return _rss_hwm()


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from gauntlet.evaluate import Evaluator
    from neurons.training import TrainSettings, inner_train, make_inner_optimizer, prepare_model
    from protocol.codec import Compressor, decode
    from protocol.hparams import load_hparams
    from protocol.model import build_model, count_params

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    hp = load_hparams(args.preset, args.overrides)
    settings = TrainSettings(micro_batch=args.micro_batch, precision=precision, checkpointing=args.checkpointing,
                             compile=args.compile)
    gen = torch.Generator().manual_seed(0)
    n_samples = hp.inner.steps * hp.inner.batch_size
    samples = torch.randint(0, hp.model.vocab_size, (n_samples, hp.model.seq_len), generator=gen)
    random = torch.randint(0, hp.model.vocab_size, (hp.inner.batch_size * hp.gauntlet.eval_batches,
                                                    hp.model.seq_len), generator=gen)
    model = prepare_model(build_model(hp, device), settings)
    n_params = count_params(model)
    optimizer = make_inner_optimizer(model, hp)
    theta_w = {name: p.detach().clone() for name, p in model.named_parameters()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    _sync(device)
    started = time.perf_counter()
    stats = inner_train(model, optimizer, samples, hp, 0, settings=settings)
    _sync(device)
    train_s = time.perf_counter() - started
    with torch.no_grad():
        delta = {name: theta_w[name] - p for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.copy_(theta_w[name])

    compressor = Compressor(hp.sparseloco)
    started = time.perf_counter()
    encoded = compressor.encode_all(delta)
    _sync(device)
    encode_s = time.perf_counter() - started
    del delta
    started = time.perf_counter()
    update = {name: decode(enc, device) for name, enc in encoded.items()}
    _sync(device)
    decode_s = time.perf_counter() - started

    batch = hp.inner.batch_size
    assigned = [samples[i : i + batch].to(device) for i in range(0, batch * hp.gauntlet.eval_batches, batch)]
    evaluator = Evaluator(model, [random[i : i + batch].to(device) for i in range(0, len(random), batch)])
    _ = evaluator.loss_before_random  # once per window, shared by every miner evaluated
    _sync(device)
    started = time.perf_counter()
    result = evaluator.evaluate(update, assigned, hp.outer.lr)
    _sync(device)
    eval_s = time.perf_counter() - started

    tokens_per_s = stats.tokens / train_s
    peak, peak_source = peak_tflops(device, precision, args.peak_tflops)
    flops = 6 * n_params * tokens_per_s
    return {
        "preset": hp.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "micro_batch": args.micro_batch, "checkpointing": args.checkpointing,
        "compile": args.compile, "parameters": n_params, "inner_steps": hp.inner.steps, "tokens": stats.tokens,
        "train_s": round(train_s, 3), "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(flops / 1e12, 3), "peak_tflops": peak, "peak_source": peak_source,
        "mfu": round(flops / (peak * 1e12), 4) if peak else None,
        "peak_memory_bytes": _peak_memory(device), "encode_s": round(encode_s, 4), "decode_s": round(decode_s, 4),
        "shard_bytes": sum(enc.nbytes for enc in encoded.values()),
        "validator_s_per_miner": round(eval_s, 3),
        "first_loss": stats.losses[0], "last_loss": stats.losses[-1],
        "eval_loss_before": result.loss_before_assigned, "eval_loss_after": result.loss_after_assigned,
    }


def run_cli(args: argparse.Namespace) -> int:
    return print_json(benchmark(args), args)
