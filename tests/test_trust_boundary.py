"""Issue 14's trust boundary, end to end: one miner's bucket is the hostile proxy, the network holds.

A small real network (devnet chain process, rclone S3, real torch; tests/plugins/network.py): two
honest miners, one validator, and a third miner whose committed bucket endpoint is the hostile proxy
(devnet/hostile_s3.py) — http on 127.0.0.1, inside the devnet's endpoint allowance — so every other
node reads its shards through the proxy. Every window the proxy (and the miner's upload) lies in one
way (`PLAN`). The run happens once per module (`run` fixture, nine windows of 7 s) and each test
checks one behaviour's outcome:

    control   no lie: its shard counts like any other (the plumbing works)
    split     the validator is shown shard A, the miners shard B (another valid shard, same key)
    late      uploaded after the deadline, claiming an on-time stamp (client mtime, Last-Modified)
    swap      every GET alternates A and B
    trickle   whole-object GETs trickle (the validator's header reads are answered honestly)
    hang      every GET hangs before the headers
    cl_long   whole-object GETs declare 5 bytes more than they send, then close
    cl_short  whole-object GETs declare 5 bytes fewer than the object holds
    copier    re-signs an honest miner's shard once the validator saw it, uploads it claiming an
              earlier time than the original's (client mtime and Last-Modified)

The proxy tells nodes apart by the listener they come in on (`ListenerPool`): on chain every node reads
a miner's bucket with the same read key, so a real server tells them apart by source address, and all
test traffic comes from 127.0.0.1. That is the only thing simulated. The hostile miner does not train
(its shards are signed noise; training is not what is tested); the honest miners train for real, and,
as `Miner.run` does, skip training for a window they reach too late to upload in (a loaded machine).
The validator's own code is observed, never replaced: `_spy` wraps its publication, its downloads and
stage 1 to record what they returned and how long they took.
"""

from __future__ import annotations

import asyncio

import pytest

from devnet.bootstrap import BootstrapConfig, subnet_params_for
from devnet.hostile_s3 import HostileS3
from protocol.gather import FetchOutcome
from protocol.hparams import load_hparams
from protocol.wire import RejectReason
from tests.plugins import network
from tests.plugins.chain import start_chain
from tests.plugins.trust_scenario import (
    HONEST,
    HOSTILE,
    MINERS,
    OVERRIDES,
    PLAN,
    RUN_TIMEOUT_S,
    SCHEDULING_SLACK_S,
    VALIDATOR,
    Run,
    play_scenario,
    print_summary,
)
from transport.fetch import COLLECT_GRACE_S, GIVE_UP_S


@pytest.fixture(scope="module")
def run(tmp_path_factory, bt_cache_env, s3_server, tiny_store) -> Run:
    hp = load_hparams("tiny", [*network.NET_OVERRIDES, *OVERRIDES])
    cfg = BootstrapConfig(miners=3, validators=1, subnet=subnet_params_for(hp))
    chain = start_chain(tmp_path_factory.mktemp("trust"), cfg, block_time=0.25)
    proxy = HostileS3.over(s3_server).start()
    result = Run(proxy)
    try:
        for name in [*HONEST, HOSTILE]:
            proxy.endpoint_for(name)
        net = network.TestNetwork(chain, s3_server, hp, tiny_store)
        state = tmp_path_factory.mktemp("trust-state")
        asyncio.run(asyncio.wait_for(play_scenario(result, net, state), RUN_TIMEOUT_S))
        print_summary(result)
        return result
    finally:
        proxy.close()
        chain.stop()


# --- the outcomes ------------------------------------------------------------------------------------


def test_honest_nodes_end_every_window_with_identical_theta(run: Run):
    """Whatever the hostile bucket did, the window's record reached every honest node in time and they
    all applied it: miners and validator hold the bit-identical θ after every window."""
    for i, kind in enumerate(PLAN):
        w = run.first + i
        digests = {name: run.digests[name][w] for name in HONEST}
        assert len(set(digests.values())) == 1, (kind, digests)
        assert run.records[w] is not None, f"{kind}: no record"
        for name in HONEST:
            note = run.reports[name][w].note
            assert "no validator published" not in note and "no aggregate record" not in note, (kind, name, note)
            assert run.reports[name][w].stepped == bool(run.records[w].peers), (kind, name, note)
    assert len({run.digests[VALIDATOR][w] for w in run.digests[VALIDATOR]}) > 1  # θ moved


def test_control_window_counts_the_hostile_bucket_when_it_behaves(run: Run):
    assert run.got("control").ok, run.got("control")
    assert run.verdict("control", HOSTILE).eligible
    assert run.bad in run.record("control").peers


def test_late_upload_claiming_an_on_time_stamp_is_not_counted(run: Run):
    """(a) After the deadline, with every time the server reports saying "on time": not counted."""
    late = run.checks["late"]
    assert late["put_block"] >= late["deadline_block"]  # it was late, by the chain (on time: < deadline block)
    assert late["claimed_listed"] <= late["deadline"] and late["claimed_head"] <= late["deadline"]  # it lied
    assert late["unpinned"].ok, late["unpinned"]  # a valid, signed shard: only its timing keeps it out
    assert run.bad not in run.pubs[run.window("late")].snapshot
    verdict = run.verdict("late", HOSTILE)
    assert verdict.present and not verdict.timely and not verdict.eligible, verdict
    assert run.got("late").reason == FetchOutcome.LATE
    assert run.bad not in run.record("late").peers


def test_copier_claiming_to_be_first_never_slashes_the_original(run: Run):
    """(b) The copy claims to be older than the original; the validator's own first-seen order decides."""
    copier = run.checks.get("copier")
    assert copier is not None, run.notes.get(run.window("copier"))
    victim = copier["victim"]
    assert copier["claimed_listed"] < copier["original_listed"]  # the copy's server says it came first
    original, copy = run.verdict("copier", victim), run.verdict("copier", HOSTILE)
    assert copy.timely and original.timely, (copy, original)
    assert copy.first_seen > original.first_seen, (copy, original)
    for name in MINERS:  # neither honest miner is slashed, nor said to have copied the copier
        verdict = run.verdict("copier", name).copy_verdict
        assert verdict is None or (verdict.factor == 1.0 and verdict.copied_from != run.uids[HOSTILE]), (name, verdict)
    assert copy.copy_verdict.factor == 0.0 and copy.copy_verdict.copied_from == run.uids[victim], copy


def test_body_swap_per_request_is_refused_as_changed(run: Run):
    """(c) A and B alternate on every GET: the validator saw the hash change and counts neither."""
    assert run.got("swap").reason == FetchOutcome.CHANGED, run.got("swap")
    assert not run.verdict("swap", HOSTILE).timely
    assert run.bad not in run.record("swap").peers


def test_different_bodies_per_listener_cannot_split_the_network(run: Run):
    """(c) The validator is shown A, the miners B: the record pins A, the miners read A from the mirror
    (they never ask the hostile bucket), and B from it would be refused."""
    split = run.checks.get("split")
    assert split is not None and run.bad in run.record("split").peers, run.record("split")
    assert split["miner_requests"] == []
    assert split["validator_direct"].ok
    assert split["miner_direct"].reason == FetchOutcome.CHANGED, split["miner_direct"]


def test_trickle_and_hang_cost_the_miner_not_the_validator(run: Run):
    """(d) The validator's downloads end by the window's download deadline; the miner gets `timeout`.
    Trickle: its header was seen, so the record's gather waited for it; hang: never seen, so the
    validator's scoring fetch did."""
    for kind in ("trickle", "hang"):
        w = run.window(kind)
        assert run.got(kind).reason == FetchOutcome.TIMEOUT, (kind, run.got(kind))
        assert not run.verdict(kind, HOSTILE).eligible
        assert run.bad not in run.record(kind).peers
        # the deadline, plus giving up on what has not arrived (nothing of the miner's ever does) and the
        # verification grace for an honest shard that arrives at the last moment
        bound = max(deadline for _, _, deadline in run.timings[w]) + GIVE_UP_S + COLLECT_GRACE_S + SCHEDULING_SLACK_S
        assert run.timings[w] and all(took <= bound for _, took, _ in run.timings[w]), (kind, run.timings[w], bound)
    assert run.bad in run.pubs[run.window("trickle")].snapshot  # the gather's case, not the scoring fetch's
    assert run.bad not in run.pubs[run.window("hang")].snapshot


def test_content_length_lies_are_refused_never_truncated(run: Run):
    """(e) Declared longer: the short body is an error (retried, then given up); declared shorter: the
    truncated shard fails the wire reader with its reason. Neither is accepted."""
    long, short = run.got("cl_long"), run.got("cl_short")
    assert not long.ok and long.reason in (FetchOutcome.UNREACHABLE, FetchOutcome.TIMEOUT), long
    assert not short.ok and short.reason in {r.value for r in RejectReason}, short
    assert run.verdict("cl_short", HOSTILE).reject_reason == short.reason
    for kind in ("cl_long", "cl_short"):
        assert not run.verdict(kind, HOSTILE).eligible
        assert run.bad not in run.record(kind).peers


def test_hostile_miner_earns_nothing_in_the_windows_it_misbehaved(run: Run):
    """Never evaluated in a window it lied in, so its score only decays there (what it earned while it
    behaved, if anything, shrinks); the copier is evaluated and zeroed."""
    history = run.history[HOSTILE]
    previous = 0.0
    for kind in PLAN:
        entry = history[run.window(kind)]
        if kind == "copier":
            assert entry.copy_factor == 0.0 and entry.score == 0.0, entry
        elif kind not in ("control", "split"):
            assert not entry.evaluated and entry.score <= previous, (kind, entry)
        previous = entry.score
