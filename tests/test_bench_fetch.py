"""`crucible bench fetch`, run small: the JSON it prints, and that misbehaving buckets cost a validator's
window fetch no more than the deadline arithmetic allows (the only timing this test asserts)."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.cli import print_json
from bench.fetch import add_cli, measure
from protocol.hparams import load_hparams
from transport.fetch import COLLECT_GRACE_S, GIVE_UP_S

SCHEDULING_SLACK_S = 0.5  # thread start-up on 2 shared cores, on top of the deadlines


def test_bench_fetch_json_and_the_deadline_bound(s3_server, capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser)
    # 6 shards, 2 slots: with 3 bad buckets the healthy ones wait for slots, and still arrive in time
    args = parser.parse_args(["--shards", "6", "--bad", "0", "3", "--window-seconds", "5", "--object-seconds", "2",
                              "--repeats", "1", "--concurrency", "2", "--json"])
    result = measure(s3_server, load_hparams("tiny"), args)

    assert {"preset", "shards", "shard_bytes", "window_seconds", "object_seconds", "collect_grace_s", "bound_s",
            "healthy_s", "bound_ratio", "concurrency", "runs"} <= set(result)
    assert result["bound_s"] == result["window_seconds"] + result["collect_grace_s"] == 5 + COLLECT_GRACE_S
    runs = {(r["bad"], r["mode"]): r for r in result["runs"]}
    assert set(runs) == {(0, "healthy"), (3, "trickle"), (3, "hang")}
    assert runs[0, "healthy"] == {"bad": 0, "mode": "healthy", "seconds": result["healthy_s"], "ratio": 1.0,
                                  "ok": 6, "failed": {}}
    for mode in ("trickle", "hang"):
        run = runs[3, mode]
        assert run["ok"] == 3 and run["failed"] == {"timeout": 3}, run  # the healthy three always arrive
        assert run["ratio"] == pytest.approx(run["seconds"] / result["healthy_s"], rel=0.01, abs=0.01)
        # the bound: never past the window deadline (+ grace), whatever the bad buckets do
        assert run["seconds"] <= result["bound_s"] + SCHEDULING_SLACK_S, run
        assert run["ratio"] <= (result["bound_s"] + SCHEDULING_SLACK_S) / result["healthy_s"] + 0.01, run
    # and here, tighter: the bad ones hold the two slots for two object deadlines (2 s each) at most, the
    # healthy ones run in between; a hung server is given up at its deadline, not its socket timeout (60 s)
    assert runs[3, "hang"]["seconds"] <= 2 * 2 + GIVE_UP_S + SCHEDULING_SLACK_S

    assert print_json(result, args) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result, sort_keys=True))
