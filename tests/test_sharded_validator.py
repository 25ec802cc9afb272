"""The FSDP2-sharded validator (neurons.sharded_eval): 2 gloo ranks on CPU, tiny, against one process.

One 2-rank run (module fixture, ~10 s) evaluates four miners (two honest updates trained here and passed
as signed wire shards, two Gaussian noise updates) plus one unusable update, then steps θ; the single
process does the same with `neurons.scoring.LocalBackend` (`gauntlet.evaluate.Evaluator`).

Tolerance (fp32): the sharded forward passes run each batch's rows split over the ranks (4 of 8 rows
each) and sum the token-weighted losses in float64 across ranks, so they differ from one process only
in float summation order: smaller matmuls, a batch mean over 4 rows instead of 8. Measured: ≤ 1 float32
ulp of the loss (9.5e-7 at a loss of 8.4), loss scores ≤ 1e-7 apart. Allowed: 1e-5 on losses (~10 ulps)
and 3e-6 on scores (two such loss errors over a loss of 8.4), against honest scores ~2e-3 and a sampling
spread of ~1e-3. Everything else is exact: θ after evaluation (digest), the debug sample, the outer step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bittensor.sp_core import Keypair

from gauntlet.evaluate import UpdateError
from neurons.scoring import LocalBackend
from neurons.training import TrainSettings, inner_train, make_inner_optimizer
from protocol.codec import Compressor
from protocol.codec_aggregate import aggregate_encoded, apply_outer_step
from protocol.data import assign, samples_digest
from protocol.hparams import load_hparams
from protocol.model import build_model, param_digest
from protocol.sample import debug_positions, flat_sample, gather_sample
from protocol.wire import write_shard
from tests.conftest import torchrun
from tests.sharded_eval_worker import HONEST, OVERRIDES, SEED, honest_path, window_inputs

REPO = Path(__file__).resolve().parents[1]
LOSS_TOL, SCORE_TOL = 1e-5, 3e-6
BF16_TOL = 1e-4  # bf16 vs fp32 loss scores: measured ≤ 5e-5 (test_bf16_scores_against_fp32), honest scores ~1e-3


@pytest.fixture(scope="module")
def hp():
    return load_hparams("tiny", OVERRIDES)


@pytest.fixture(scope="module")
def honest_shards(tmp_path_factory, tiny_store, hp) -> Path:
    """Two honest miners' window-0 updates (4 inner steps on their assigned samples), as signed wire shards."""
    out = tmp_path_factory.mktemp("honest")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in one_process
    try:
        _train_honest(hp, tiny_store, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _train_honest(hp, tiny_store, out: Path) -> None:
    for uri in HONEST:
        theta_w, model = build_model(hp), build_model(hp)
        indices = assign(uri.strip("/"), 0, hp.data.seed, hp.samples_per_window, tiny_store.num_train)
        inner_train(model, make_inner_optimizer(model, hp), tiny_store.pages(indices), hp, 0)
        before = dict(theta_w.named_parameters())
        encoded = Compressor(hp.sparseloco).encode_all({n: before[n].detach() - p.detach()
                                                        for n, p in model.named_parameters()})
        positions = debug_positions(SEED, {n: p.numel() for n, p in before.items()}, hp.shard.debug_sample_size)
        honest_path(out, uri).write_bytes(write_shard(
            encoded, keypair=Keypair.create_from_uri(uri), netuid=1, window=0, revision=hp.revision(),
            data_digest=samples_digest(indices), debug_values=flat_sample(gather_sample(before, positions))))


def run_ranks(data: Path, shards: Path, out: Path, precision: str) -> dict:
    done = torchrun([str(REPO / "tests" / "sharded_eval_worker.py"), str(data), str(shards), str(out), precision],
                    out / "torchrun")
    assert done.returncode == 0, done.report()
    return json.loads((out / f"rank0-{precision}.json").read_text())


def one_process(hp, inputs: dict, precision: str = "fp32") -> tuple:
    """The single-process stage 2 on the same θ, updates and samples: (model, reference, results, refusal).

    One thread, like each worker rank: on a loaded 2-core machine two threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _one_process(hp, inputs, precision)
    finally:
        torch.set_num_threads(threads)


def _one_process(hp, inputs: dict, precision: str) -> tuple:
    model = build_model(hp)
    backend = LocalBackend(model, TrainSettings(precision=precision))
    miners, factors, step = inputs["miners"], inputs["factors"], inputs["step"]
    backend.begin(inputs["random"], {k: (miners[k], factors[k]) for k in sorted(miners)})
    reference = backend.reference(step)
    results = {k: backend.evaluate(k, inputs["assigned"][k], step) for k in sorted(miners)}
    backend.begin(inputs["random"], {"bad": (inputs["bad"], 1.0)})
    assert backend.reference(step) is None
    with pytest.raises(UpdateError) as refused:
        backend.evaluate("bad", inputs["assigned"]["noise-a"], step)
    for r in results.values():
        r.reference_score = reference
    return model, reference, results, str(refused.value)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, tiny_dataset, honest_shards) -> dict:
    return run_ranks(tiny_dataset.path, honest_shards, tmp_path_factory.mktemp("sharded-eval"), "fp32")


@pytest.fixture(scope="module")
def inputs(hp, tiny_store, honest_shards) -> dict:
    return window_inputs(hp, tiny_store, honest_shards)


def test_sharded_stage2_matches_one_process_and_theta_is_exact(fp32_run, hp, inputs):
    ranks = fp32_run
    model, reference, results, refused = one_process(hp, inputs)
    theta_0 = param_digest(model)
    assert ranks["before"] == theta_0  # the sharded digest is the unsharded one
    assert ranks["after_eval"] == theta_0  # θ bit for bit after 5 evaluations and the reference
    assert ranks["refused"] == refused  # the unusable update is refused, on every rank, like one process
    assert ranks["bad_reference"] is None
    assert ranks["reference"] == pytest.approx(reference, abs=SCORE_TOL)
    for k, single in results.items():
        sharded = ranks["results"][k]
        assert single.loss_after_assigned_reference is not None  # the memory control ran, sharded too
        for field in ("loss_before_assigned", "loss_after_assigned", "loss_before_random", "loss_after_random",
                      "loss_after_assigned_reference"):
            assert sharded[field] == pytest.approx(getattr(single, field), abs=LOSS_TOL), (k, field)
        score = (sharded["loss_before_random"] - sharded["loss_after_random"]) / sharded["loss_before_random"]
        assert score == pytest.approx(single.loss_score, abs=SCORE_TOL), k
    assert min(results[k].loss_score for k in ("Alice", "Bob")) > max(
        results[k].loss_score for k in ("noise-a", "noise-b"))  # the inputs do tell honest from noise

    params = dict(model.named_parameters())  # stage 1's own sample: exact
    single_sample = gather_sample(params, inputs["positions"])
    assert {n: v for n, v in ranks["sample"].items()} == {n: v.tolist() for n, v in single_sample.items()}

    apply_outer_step(model, aggregate_encoded(inputs["miners"], clip_norm=inputs["clip"]), hp.outer.lr)
    assert ranks["stepped"] == param_digest(model) != theta_0  # the outer step on rows: bit-identical θ
    assert ranks["whole_digest"] == ranks["stepped"]  # θ gathered whole on rank 0 (checkpoints)


def test_bf16_scores_against_fp32(hp, inputs):
    """One process, the same θ, updates and samples: how far bf16 autocast moves the scores (printed).

    Measured here: |bf16 − fp32| ≤ 5e-5 on loss scores of ~1e-3 (honest) and ~1e-5 (noise); allowed
    BF16_TOL. The honest miners keep their order and stay far above the noise, indicators unchanged."""
    fp32 = one_process(hp, inputs, "fp32")
    model, reference, bf16, _ = one_process(hp, inputs, "bf16")
    assert param_digest(model) == param_digest(build_model(hp))  # θ stays float32, untouched
    diff = report(fp32[2], bf16)
    assert max(abs(d) for d in diff.values()) <= BF16_TOL
    assert abs(reference - fp32[1]) <= BF16_TOL
    honest, noise = ("Alice", "Bob"), ("noise-a", "noise-b")
    for results in (fp32[2], bf16):
        assert min(results[k].relative_score for k in honest) > 0.5 > max(results[k].relative_score for k in noise)
    assert sorted(honest, key=lambda k: bf16[k].loss_score) == sorted(honest, key=lambda k: fp32[2][k].loss_score)
    assert all(bf16[k].indicator() == fp32[2][k].indicator() for k in honest)


def report(fp32: dict, bf16: dict) -> dict[str, float]:
    """Print both precisions' scores; returns bf16 − fp32 loss score per miner."""
    diff = {k: bf16[k].loss_score - r.loss_score for k, r in fp32.items()}
    print("\nloss score fp32", {k: f"{r.loss_score:.3e}" for k, r in fp32.items()})
    print("loss score bf16", {k: f"{r.loss_score:.3e}" for k, r in bf16.items()})
    print("bf16 − fp32 loss score", {k: f"{d:+.2e}" for k, d in diff.items()})
    return diff


@pytest.mark.slow
def test_sharded_bf16_keeps_theta_and_tells_honest_from_noise(tmp_path, tiny_dataset, honest_shards, hp, inputs,
                                                             fp32_run):
    ranks = run_ranks(tiny_dataset.path, honest_shards, tmp_path, "bf16")
    assert ranks["before"] == ranks["after_eval"] == fp32_run["before"]  # master θ float32, restored exactly
    assert ranks["stepped"] == fp32_run["stepped"]  # the outer step does not see the compute precision
    scores = {k: (r["loss_before_random"] - r["loss_after_random"]) / r["loss_before_random"]
              for k, r in ranks["results"].items()}
    single = {k: (r["loss_before_random"] - r["loss_after_random"]) / r["loss_before_random"]
              for k, r in fp32_run["results"].items()}
    print("sharded bf16 loss scores", scores, "reference", ranks["reference"])
    print("sharded fp32 loss scores", single, "reference", fp32_run["reference"])
    assert min(scores["Alice"], scores["Bob"]) > max(scores["noise-a"], scores["noise-b"])
    assert max(abs(scores[k] - single[k]) for k in scores) <= BF16_TOL
    assert abs(ranks["reference"] - fp32_run["reference"]) <= BF16_TOL
