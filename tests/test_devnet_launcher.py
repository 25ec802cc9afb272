"""Fast tests of the devnet launcher's parts: supervision, scoreboard rows, report, config.

The supervisor runs real processes (`sh`, `sleep`, Python) and checks, through /proc, that stopping
leaves none of them (nor their grandchildren) alive. The end-to-end run of the whole devnet lives in
the lead's slow test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from devnet.bootstrap import DevnetManifest, WalletEntry
from devnet.launch_plan import ADVERSARY_KINDS, DEVNET_FLAGS, DevnetConfig, node_spec, plan_participants
from devnet.launcher import add_cli
from devnet.report import (
    LOSS_PLOT,
    REPORT_FILE,
    WEIGHTS_PLOT,
    DevnetReport,
    MinerWindowMetrics,
    build_report,
    read_miner_metrics,
    write_report,
)
from devnet.scoreboard import Participant, Scoreboard, UidRow, WindowSnapshot, build_rows
from devnet.supervisor import (
    ChildSpec,
    ChildState,
    Supervisor,
    SupervisorConfig,
    group_members,
    json_event,
    tail,
)
from gauntlet.records import EvalResult, UidState, WindowEntry
from gauntlet.state import ScoringState
from neurons.cli import build_parser
from neurons.flags import FlagError, config_error
from neurons.node_config import NODE_FLAGS
from transport.chain import MetagraphSnapshot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan's zombie is for init to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _poll_until(sup: Supervisor, done, timeout: float = 20.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += sup.poll()
        if done():
            return events
        time.sleep(0.05)
    raise AssertionError(f"condition not reached; events so far: {events}")


# --- supervisor -----------------------------------------------------------------------------------------


def test_crashing_child_is_restarted_then_given_up_with_its_last_log_lines(tmp_path):
    script = "import sys\nfor i in range(30): print(f'line {i}')\nsys.exit(3)"
    sup = Supervisor(SupervisorConfig(max_restarts=2, restart_delay_s=0.0, tail_lines=20))
    log = tmp_path / "crash.log"
    with sup:
        child = sup.start(ChildSpec(name="crash", argv=[sys.executable, "-c", script], log_path=log))
        events = _poll_until(sup, lambda: sup.state("crash") == ChildState.FAILED)
    assert [e.kind for e in events] == ["crashed", "crashed", "failed"]
    assert [e.restarts for e in events] == [1, 2, 2]
    assert all(e.code == 3 for e in events)
    assert events[-1].tail == [f"line {i}" for i in range(10, 30)]  # exactly the last 20 lines
    assert "giving up after 2 restarts" in events[-1].message() and "| line 29" in events[-1].message()
    assert child.restarts == 2 and len(set(child.pids)) == 3  # three distinct processes ran
    assert log.read_text().count("--- ") == 3  # one start marker per run, appended


def test_child_that_exits_zero_is_finished_not_restarted(tmp_path):
    sup = Supervisor(SupervisorConfig(max_restarts=3, restart_delay_s=0.0))
    spec = ChildSpec(name="ok", argv=[sys.executable, "-c", "print('done')"], log_path=tmp_path / "ok.log")
    child = sup.start(spec)
    events = _poll_until(sup, lambda: sup.state("ok") == ChildState.FINISHED)
    for _ in range(5):
        assert sup.poll() == []
    assert [e.kind for e in events] == ["finished"] and child.pids == [child.pid]
    assert "done" in (tmp_path / "ok.log").read_text()


def test_child_that_always_crashes_stops_after_max_restarts_zero(tmp_path):
    sup = Supervisor(SupervisorConfig(max_restarts=0))
    sup.start(ChildSpec(name="bad", argv=["sh", "-c", "echo boom >&2; exit 7"], log_path=tmp_path / "b.log"))
    events = _poll_until(sup, lambda: sup.state("bad") == ChildState.FAILED)
    assert [(e.kind, e.code) for e in events] == [("failed", 7)] and events[0].tail[-1] == "boom"


def test_stop_leaves_no_process_behind_even_grandchildren_that_ignore_sigterm(tmp_path):
    sup = Supervisor(SupervisorConfig(stop_timeout_s=1.0))
    polite = sup.start(ChildSpec(name="polite", argv=["sh", "-c", "sleep 300 & sleep 300 & wait"],
                                 log_path=tmp_path / "p.log"))
    ignore_term = "trap '' TERM; sleep 300 & sleep 300 & wait"  # the sleeps inherit the ignored SIGTERM
    stubborn = sup.start(ChildSpec(name="stubborn", argv=["sh", "-c", ignore_term],
                                   log_path=tmp_path / "s.log"))
    groups = {polite.pid: [], stubborn.pid: []}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(len(groups[g]) == 3 for g in groups):
        groups = {g: group_members(g) for g in groups}  # sh + two sleeps in each process group
        time.sleep(0.05)
    assert all(len(m) == 3 for m in groups.values()), groups
    killed = sup.stop_all()
    assert killed == ["stubborn"]  # only the group ignoring SIGTERM needed SIGKILL
    for pgid, members in groups.items():
        assert group_members(pgid) == []
        for pid in members:
            assert not _alive(pid)
    assert sup.state("polite") == ChildState.STOPPED and sup.alive() == []
    assert sup.stop_all() == []  # idempotent: nothing left to signal


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_a_launcher_killed_by_sigkill(tmp_path):
    script = ("import sys, time\nfrom pathlib import Path\nfrom devnet.supervisor import ChildSpec, Supervisor\n"
              "child = Supervisor().start(ChildSpec(name='s', argv=['sleep', '300'], log_path=Path(sys.argv[1])))\n"
              "print(child.pid, flush=True)\ntime.sleep(300)\n")
    repo = Path(__file__).resolve().parents[1]
    launcher = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "s.log")], stdout=subprocess.PIPE,
                                cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    pid = int(launcher.stdout.readline())
    assert _alive(pid)
    launcher.kill()  # no cleanup code runs in the launcher
    launcher.wait()
    launcher.stdout.close()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_stopped_children_are_not_restarted_and_subset_stop(tmp_path):
    sup = Supervisor(SupervisorConfig(restart_delay_s=0.0, stop_timeout_s=2.0))
    a = sup.start(ChildSpec(name="a", argv=["sleep", "300"], log_path=tmp_path / "a.log"))
    sup.start(ChildSpec(name="b", argv=["sleep", "300"], log_path=tmp_path / "b.log"))
    sup.stop_all(names=["a"])
    assert sup.alive() == ["b"] and a.proc.returncode == -signal.SIGTERM
    assert sup.poll() == [] and sup.state("a") == ChildState.STOPPED  # a stop is not a crash
    sup.stop_all()
    assert sup.alive() == []


async def test_wait_until_fails_fast_when_the_child_gives_up(tmp_path):
    sup = Supervisor(SupervisorConfig(max_restarts=0))
    sup.start(ChildSpec(name="c", argv=["sh", "-c", "exit 1"], log_path=tmp_path / "c.log", critical=True))
    with pytest.raises(RuntimeError, match="c failed to start"):
        await sup.wait_until(lambda: None, "c", timeout_s=20)
    out = tmp_path / "ready.json"
    script = 'echo "noise"; echo \'{"endpoint": "http://x"}\'; sleep 300'
    sup.start(ChildSpec(name="r", argv=["sh", "-c", script], log_path=tmp_path / "r.log", stdout_path=out))
    info = await sup.wait_until(lambda: json_event(out, "endpoint"), "r", timeout_s=20)
    assert info == {"endpoint": "http://x"} and (out.stat().st_mode & 0o777) == 0o600
    sup.stop_all()


def test_tail_and_json_event(tmp_path):
    path = tmp_path / "x.log"
    path.write_text("".join(f"{i}\n" for i in range(100)) + '{"event": "chain_started", "url": "u"}\n')
    assert tail(path, 3) == ["98", "99", '{"event": "chain_started", "url": "u"}']
    assert tail(tmp_path / "missing", 3) == []
    assert json_event(path, "event", "chain_started")["url"] == "u"
    assert json_event(path, "event", "chain_started", offset=path.stat().st_size) is None
    assert json_event(path, "event", "chain_stopped") is None


# --- scoreboard rows ---------------------------------------------------------------------------------------

PARTICIPANTS = [
    Participant(name="validator-0", role="validator", kind="validator", wallet="validator-0", hotkey="hv"),
    Participant(name="miner-0", role="miner", kind="honest", wallet="miner-0", hotkey="h0"),
    Participant(name="miner-1", role="miner", kind="honest", wallet="miner-1", hotkey="h1"),
    Participant(name="adv-noise-0", role="miner", kind="noise", wallet="miner-2", hotkey="h2"),
]


def _entry(window: int, hotkey: str, **kw) -> WindowEntry:
    return WindowEntry(window=window, hotkey=hotkey, mu=25.0, sigma=2.0, **kw)


def _graph(incentive: tuple[float, ...]) -> MetagraphSnapshot:
    hotkeys = ("hv", "h0", "h1", "h2", "hx")
    n = len(hotkeys)
    return MetagraphSnapshot(netuid=1, block=50, tempo=10, hotkeys=hotkeys, coldkeys=hotkeys,
                             stake=(1e4,) + (0.0,) * 4, incentive=incentive, dividends=(1.0,) + (0.0,) * 4,
                             consensus=(0.0,) * n, validator_permit=(True,) + (False,) * 4,
                             last_update=(0,) * n, registered_at=(0,) * n)


def test_build_rows_reads_status_scores_and_incentive():
    losses = EvalResult(loss_before_assigned=5.0, loss_after_assigned=4.0, loss_before_random=5.0,
                        loss_after_random=4.5, step=0.2)
    state = ScoringState(last_window=7, uids={
        1: UidState(hotkey="h0", mu=25, sigma=2, history=[_entry(7, "h0", present=True, timely=True, sync=0.9,
                                                                  losses=losses, weight=0.6)]),
        2: UidState(hotkey="h1", mu=25, sigma=2, history=[_entry(7, "h1", present=True, timely=False)]),
        3: UidState(hotkey="h2", mu=25, sigma=2, history=[_entry(6, "h2", present=True, timely=True),
                                                          _entry(7, "h2", present=True, timely=True,
                                                                 reject_reason="bad index")]),
        4: UidState(hotkey="old", mu=25, sigma=2, history=[_entry(7, "old", present=True, timely=True)]),
    })
    rows = {r.uid: r for r in build_rows(state, 7, _graph((0.0, 0.7, 0.2, 0.1, 0.0)), PARTICIPANTS)}
    assert sorted(rows) == [1, 2, 3, 4]  # the validator is not a row
    assert (rows[1].name, rows[1].status, rows[1].accepted, rows[1].weight) == ("miner-0", "ok", True, 0.6)
    assert rows[1].loss_score == pytest.approx(0.1) and rows[1].rating == pytest.approx(19.0)
    assert rows[1].sync == 0.9 and rows[1].incentive == 0.7
    assert rows[1].why.startswith("uid 1  hotkey h0  window 7") and "raw score" in rows[1].why  # crucible explain
    assert rows[1].value == state.entry(1, 7).value and rows[1].memory == state.entry(1, 7).memory
    assert (rows[2].status, rows[2].accepted) == ("late", False)
    assert (rows[3].kind, rows[3].status) == ("noise", "rejected")
    # uid 4's hotkey is not a participant, and its entry belongs to the uid's previous hotkey
    assert (rows[4].name, rows[4].kind, rows[4].status) == ("uid 4", "external", "-")
    assert build_rows(state, 5, None, PARTICIPANTS)[0].status == "-"  # no entry for that window


def test_scoreboard_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    board = Scoreboard(console=Console(file=out, width=60), live=None)
    assert board.live_mode is False
    snap = WindowSnapshot(window=3, block=31, time=0.0, heldout_loss=7.5, model_window=4,
                          rows=[UidRow(uid=1, name="adv-copycat-0", kind="copycat", status="copy x0.5",
                                       weight=0.25)])
    with board:
        board.show(snap)
        board.note("miner-0 exited with code 1; restarting (1)")
    text = out.getvalue()
    assert "window 3  block 31  held-out loss 7.5000" in text and "adv-copycat-0" in text and "0.250" in text
    assert "restarting (1)" in text and all(len(line) > 0 for line in text.splitlines())


# --- report ------------------------------------------------------------------------------------------------


def _row(uid: int, name: str, kind: str, accepted: bool, weight: float, incentive: float) -> UidRow:
    return UidRow(uid=uid, name=name, kind=kind, status="ok" if accepted else "missing", accepted=accepted,
                  weight=weight, incentive=incentive)


def _snapshots() -> list[WindowSnapshot]:
    snaps = []
    for i, w in enumerate((4, 5, 6)):
        rows = [_row(1, "miner-0", "honest", True, 0.5, 0.4), _row(2, "miner-1", "honest", w != 5, 0.3, 0.3),
                _row(3, "adv-noise-0", "noise", False, 0.2 - 0.1 * i, 0.3 - 0.1 * i)]
        snaps.append(WindowSnapshot(window=w, block=10 * w + 1, time=100.0 + 30 * i, heldout_loss=8.0 - i,
                                    model_window=w + 1, rows=rows))
    return snaps


def test_read_miner_metrics_reads_jsonl_only_and_skips_bad_lines(tmp_path):
    node = tmp_path / "node"
    node.mkdir()
    (tmp_path / "node.log").write_text("window 4: loss 7.3; 2,111 tok/s; compute 41%\n")  # never parsed
    assert read_miner_metrics(node) == []
    (node / "metrics.jsonl").write_text(
        json.dumps({"window": 4, "compute_fraction": 0.9, "tokens_per_s": 10.0, "kind": "honest"}) + "\n"
        "not json\n" + json.dumps({"window": 5, "compute_fraction": -1}) + "\n"
        '{"window": 6, "compute_fraction": NaN, "tokens_per_s": 1}\n'
        + json.dumps({"window": 7, "compute_fraction": 0.5}) + "\n")
    items = read_miner_metrics(node)
    assert [(m.window, m.compute_fraction) for m in items] == [(4, 0.9), (7, 0.5)]
    assert read_miner_metrics(tmp_path / "none") == []


def test_report_schema_numbers_and_plots(tmp_path):
    honest = [MinerWindowMetrics(window=4, compute_fraction=0.8, tokens_per_s=100.0),
              MinerWindowMetrics(window=5, compute_fraction=0.6, tokens_per_s=300.0)]
    metrics = {"miner-0": honest,
               "miner-1": [],
               "adv-noise-0": [MinerWindowMetrics(window=4, compute_fraction=0.1)]}
    report = build_report(_snapshots(), PARTICIPANTS, metrics, initial_loss=8.3, wall_s=90.0,
                          stopped_because="3 windows scored", events=["miner-1 exited with code 1"])
    assert report.windows == 3 and report.window_range == [4, 6]
    assert report.per_uid[1].accepted_windows == 3 and report.per_uid[2].accepted_list == [4, 6]
    assert report.per_uid[3].accepted_windows == 0 and report.per_uid[3].final_weight == pytest.approx(0.0)
    assert report.honest_incentive_share == pytest.approx((0.4 + 0.3) / (0.4 + 0.3 + 0.1))
    assert [(p.window, p.loss) for p in report.heldout_loss] == [(5, 8.0), (6, 7.0), (7, 6.0)]
    assert report.miner_compute_fraction.mean == pytest.approx(0.7)  # honest miners only
    assert report.miner_compute_fraction.per_miner == {"miner-0": pytest.approx(0.7)}
    assert report.miner_compute_fraction.adversaries == {"adv-noise-0": 0.1}  # listed apart, not averaged in
    assert report.miner_compute_fraction.tokens_per_s["miner-0"] == pytest.approx(200.0)
    assert report.windows_per_minute == pytest.approx(2.0)  # 2 windows in 60 s
    assert report.weights_per_window[5] == {1: 0.5, 2: 0.3, 3: pytest.approx(0.1)}

    path = write_report(report, tmp_path / "report")
    assert path.name == REPORT_FILE
    data = json.loads(path.read_text())
    for key in ("windows", "per_uid", "honest_incentive_share", "heldout_loss", "miner_compute_fraction",
                "windows_per_minute"):
        assert key in data
    assert data["per_uid"]["1"]["kind"] == "honest" and data["per_uid"]["1"]["accepted_windows"] == 3
    assert DevnetReport.model_validate_json(path.read_text()) == report  # round-trips
    for plot in (LOSS_PLOT, WEIGHTS_PLOT):
        blob = (tmp_path / "report" / plot).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 5000


def test_report_of_a_run_that_scored_nothing(tmp_path):
    report = build_report([], PARTICIPANTS, {}, stopped_because="interrupted")
    assert (report.windows, report.per_uid, report.honest_incentive_share, report.windows_per_minute) == (
        0, {}, None, None)
    write_report(report, tmp_path)
    assert (tmp_path / LOSS_PLOT).read_bytes()[:8] == PNG_MAGIC


def test_final_rows_give_the_end_incentive_and_no_incentive_gives_no_share():
    final = [_row(1, "miner-0", "honest", True, 0.0, 0.0), _row(3, "adv-noise-0", "noise", True, 0.0, 0.0)]
    report = build_report(_snapshots(), PARTICIPANTS, {}, final_rows=final)
    assert report.honest_incentive_share is None
    assert report.per_uid[1].final_weight == 0.5  # the weight of the last scored window
    assert set(report.per_uid) == {1, 3}


# --- config and CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"adversaries": ["noise", "sybil"]}, "unknown adversary kind 'sybil'; choose from noise"),
    ({"miners": 0}, "a devnet needs at least one miner"),
    ({"miners": -1, "adversaries": ["zero"]}, "miners: Input should be greater than or equal to 0"),
    ({"validators": 0}, "validators: Input should be greater than or equal to 1"),
    ({"windows": 0}, "windows: Input should be greater than or equal to 1"),
    ({"block_time": -1.0}, "block_time: Input should be greater than or equal to 0"),
])
def test_config_validation_errors_are_one_clear_line(kwargs, message):
    with pytest.raises(ValidationError) as exc:
        DevnetConfig(**kwargs)
    assert config_error(exc.value).startswith(message)


def test_flags_are_generated_from_the_config_and_errors_name_the_flag():
    parser = argparse.ArgumentParser()
    add_cli(parser)
    with pytest.raises(FlagError, match="^unknown adversary kind 'sybil'"):
        DEVNET_FLAGS.parse(parser.parse_args(["--miners", "1", "--adversary", "sybil"]))
    with pytest.raises(FlagError, match="^--block-time: Input should be greater than or equal to 0"):
        DEVNET_FLAGS.parse(parser.parse_args(["--block-time", "-1"]))
    args = parser.parse_args(["--adversary", "noise", "--adversary", "copycat", "--set", "inner.steps=2",
                              "--no-dashboard", "--heldout-pages", "8"])
    cfg = DEVNET_FLAGS.parse(args)
    assert cfg.adversaries == ["noise", "copycat"] and cfg.overrides == ["inner.steps=2"] and cfg.miners == 4
    assert cfg.dashboard is False and cfg.heldout_pages == 8
    assert DEVNET_FLAGS.parse(parser.parse_args([])) == DevnetConfig()  # the defaults are the model's
    assert "(default: 4)" in parser.format_help()  # and --help shows them


def test_adversary_kinds_match_the_adversaries_module():
    from devnet.adversaries import KINDS

    assert set(ADVERSARY_KINDS) == set(KINDS)


def _manifest(miners: int, validators: int) -> DevnetManifest:
    def entry(name: str) -> WalletEntry:
        return WalletEntry(name=name, hotkey_ss58=f"hk-{name}", coldkey_ss58=f"ck-{name}")

    return DevnetManifest(netuid=1, genesis="0x0", wallet_path="/w", owner=entry("owner"),
                          miners=[entry(f"miner-{i}") for i in range(miners)],
                          validators=[entry(f"validator-{i}") for i in range(validators)])


def test_participants_and_node_command_lines(tmp_path, monkeypatch):
    cfg = DevnetConfig(miners=2, validators=1, windows=5, adversaries=["noise", "copycat", "noise"],
                       state=tmp_path, overrides=["inner.steps=2"])
    people = plan_participants(cfg, _manifest(6, 2))
    assert [(p.name, p.role, p.kind, p.wallet) for p in people] == [
        ("validator-0", "validator", "validator", "validator-0"), ("miner-0", "miner", "honest", "miner-0"),
        ("miner-1", "miner", "honest", "miner-1"), ("adv-noise-0", "miner", "noise", "miner-2"),
        ("adv-copycat-0", "miner", "copycat", "miner-3"), ("adv-noise-1", "miner", "noise", "miner-4")]
    s3 = {"endpoint": "http://127.0.0.1:9", "region": "us-east-1",
          "read": {"access_key_id": "READKEY", "secret_access_key": "READSECRET"},
          "write": {"access_key_id": "WRITEKEY", "secret_access_key": "WRITESECRET"}}
    spec = node_spec(cfg, people[3], "devnet://127.0.0.1:1", "/w", tmp_path / "data", s3)
    argv = spec.argv
    assert argv[1:5] == ["-m", "neurons.cli", "devnet", "miner"] and argv[argv.index("--adversary") + 1] == "noise"
    assert argv[argv.index("--wallet.name") + 1] == "miner-2"
    assert argv[argv.index("--bucket.name") + 1] == "adv-noise-0"
    assert argv[argv.index("--windows") + 1] == "6" and "--set=inner.steps=2" in argv
    assert not any("SECRET" in a or "KEY" in a for a in argv)  # keys travel in the environment only
    assert spec.env["CRUCIBLE_BUCKET_WRITE_SECRET"] == "WRITESECRET" and spec.env["OMP_NUM_THREADS"] == "1"
    assert spec.env["CRUCIBLE_BUCKET_READ_KEY"] == "READKEY"
    validator = node_spec(cfg, people[0], "devnet://h:1", "/w", tmp_path, s3).argv
    assert validator[3:5] == ["devnet", "validator"] and "--adversary" not in validator
    # what the launcher writes is what `crucible devnet miner` parses, keys read from the child's environment
    args = build_parser().parse_args(argv[3:])
    assert args.adversary == "noise"
    for key, value in spec.env.items():
        if key.startswith("CRUCIBLE_BUCKET_"):
            monkeypatch.setenv(key, value)
    node = NODE_FLAGS.parse(args)
    assert (node.chain.network, node.chain.wallet_name, node.chain.wallet_path) == ("devnet://127.0.0.1:1", "miner-2",
                                                                                      "/w")
    assert node.state_dir == (tmp_path / "nodes" / "adv-noise-0").resolve() and node.data == tmp_path / "data"
    assert (node.bucket.endpoint, node.bucket.region, node.bucket.name) == ("http://127.0.0.1:9", "us-east-1",
                                                                            "adv-noise-0")
    assert node.bucket.write_secret.get_secret_value() == "WRITESECRET" and node.windows == 6


@pytest.mark.parametrize("how", ["kill", "stop_all"])
def test_kill_and_stop_reach_descendants_in_sessions_of_their_own(tmp_path, how):
    """torchrun starts its ranks with start_new_session: a group signal alone left a killed sharded miner's
    ranks mining beside its restart. The supervisor signals the whole process tree."""
    pid_file = tmp_path / "rank.pid"
    sup = Supervisor(SupervisorConfig(stop_timeout_s=1.0))
    sup.start(ChildSpec(name="torchrun", argv=["sh", "-c", f"setsid sleep 300 & echo $! > {pid_file}; wait"],
                        log_path=tmp_path / "t.log"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (pid_file.exists() and pid_file.read_text().strip()):
        time.sleep(0.05)
    rank = int(pid_file.read_text())
    while time.monotonic() < deadline and os.getsid(rank) != rank:  # setsid has run
        time.sleep(0.05)
    assert os.getsid(rank) == rank and rank not in group_members(sup.children["torchrun"].pid)
    if how == "kill":
        assert sup.kill("torchrun") is True
    else:
        sup.stop_all()
    assert not _alive(rank)
