"""Fault plan values found by the s8 attack: `storage-stall@5+99999999999999999999999999999999999s` was
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
