"""FSDP2 miners: 2 gloo ranks on CPU, sharded, produce the single process's update and the same θ.

Tolerance: the sharded inner loop differs from one process only in float32 summation order (each
rank's mean loss over half the batch, gradients reduce-scattered and averaged, the quantisation
table's sums all-reduced). AdamW divides by √v, which turns that noise on near-zero gradients into
visible steps on a few elements over H steps (as in test_distributed), so the decoded updates are
compared as a whole: ‖sharded − single‖ ≤ 2 % of ‖single‖, and ≥ 99 % of the kept top-k positions
identical. θ after the outer step is compared bit for bit (digest): the aggregation is exact. The same run checks
that rank 1's rows, scattered from rank 0 onto a meta-built model, are θ_0, and that the ranks'
saved AdamW and error-feedback rows resume exactly (`neurons.local_state`).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from bittensor.sp_core import Keypair
from safetensors import safe_open
from safetensors.torch import load_file

from gauntlet.evaluate import Evaluator
from gauntlet.filters import sync_score
from neurons.local_state import sharded_state_path
from neurons.training import inner_train, make_inner_optimizer
from protocol.codec import Compressor, decode
from protocol.codec_aggregate import aggregate_encoded, apply_outer_step
from protocol.data import assign
from protocol.hparams import load_hparams
from protocol.model import build_model, param_digest
from protocol.sample import debug_positions, gather_sample, split_sample
from protocol.wire import Shard, ShardExpectation, ShardRules, read_shard
from tests.conftest import torchrun
from tests.sharding_worker import HOTKEY_URI, OVERRIDES, SEED, other_peer

REPO = Path(__file__).resolve().parents[1]


def _run_ranks(data: Path, out: Path, precision: str = "fp32") -> list[dict]:
    done = torchrun([str(REPO / "tests" / "sharding_worker.py"), str(data), str(out), precision], out / "torchrun")
    assert done.returncode == 0, done.report()
    return [json.loads((out / "rank0.json").read_text())]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("fsdp")
    return _run_ranks(tiny_dataset.path, out), out


def test_two_fsdp_ranks_match_one_process(sharded_run, tiny_store):
    ranks, out = sharded_run
    hp = load_hparams("tiny", OVERRIDES)
    assert "model.layers.0.mlp.gate_proj.weight" in ranks[0]["aligned"]  # 688 rows = 2 × 8 blocks of 43
    assert "model.norm.weight" not in ranks[0]["aligned"]  # 1-D: replicated fallback
    assert ranks[0]["local_rows"]["model.embed_tokens.weight"] == 2048  # really sharded
    keypair = Keypair.create_from_uri(HOTKEY_URI)
    shapes = {n: p.shape for n, p in build_model(hp).named_parameters()}
    rules = ShardRules(hp.sparseloco, hp.shard.debug_sample_size, hp.revision(), shapes)
    shard = read_shard((out / "shard.bin").read_bytes(), ShardExpectation(1, 0, keypair.ss58_address, rules))
    assert isinstance(shard, Shard), shard  # stage 1: the wire checks (layouts, unique sorted indices, signature)

    # The single process on the same samples.
    theta_w = build_model(hp)
    model = build_model(hp)
    samples = tiny_store.pages(assign("fsdp", 0, hp.data.seed, hp.samples_per_window, tiny_store.num_train))
    stats = inner_train(model, make_inner_optimizer(model, hp), samples, hp, 0)
    assert ranks[0]["losses"] == pytest.approx(stats.losses, abs=1e-4)
    before = dict(theta_w.named_parameters())
    single = Compressor(hp.sparseloco).encode_all({n: before[n].detach() - p.detach()
                                                   for n, p in model.named_parameters()})
    same = total = 0
    gap = norm = 0.0
    for name, enc in single.items():
        mine = shard.tensors[name]
        same += len(set(mine.positions().view(-1).tolist()) & set(enc.positions().view(-1).tolist()))
        total += enc.layout.n_values
        gap += float((decode(mine) - decode(enc)).square().sum())
        norm += float(decode(enc).square().sum())
    print(f"kept positions identical {same / total:.5f}, update gap {math.sqrt(gap) / math.sqrt(norm):.2e}")
    assert same / total >= 0.99, same / total
    assert math.sqrt(gap) <= 0.02 * math.sqrt(norm), (math.sqrt(gap), math.sqrt(norm))

    # Stage 1: the debug sample is θ_w's; stage 2: the update lowers the loss on the assigned data.
    positions = debug_positions(SEED, {n: p.numel() for n, p in before.items()}, hp.shard.debug_sample_size)
    own = gather_sample(before, positions)
    assert sync_score(own, split_sample(shard.debug_values, positions), None, hp.gauntlet).steps_behind == 0.0
    result = Evaluator(theta_w, [samples[8:16]]).evaluate({n: decode(e) for n, e in shard.tensors.items()},
                                                          [samples[:8]], hp.outer.lr)
    assert result.loss_after_assigned < result.loss_before_assigned

    # The outer step: the sharded ranks' θ is bit-identical to one process's with the same peers.
    shards = {"a-fsdp": shard.tensors, "b-other": other_peer(hp)}
    apply_outer_step(theta_w, aggregate_encoded(shards, clip_norm=ranks[0]["clip"]), hp.outer.lr)
    assert ranks[0]["digest"] == param_digest(theta_w)


def test_rows_scattered_from_rank_0_are_theta_0(sharded_run):
    """Rank 1 built its model on the meta device and got its rows from rank 0: θ is the seeded θ_0."""
    ranks, _ = sharded_run
    assert ranks[0]["digest0"] == param_digest(build_model(load_hparams("tiny", OVERRIDES)))


def test_sharded_state_saved_and_resumed_gives_the_same_next_window(sharded_run):
    """Each rank's AdamW and error-feedback rows survive a restart: reloaded and saved again they are the
    same tensors and header, and the restarted ranks encode the same next-window shard, byte for byte."""
    ranks, out = sharded_run
    for rank in range(2):
        saved, again = sharded_state_path(out / "state", rank), sharded_state_path(out / "state-again", rank)
        first, second = load_file(str(saved)), load_file(str(again))
        assert sorted(first) == sorted(second)
        assert all(torch.equal(first[k], second[k]) for k in first)
        assert any(k.startswith("opt.") and k.endswith(".exp_avg_sq") for k in first)
        assert any(k.startswith("ef.") for k in first)
        with safe_open(str(saved), "pt") as a, safe_open(str(again), "pt") as b:
            header = json.loads(a.metadata()["crucible.sharded"])
            assert header == json.loads(b.metadata()["crucible.sharded"])
        assert (header["world"], header["rank"], header["window"]) == (2, rank, 1)
        assert header["plan"]["model.embed_tokens.weight"] == [[4096, 256], 2048 * rank, 2048, True]
    assert ranks[0]["next_window_identical"]
    # a header naming another world size: every rank starts from zero, said in one line by rank 0
    assert ranks[0]["fallback_state_empty"]
    assert sum("of 3 ranks" in w for w in ranks[0]["warnings"]) == 1, ranks[0]["warnings"]


def test_devnet_miner_ranks_runs_miner_0_under_torchrun_with_fsdp(tmp_path):
    from devnet.launch_plan import DevnetConfig, node_spec, plan_participants
    from neurons.cli import build_parser
    from neurons.node_config import NODE_FLAGS
    from tests.test_devnet_launcher import _manifest

    cfg = DevnetConfig(miners=2, validators=1, windows=3, state=tmp_path, miner_ranks=2)
    people = {p.name: p for p in plan_participants(cfg, _manifest(2, 1))}
    s3 = {"endpoint": "http://127.0.0.1:9", "region": "us-east-1",
          "read": {"access_key_id": "R", "secret_access_key": "RS"},
          "write": {"access_key_id": "W", "secret_access_key": "WS"}}
    sharded = node_spec(cfg, people["miner-0"], "devnet://127.0.0.1:1", "/w", tmp_path, s3).argv
    plain = node_spec(cfg, people["miner-1"], "devnet://127.0.0.1:1", "/w", tmp_path, s3).argv
    assert sharded[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    module = sharded.index("neurons.cli")
    assert sharded[module - 1] == "-m" and sharded[module + 1 : module + 3] == ["devnet", "miner"]
    assert NODE_FLAGS.parse(build_parser().parse_args(sharded[module + 1 :])).fsdp
    assert plain[1:3] == ["-m", "neurons.cli"] and "--fsdp" not in plain
