"""Fault plan edges: values out of range, deletions after the run, when a fault ends: `storage-stall@5+99999999999999999999999999999999999s` was
accepted, and its SIGCONT timer died at once with an OverflowError traceback in the launcher (the S3
server stayed stopped to the end of the run)."""

import pytest

from devnet.faults import MAX_SECONDS, parse_fault
from devnet.launch_plan import DevnetConfig


@pytest.mark.parametrize("spec", ["storage-stall@5+99999999999999999999999999999999999s",
                                  "chain-stall@5+10000000000s", "kill:miner-0@3+99999999999999999999s"])
def test_a_duration_too_long_for_a_timer_is_refused_in_one_line(spec):
    with pytest.raises(ValueError, match="at most"):
        parse_fault(spec)
    with pytest.raises(ValueError, match="at most"):
        DevnetConfig(faults=[spec])


def test_the_longest_allowed_stall_still_parses():
    assert parse_fault(f"storage-stall@5+{MAX_SECONDS:.0f}s").seconds == MAX_SECONDS


def test_a_deletion_the_run_ended_before_says_nothing_was_deleted(tmp_path):
    from devnet.faults import FaultRunner, parse_plan
    from devnet.supervisor import Supervisor, SupervisorConfig

    runner = FaultRunner(parse_plan(["delete-shard:miner-1@9"]), Supervisor(SupervisorConfig()), tmp_path,
                         {"miner-1": "hk1"}, {}, ["validator-0"])
    runner.tick(9)
    runner.tick(10)  # the run ends here: the deletion was due at window 11
    lines = runner.release()
    assert lines == ["fault delete-shard:miner-1@9: nothing deleted: the run ended at chain window 10, "
                     "before window 11"]
    assert runner.events[0].ended_at is None and runner.events[0].detail.startswith("nothing deleted")


def test_an_unreachable_fault_ends_when_its_ended_window_begins(tmp_path, monkeypatch):
    """Its ended_window is W + 1 but ended_at was the lift at W + 2, so a recovery in W + 1 was reported
    with seconds_to_recover 0.0 (seen in a devnet run), a window less than the same recovery after a kill."""
    import devnet.faults as faults
    from devnet.fault_report import summarize_faults
    from devnet.faults import FaultRunner, parse_plan
    from devnet.supervisor import Supervisor, SupervisorConfig

    now = [0.0]
    monkeypatch.setattr(faults.time, "time", lambda: now[0])
    runner = FaultRunner(parse_plan(["unreachable:miner-0:miner-1@2"]), Supervisor(SupervisorConfig()), tmp_path,
                         {"miner-0": "hk0", "miner-1": "hk1"}, {}, ["validator-0"])
    for window in (2, 3, 4, 5):  # windows begin at 100, 110, 120, 130
        now[0] = 100.0 + 10 * (window - 2)
        runner.tick(window)
    event = runner.events[0]
    assert (event.ended_window, event.ended_at) == (3, 110.0)
    lines = {"miner-0": [{"window": w, "stepped": True, "in_sync": True} for w in (1, 2, 3, 4)]}
    outcome = summarize_faults(runner.events, lines, runner.window_times, {1, 2, 3, 4}, {})[0]
    assert outcome.recovered_window == 3 and outcome.seconds_to_recover == 10.0  # from 110 to W 4's start
