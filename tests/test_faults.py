"""The devnet's fault plan (issue 15): parsing, applying each fault to real processes and a real S3 server,
the report's windows-lost / recovery numbers, missing-shard catch-up on a real network, and (slow) a whole
`crucible devnet run --fault ...` whose honest nodes all end on the validator's θ.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devnet.fault_report import final_digests, state_digest, summarize_faults
from devnet.faults import FaultEvent, FaultKind, FaultRunner, FaultyPool, check_plan, parse_fault, parse_plan
from devnet.supervisor import ChildSpec, ChildState, Supervisor, SupervisorConfig
from neurons.catchup import recover
from neurons.local_state import save_local_state
from neurons.miner import Miner
from neurons.validator import Validator
from protocol.model import build_model, param_digest
from protocol.peers import AggregateRecord
from protocol.storage_keys import aggregate_key, checkpoint_key, gradient_key, mirror_key
from protocol.windows import window_bounds
from transport.bucket import Bucket
from transport.bucket_errors import ObjectNotFound, StorageUnavailable
from transport.fetch import BucketPool

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, kind, window, node, peer, seconds", [
    ("kill:miner-1@6+2s", FaultKind.KILL, 6, "miner-1", None, 2.0),
    ("kill:validator-0@9", FaultKind.KILL, 9, "validator-0", None, 2.0),  # default restart delay
    ("storage-stall@8+40s", FaultKind.STORAGE_STALL, 8, None, None, 40.0),
    ("chain-stall@3+2.5s", FaultKind.CHAIN_STALL, 3, None, None, 2.5),
    ("unreachable:miner-0:miner-2@10", FaultKind.UNREACHABLE, 10, "miner-0", "miner-2", None),
    ("delete-shard:miner-1@5", FaultKind.DELETE_SHARD, 5, "miner-1", None, None),
])
def test_good_faults_parse(text, kind, window, node, peer, seconds):
    fault = parse_fault(text)
    assert (fault.kind, fault.window, fault.node, fault.peer, fault.seconds) == (kind, window, node, peer, seconds)
    assert fault.spec == text


@pytest.mark.parametrize("text, message", [
    ("bogus", "expected KIND[:NODE]@WINDOW"),
    ("explode:miner-1@3", "unknown kind 'explode'"),
    ("kill@3", "expected kill:NODE@WINDOW"),
    ("kill:miner-1@x", "expected KIND[:NODE]@WINDOW"),
    ("storage-stall@8", "needs a duration"),
    ("chain-stall:chain@8+4s", "takes no node"),
    ("unreachable:miner-0@10", "unreachable:NODE:PEER@WINDOW"),
    ("unreachable:miner-0:miner-0@10", "unreachable:NODE:PEER@WINDOW"),
    ("unreachable:miner-0:miner-2@10+3s", "no duration"),
    ("delete-shard:miner-1@5+1s", "no duration"),
    ("kill:miner-1@6+2", "expected KIND[:NODE]@WINDOW"),  # seconds need their unit
])
def test_bad_faults_are_one_clear_line(text, message):
    with pytest.raises(ValueError) as info:
        parse_fault(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plan_names_real_nodes_and_shards_only_of_miners():
    nodes = {"validator-0": "validator", "miner-0": "miner", "miner-1": "miner"}
    check_plan(parse_plan(["kill:validator-0@3", "unreachable:validator-0:miner-1@4"]), nodes)
    with pytest.raises(ValueError, match="no node named 'miner-7'"):
        check_plan(parse_plan(["kill:miner-7@3"]), nodes)
    with pytest.raises(ValueError, match="validator-0 publishes no shards"):
        check_plan(parse_plan(["unreachable:miner-0:validator-0@4"]), nodes)


def test_the_flag_fails_before_anything_starts(tmp_path):
    run = subprocess.run([sys.executable, "-m", "neurons.cli", "devnet", "run", "--fault", "storage-stall@8",
                          "--state", str(tmp_path / "dn")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--fault 'storage-stall@8'" in lines[0] and "needs a duration" in lines[0], run.stderr
    assert not (tmp_path / "dn" / "chain").exists()


def test_a_fault_on_no_node_fails_before_fresh_clears_the_last_run(tmp_path):
    """A typo in a node name must not cost the previous run's logs and report (--fresh clears them)."""
    (tmp_path / "dn" / "logs").mkdir(parents=True)
    (tmp_path / "dn" / "logs" / "miner-1.log").write_text("the last run\n")
    run = subprocess.run([sys.executable, "-m", "neurons.cli", "devnet", "run", "--fresh", "--miners", "2",
                          "--adversary", "zero", "--fault", "kill:miner-9@3", "--state", str(tmp_path / "dn")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "no node named 'miner-9'" in lines[0], run.stderr
    assert "adv-zero-0" in lines[0]  # the names the launcher gives its nodes
    assert (tmp_path / "dn" / "logs" / "miner-1.log").exists() and not (tmp_path / "dn" / "chain").exists()


def _sleeper(tmp_path: Path, name: str) -> ChildSpec:
    return ChildSpec(name=name, argv=[sys.executable, "-c", "import time\nwhile True: time.sleep(0.05)"],
                     log_path=tmp_path / f"{name}.log")


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2:].split()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_restarts_the_node_and_stalls_stop_then_continue(tmp_path):
    sup = Supervisor(SupervisorConfig(max_restarts=0, stop_timeout_s=2.0))
    try:
        sup.start(_sleeper(tmp_path, "miner-1"))
        sup.start(_sleeper(tmp_path, "s3"))
        first, s3_pid = sup.children["miner-1"].pid, sup.children["s3"].pid
        plan = parse_plan(["kill:miner-1@2+0.3s", "storage-stall@3+4s"])
        runner = FaultRunner(plan, sup, tmp_path, {}, {}, [])
        runner.tick(1)
        assert sup.children["miner-1"].pid == first and not runner.events  # not yet
        runner.tick(2)
        assert sup.state("miner-1") == ChildState.WAITING  # SIGKILLed, restart planned
        deadline = time.monotonic() + 10
        while sup.state("miner-1") != ChildState.RUNNING and time.monotonic() < deadline:
            sup.poll()
            time.sleep(0.05)
        second = sup.children["miner-1"].pid
        assert second != first and sup.children["miner-1"].restarts == 0  # a planned kill is not a crash
        assert not Path(f"/proc/{first}").exists() or _proc_state(first) == "Z"
        runner.tick(3)
        assert runner.events[0].ended_at is not None and "restarted" in runner.events[0].detail
        deadline = time.monotonic() + 2.5  # the signal is delivered asynchronously
        while _proc_state(s3_pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _proc_state(s3_pid) == "T" and runner.events[1].ended_at is None  # SIGSTOPped, for now
        deadline = time.monotonic() + 10
        while runner.events[1].ended_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _proc_state(s3_pid) != "T" and "SIGCONT s3" in runner.events[1].detail
        assert sup.alive() == ["miner-1", "s3"]
    finally:
        sup.stop_all()
    assert sup.alive() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_shorter_stall_inside_a_longer_one_does_not_continue_the_server(tmp_path):
    sup = Supervisor(SupervisorConfig(max_restarts=0, stop_timeout_s=2.0))
    try:
        sup.start(_sleeper(tmp_path, "s3"))
        pid = sup.children["s3"].pid
        runner = FaultRunner(parse_plan(["storage-stall@1+30s", "storage-stall@2+0.2s"]), sup, tmp_path, {}, {}, [])
        runner.tick(1)
        runner.tick(2)
        deadline = time.monotonic() + 10
        while runner.events[1].ended_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a SIGCONT, had one been sent, is delivered by now
        assert _proc_state(pid) == "T" and "stays stopped" in runner.events[1].detail
        assert runner.events[0].ended_at is None
        assert runner.release() == []  # the end of the run continues it; every fault was applied
        deadline = time.monotonic() + 2.5
        while _proc_state(pid) == "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _proc_state(pid) != "T" and "SIGCONT s3" in runner.events[0].detail
    finally:
        sup.stop_all()
    assert sup.alive() == []


def test_a_fault_whose_window_passed_before_the_run_says_so(tmp_path):
    runner = FaultRunner(parse_plan(["kill:miner-1@2", "kill:miner-1@9"]),
                         Supervisor(SupervisorConfig()), tmp_path, {}, {}, [])
    lines = runner.tick(5)  # a reused devnet: the chain was at window 5 when the run began
    assert any("kill:miner-1@2: window 2 had passed when the run started (chain at window 5" in line
               for line in lines) and not any("@9: window" in line for line in lines)


def test_a_fault_after_the_runs_last_window_is_reported_as_not_applied(tmp_path):
    runner = FaultRunner(parse_plan(["kill:miner-1@40"]), Supervisor(SupervisorConfig()), tmp_path, {}, {}, [])
    assert runner.tick(12) == [] and not runner.events
    assert runner.release() == ["fault kill:miner-1@40 not applied: the run ended at chain window 12"]


def test_faulty_pool_makes_one_peer_unreachable_only_while_the_file_says_so(s3_server, tmp_path):
    s3_server.ensure_bucket("fault-peer")
    config = s3_server.bucket_config("fault-peer")
    writer = Bucket(config)
    for window in (7, 8):
        writer.put(gradient_key(window, "peerB"), b"shard of B")
        writer.put(mirror_key(window, "peerB"), b"mirror of B")
    writer.put(gradient_key(7, "peerC"), b"shard of C")
    path = tmp_path / "faults" / "miner-0.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"blocked": [{"hotkey": "peerB", "window": 7}]}))
    pool = FaultyPool(BucketPool(), path)
    bucket = pool.get(config)
    far = time.monotonic() + 30
    for key in (gradient_key(7, "peerB"), mirror_key(7, "peerB")):
        with pytest.raises(StorageUnavailable, match="devnet fault plan"):
            bucket.fetch(key, 1 << 20, far)
    assert bucket.fetch(gradient_key(8, "peerB"), 1 << 20, far) == b"shard of B"  # another window: fine
    assert bucket.fetch(gradient_key(7, "peerC"), 1 << 20, far) == b"shard of C"  # another peer: fine
    assert BucketPool().get(config).fetch(gradient_key(7, "peerB"), 1 << 20, far) == b"shard of B"  # another node
    path.unlink()  # the launcher lifts the block
    assert bucket.fetch(gradient_key(7, "peerB"), 1 << 20, far) == b"shard of B"
    assert bucket.stats is pool.all()[0].stats  # the node's metrics see the same bucket


def test_delete_shard_removes_the_shard_and_its_mirrors_two_windows_later(s3_server, tmp_path):
    for name in ("miner-1", "validator-0"):
        s3_server.ensure_bucket(name)
    miner, validator = Bucket(s3_server.bucket_config("miner-1")), Bucket(s3_server.bucket_config("validator-0"))
    miner.put(gradient_key(5, "hk1"), b"shard")
    miner.put(gradient_key(6, "hk1"), b"next shard")
    validator.put(mirror_key(5, "hk1"), b"shard")
    s3 = {"endpoint": s3_server.endpoint, "region": s3_server.bucket_config("miner-1").region,
          "write": {"access_key_id": s3_server.write_key.access_key, "secret_access_key": s3_server.write_key.secret_key}}
    runner = FaultRunner(parse_plan(["delete-shard:miner-1@5", "unreachable:miner-0:miner-1@5",
                                     "unreachable:miner-0:miner-1@6"]), Supervisor(), tmp_path,
                         {"miner-1": "hk1"}, s3, ["validator-0"])
    runner.tick(5)
    assert miner.get(gradient_key(5, "hk1"), 100) == b"shard"  # everyone still has to apply window 5
    blocked = json.loads((tmp_path / "faults" / "miner-0.json").read_text())["blocked"]
    assert blocked == [{"hotkey": "hk1", "window": 5}]
    runner.tick(6)
    assert len(json.loads((tmp_path / "faults" / "miner-0.json").read_text())["blocked"]) == 2  # both at once
    runner.tick(7)
    for bucket, key in ((miner, gradient_key(5, "hk1")), (validator, mirror_key(5, "hk1"))):
        with pytest.raises(ObjectNotFound):
            bucket.get(key, 100)
    assert miner.get(gradient_key(6, "hk1"), 100) == b"next shard"
    assert json.loads((tmp_path / "faults" / "miner-0.json").read_text())["blocked"] == [{"hotkey": "hk1",
                                                                                          "window": 6}]
    delete = runner.events[0]
    assert delete.ended_window == 7 and "not deleted" not in delete.detail and "mirror/5/hk1" in delete.detail
    runner.tick(8)
    assert not (tmp_path / "faults" / "miner-0.json").exists()


def _event(spec: str, start: int, end: int, started_at: float, ended_at: float) -> FaultEvent:
    return FaultEvent(fault=parse_fault(spec), started_window=start, started_at=started_at, ended_window=end,
                      ended_at=ended_at)


def test_windows_lost_and_time_to_recover_from_metrics_lines():
    def line(w, stepped=True, in_sync=True):
        return {"window": w, "stepped": stepped, "in_sync": in_sync}

    lost = (4, 5, 6)  # a storage stall over windows 5-6 (window 4's record was due in 5), then miner-1 killed
    metrics = {       # in window 8 and back out of sync in 9
        "miner-0": [line(w, stepped=w not in lost) for w in range(3, 12)],
        "miner-1": [line(w, stepped=w not in (*lost, 9), in_sync=w != 9) for w in range(3, 12) if w != 8],
    }
    times = {w: 100.0 + 10 * w for w in range(3, 13)}
    heldout = {w: 8.0 - 0.1 * sum(1 for v in range(3, w) if v not in lost) for w in range(3, 13)}
    events = [_event("storage-stall@5+15s", 5, 6, 150.0, 165.0), _event("kill:miner-1@8+2s", 8, 8, 180.0, 182.0)]
    stall, kill = summarize_faults(events, metrics, times, scored=set(range(3, 12)) - {6}, heldout=heldout)
    assert stall.windows_not_stepped == [4, 5, 6] and stall.recovered_window == 7 and stall.windows_to_recover == 1
    assert stall.seconds_to_recover == pytest.approx(180.0 - 165.0)  # window 8 starts at 180
    assert stall.out_of_sync == {"miner-0": [], "miner-1": []} and stall.windows_not_scored == [6]
    assert stall.heldout_steps_again == 1  # loss of window 8 differs from 7's: window 7 stepped
    assert kill.windows_not_stepped == [] and kill.recovered_window == 10 and kill.windows_to_recover == 2
    assert kill.out_of_sync == {"miner-0": [], "miner-1": [8, 9]}
    assert kill.seconds_to_recover == pytest.approx(210.0 - 182.0) and kill.heldout_steps_again == 0
    # found out of sync at the window's start, recovered and stepped in it: back in step in that window
    drift = summarize_faults([_event("unreachable:miner-0:miner-2@7", 7, 8, 170.0, 190.0)],
                             {"miner-0": [line(6), line(7, stepped=False), line(8, in_sync=False)],
                              "miner-2": [line(6), line(7), line(8)]},
                             times, scored=set(range(3, 12)), heldout=heldout)[0]
    assert drift.recovered_window == 8 and drift.windows_to_recover == 0 and drift.windows_not_stepped == []
    assert drift.out_of_sync == {"miner-0": [7, 8], "miner-2": []}
    # no snapshot between model windows 11 and 14: the loss moved somewhere in 11..13, at most 2 after the end
    gap = summarize_faults([_event("kill:validator-0@11", 11, 11, 1.0, 2.0)], {"m": [line(12)]}, {}, {10, 13},
                           {10: 7.0, 11: 7.0, 14: 6.8})[0]
    assert gap.heldout_steps_again == 2 and gap.windows_not_scored == [11, 12]
    never = summarize_faults([_event("kill:miner-1@8", 8, 8, 1.0, 2.0)], {"m": [line(8, stepped=False)]}, {}, set(),
                             {})
    assert never[0].recovered_window is None and never[0].windows_to_recover is None


def test_final_digests_are_param_digests_compared_at_the_same_window(tmp_path, tiny_hp):
    model = build_model(tiny_hp)
    for name in ("validator-0", "miner-0"):
        save_local_state(tmp_path / "nodes" / name, 7, "rev", model)
    assert state_digest(tmp_path / "nodes" / "miner-0") == (7, param_digest(model))
    import torch

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_local_state(tmp_path / "nodes" / "miner-1", 7, "rev", model)  # drifted
    save_local_state(tmp_path / "nodes" / "miner-2", 6, "rev", model)  # a window behind: the record's digest
    record = tmp_path / "s3" / "validator-0" / aggregate_key(6)
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"theta_digest": param_digest(model)}))
    out = final_digests(tmp_path, ["validator-0", "miner-0", "miner-1", "miner-2", "miner-3"], "validator-0")
    assert out.nodes["miner-0"].equal and not out.nodes["miner-1"].equal and out.nodes["miner-2"].equal
    assert out.nodes["miner-3"].window is None and out.all_equal is False and not out.same_window_agree
    ahead = final_digests(tmp_path, ["validator-0", "miner-0", "miner-2"], "validator-0")
    assert ahead.all_equal is True and ahead.same_window_agree
    save_local_state(tmp_path / "nodes" / "miner-4", 8, "rev", model)  # ahead of the reference, no record yet
    unknown = final_digests(tmp_path, ["validator-0", "miner-0", "miner-4"], "validator-0")
    assert unknown.all_equal is None and unknown.nodes["miner-4"].equal is None


async def test_missing_shard_catch_up_refuses_sync_then_recovers_from_the_next_checkpoint(network_factory,
                                                                                         tmp_path):
    net = network_factory(miners=3, validators=1)  # checkpoints every 2 windows (NET_OVERRIDES)
    validator = Validator(await net.node("validator-0"), tmp_path / "validator")
    miners = [Miner(await net.node(f"miner-{i}"), tmp_path / f"miner-{i}") for i in range(2)]
    late = await net.node("miner-2")  # joins later, from checkpoints and records
    window = await validator.node.current_window() + 1
    for w in (window, window + 1):
        await validator.publish_initial_peer_list(w)
    await validator.node.wait_for_block(window_bounds(window, net.hp.windows).start_block)
    every = net.hp.checkpoints.every_windows
    publishing = asyncio.create_task(validator.publisher.run(window))  # the record at each deadline, as run() does
    target = None
    for w in range(window, window + 8):  # a loaded machine may lose a window: take the first one that fits
        await asyncio.gather(*(m.step(w) for m in miners), validator.step(w))
        data = validator.node.bucket.get(aggregate_key(w), 1 << 20)
        record = AggregateRecord.parse(data, netuid=validator.node.netuid, window=w, validator=validator.node.hotkey)
        if w % every == 0 and record.peers and validator.node.bucket.list(checkpoint_key(w)):
            target = w  # θ at its start is a checkpoint, and its record names peers
            break
    assert target is not None, "no window had both a checkpoint and a stepping record"
    for hotkey in record.peers:  # the window's shards vanish after everyone applied them
        owner = next(m for m in miners if m.node.hotkey == hotkey)
        owner.node.bucket.delete(gradient_key(target, hotkey))
        validator.node.bucket.delete(mirror_key(target, hotkey))
        with pytest.raises(ObjectNotFound):
            validator.node.bucket.get(mirror_key(target, hotkey), 1 << 20)
    why = await recover(late, target + 1)  # checkpoint `target`, then replay `target`: its shards are gone
    assert why is not None and f"window {target}" in why and "unavailable" in why, why
    assert param_digest(late.model) != param_digest(validator.node.model)  # and it says so: no sync claimed
    await asyncio.gather(*(m.step(target + 1) for m in miners), validator.step(target + 1))  # checkpoint target+2
    assert validator.node.bucket.list(checkpoint_key(target + 2))
    assert await recover(late, target + 2) is None  # the next checkpoint: nothing left to replay
    assert param_digest(late.model) == param_digest(validator.node.model) == param_digest(miners[0].node.model)
    publishing.cancel()
    await net.close()


@pytest.mark.slow
def test_fault_plan_devnet_heals_and_every_honest_node_ends_on_the_validators_theta(tmp_path, tiny_dataset):
    """Issue 15's plan: kill -9 of a miner and of the validator (restarted 2 s later), a 40 s storage stall, one peer
    unreachable for one miner in one window; 20 windows. Slow: ~9 min on 2 cores. 2 s blocks (20 s windows): with
    the tiny preset's 10 s windows, miners on 2 cores shared with other work often train past the deadline, and
    windows are then lost to load, not to the faults (measured: a 1 s-block run under load 16 lost 10 windows)."""
    state = tmp_path / "devnet"
    plan = ["kill:miner-1@4+2s", "unreachable:miner-0:miner-2@7", "storage-stall@11+40s", "kill:validator-0@17+2s"]
    cmd = [sys.executable, "-m", "neurons.cli", "devnet", "run", "--miners", "3", "--validators", "1",
           "--windows", "20", "--block-time", "2", "--state", str(state), "--data", str(tiny_dataset.path), "--fresh",
           "--no-dashboard",
           *(f"--fault={f}" for f in plan)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads((state / "report" / "report.json").read_text())
    assert [f["fault"] for f in report["faults"]] == plan
    for fault in report["faults"]:
        assert fault["ended_window"] is not None, fault
        assert fault["windows_to_recover"] is not None and fault["windows_to_recover"] <= 2, fault
        assert fault["heldout_steps_again"] is not None and fault["heldout_steps_again"] <= 2, fault
    unreachable = report["faults"][1]  # window 7 is lost for miner-0 alone
    assert 7 in unreachable["out_of_sync"]["miner-0"], unreachable
    assert 7 not in unreachable["out_of_sync"]["miner-1"] + unreachable["out_of_sync"]["miner-2"], unreachable
    digests = report["final_digests"]
    assert digests["all_equal"] is True and set(digests["nodes"]) == {"validator-0", "miner-0", "miner-1", "miner-2"}, digests
    leftover = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout
