"""Worker for test_sharded_validator.py: one rank of a 2-process gloo FSDP2 validator window on tiny (CPU).

Rank 0 drives `neurons.sharded_eval.ShardedValidatorRanks` the way `neurons.validator.Validator` does
(its whole θ scattered into every rank's rows, then every collective announced over the control
group); rank 1 runs the production follower loop (`follow_validator`) and never holds the whole model.
The window: θ's digest, stage 2 (the reference score and four miners; then a window of one unusable
update), θ's digest again, the debug sample, the outer step on each rank's rows, the digest after it,
θ gathered whole. Inputs (`window_inputs`) are built the same way here
and in the test's single process: two Gaussian updates made here, and the honest miners' updates the
test trained, passed as signed wire shards and read back through `read_shard` (the bucket's path:
checked bytes, never pickles).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bittensor.sp_core import Keypair

from gauntlet.evaluate import UpdateError
from neurons.distributed import DistContext, broadcast_work, init_distributed
from neurons.sharded_eval import ShardedValidatorRanks, build_sharded_theta, follow_validator, whole_model
from neurons.sharding import sharded_context
from protocol.codec import Compressor, EncodedTensor
from protocol.codec_aggregate import clip_factors, robust_clip_norm, update_norm
from protocol.data import PageStore, assign, random_samples
from protocol.hparams import HParams, load_hparams
from protocol.model import build_model, param_digest, param_shapes
from protocol.sample import debug_positions
from protocol.wire import Shard, ShardExpectation, ShardRules, read_shard

OVERRIDES = ["gauntlet.eval_batches=1", "inner.steps=4"]  # one batch of 8 samples a side; 32 samples a window
HONEST = ("//Alice", "//Bob")  # the test's honest miners (signing keys of their wire shards)
SEED = b"sharded-eval-window"


def honest_path(shards: str | Path, uri: str) -> Path:
    return Path(shards, uri.strip("/") + ".bin")


def read_honest(hp: HParams, shards: str | Path) -> dict[str, dict[str, EncodedTensor]]:
    """The honest miners' updates, from their signed wire shards (checked like a bucket's)."""
    rules = ShardRules.from_hparams(hp, param_shapes(hp))
    out = {}
    for uri in HONEST:
        hotkey = Keypair.create_from_uri(uri).ss58_address
        shard = read_shard(honest_path(shards, uri).read_bytes(), ShardExpectation(1, 0, hotkey, rules))
        assert isinstance(shard, Shard), shard
        out[uri.strip("/")] = dict(shard.tensors)
    return out


def _update(hp: HParams, seed: int, scale: float) -> dict[str, EncodedTensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in build_model(hp).named_parameters()}
    return Compressor(hp.sparseloco).encode_all({n: torch.randn(s, generator=g) * scale for n, s in shapes.items()})


def window_inputs(hp: HParams, store: PageStore, shards: str | Path) -> dict:
    """Random batches; four miners' encoded updates (2 honest, 2 noise) with their clip factors and
    assigned batches; one unusable update; the outer step's clip norm; debug positions."""
    batch = hp.inner.batch_size
    n = hp.gauntlet.eval_batches * batch

    def batches(seed: bytes) -> list[torch.Tensor]:
        pages = store.pages(random_samples(seed, n, store.num_train))
        return [pages[i : i + batch] for i in range(0, n, batch)]

    def assigned(hotkey: str) -> list[torch.Tensor]:  # an honest miner's own samples, as the Scorer draws them
        pages = store.pages(assign(hotkey, 0, hp.data.seed, hp.samples_per_window, store.num_train)[:n])
        return [pages[i : i + batch] for i in range(0, n, batch)]

    miners = {"noise-a": _update(hp, 1, 2e-2), "noise-b": _update(hp, 2, 3e-2), **read_honest(hp, shards)}
    factors = clip_factors({k: update_norm(t) for k, t in miners.items()})
    bad = dict(miners["noise-a"])
    name = sorted(bad)[0]
    enc = bad[name]
    bad[name] = EncodedTensor(enc.idx, enc.codes, torch.full_like(enc.lookup, float("inf")), enc.layout)
    numels = {n: p.numel() for n, p in build_model(hp).named_parameters()}
    return {"random": batches(b"random"), "miners": miners, "factors": factors, "bad": bad,
            "assigned": {k: assigned(k) if "noise" not in k else batches(b"assigned-" + k.encode()) for k in miners},
            "clip": robust_clip_norm({k: update_norm(t) for k, t in miners.items()}),
            "step": hp.gauntlet.eval_step_scale * hp.outer.lr,
            "positions": debug_positions(SEED, numels, hp.shard.debug_sample_size)}


def main(data: str, shards: str, out: str, precision: str = "fp32") -> None:
    torch.set_num_threads(1)
    ctx = sharded_context(init_distributed())
    hp = load_hparams("tiny", OVERRIDES)
    if not ctx.is_main:
        follow_validator(hp, ctx, precision)  # the production follower loop (rows only), until rank 0 says stop
        dist.destroy_process_group()
        return
    inputs = window_inputs(hp, PageStore(data, hp), shards)
    broadcast_work(ctx, {"op": "shard"})  # as Validator.shard: rank 0's whole θ scattered into every rank's rows
    ranks = ShardedValidatorRanks(build_sharded_theta(build_model(hp), hp, ctx, precision, "cpu"))
    before = ranks.call("digest")
    started = time.perf_counter()
    step, miners, factors = inputs["step"], inputs["miners"], inputs["factors"]
    ranks.begin(inputs["random"], {k: (miners[k], factors[k]) for k in sorted(miners)})
    reference = ranks.reference(step)
    results = {k: ranks.evaluate(k, inputs["assigned"][k], step).model_dump() for k in sorted(miners)}
    ranks.begin(inputs["random"], {"bad": (inputs["bad"], 1.0)})  # a window whose one update is unusable
    bad_reference = ranks.reference(step)
    try:
        ranks.evaluate("bad", inputs["assigned"]["noise-a"], step)
        refused = ""
    except UpdateError as exc:
        refused = str(exc)
    eval_s = time.perf_counter() - started
    after_eval = ranks.call("digest")
    sample = ranks.call("sample", positions=inputs["positions"])
    ranks.call("apply", shards=miners, clip=inputs["clip"])
    stepped = ranks.call("digest")
    whole = ranks.call("gather_whole")
    broadcast_work(ctx, {"op": "stop"})
    Path(out, f"rank0-{precision}.json").write_text(json.dumps(
        {"before": before, "after_eval": after_eval, "stepped": stepped, "reference": reference, "bad_reference": bad_reference,
         "sample": {n: v.tolist() for n, v in sample.items()}, "whole_digest": param_digest(whole_model(hp, whole)),
         "results": results, "refused": refused, "eval_s": eval_s}))
    dist.destroy_process_group()


def follow(init_method: str, hparams_json: str) -> None:
    """Rank 1 of tests/test_sharded_validator_node.py's group (rank 0 is the pytest process's `Validator`)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=1, world_size=2)
    ctx = DistContext(rank=1, world=2, sharded=True, control=dist.new_group(backend="gloo"))
    follow_validator(HParams.model_validate_json(hparams_json), ctx)
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "follow":
        follow(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
