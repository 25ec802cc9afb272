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
