"""`crucible devnet run`: a whole Crucible network on this machine, for W windows, then a report.

One command creates (or reuses) the devnet folder — chain state and wallets in DIR/chain, buckets
in DIR/s3, the dataset in DIR/data, each node's state in DIR/nodes/NAME, logs in DIR/logs — and
starts, each as its own OS process under the `Supervisor`: the simulated chain, the S3 server, the
validators, then the miners, as `crucible devnet validator|miner`: the node flags a mainnet user
passes to `crucible validator|miner` (generated from the same `NodeConfig`) and the same node code,
with the devnet's chain client plugged in (`devnet.participant`). Adversaries are extra registered
miner wallets (`miner-N…`, named `adv-<kind>-j` everywhere else) started with `--adversary KIND`.

Buckets: one per participant. `rclone serve s3` knows two key pairs and does not enforce read-only
keys, so every node gets the server's read pair as its "read" key (published on chain) and the
write pair as its "write" key; both can in fact write. Keys reach the nodes through their
CRUCIBLE_BUCKET_* environment variables, never argv (visible in `ps`) or a log file.

The run ends after the first validator has scored W windows (or at a window cap, when a node
never comes up, or on Ctrl-C/SIGTERM); the report is written in every case. Then, when stdin is a
terminal, the web dashboard stays up (nodes, chain and S3 already stopped) until Enter or Ctrl-C, so
the URL printed at the start can still be opened; `--no-keep-dashboard` exits at once, and a run
without a terminal (CI, tests, `nohup`) always does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import time

from devnet.chain_validators import ValidatorWindow, read_validators, summarize
from devnet.contribution import measure as measure_contribution
from devnet.contribution import watch_spec as contribution_watch
from devnet.dashboard import Dashboard, DashboardConfig
from devnet.fault_report import final_digests, summarize_faults
from devnet.faults import FaultRunner, check_plan, parse_plan
from devnet.launch_plan import (
    DATASET_BUCKET,
    DEVNET_FLAGS,
    REPO,
    DevnetConfig,
    child_env,
    commit_reveal_note,
    crucible,
    ensure_dataset,
    node_spec,
    plan_participants,
    prepare_state,
    publish_to_devnet,
)
from devnet.report import build_report, read_miner_metrics, write_report
from devnet.s3 import HOST, free_port
from devnet.scoreboard import (
    HONEST,
    HeldoutEvaluator,
    Participant,
    Scoreboard,
    ScoreWatcher,
    UidRow,
    WindowSnapshot,
    build_rows,
)
from devnet.substrate import devnet_chain
from devnet.supervisor import ChildSpec, ChildState, Supervisor, SupervisorConfig, json_event
from neurons.node_files import read_metrics
from protocol.hparams import load_hparams
from transport.chain import Chain, ChainConfig


class Devnet:
    """One run: the supervisor, the scoreboard and what they collect."""

    def __init__(self, cfg: DevnetConfig, board: Scoreboard | None = None):
        self.cfg, self.hp = cfg, load_hparams(cfg.preset, cfg.overrides)
        self.board = board or Scoreboard()
        self.sup = Supervisor(SupervisorConfig(max_restarts=cfg.max_restarts))
        self.stop = asyncio.Event()
        self.snapshots: list[WindowSnapshot] = []
        self.events: list[str] = []
        self.final_rows: list[UidRow] | None = None
        self.validator_windows: list[ValidatorWindow] = []
        self.validators_summary: dict | None = None
        self.killed: set[str] = set()
        self.faults: FaultRunner | None = None
        self.measures_contribution = cfg.contribution or bool(cfg.miner_profile)
        self.contribution_dir = cfg.state / "contribution"
        shown = {"preset", "miners", "validators", "adversaries", "windows"}
        summary = cfg.model_dump(mode="json", include=shown)
        self.dash = Dashboard(DashboardConfig(enabled=cfg.dashboard, port=cfg.dashboard_port), summary)

    def note(self, message: str) -> None:
        """An event line for the terminal and the web dashboard."""
        self.board.note(message)
        self.dash.note(message)

    async def start_network(self, participants: list[Participant]) -> tuple[str, dict]:
        """Chain and S3 server, each its own supervised process; returns (chain URL, S3 info with keys)."""
        cfg, logs, env = self.cfg, self.cfg.state / "logs", child_env(self.cfg)
        block_time = self.hp.windows.expected_block_time_s if cfg.block_time is None else cfg.block_time
        chain_log, port = logs / "chain.log", free_port()
        offset = chain_log.stat().st_size if chain_log.exists() else 0
        argv = crucible("devnet", "chain", "--state", str(cfg.state / "chain"), "--port", str(port),
                        "--block-time", str(block_time))
        self.sup.start(ChildSpec(name="chain", argv=argv, log_path=chain_log, env=env, cwd=REPO,
                                 critical=True))
        ready = lambda: json_event(chain_log, "event", "chain_started", offset)  # noqa: E731
        await self.sup.wait_until(ready, "chain", cfg.start_timeout_s)
        url = f"devnet://{HOST}:{port}"
        bpw = self.hp.windows.blocks_per_window
        self.note(f"chain at {url} ({block_time:g} s blocks, {bpw} blocks per window)")
        info = cfg.state / "s3-server.json"  # mode 0600: it holds the keys
        argv = crucible("devnet", "s3", "--dir", str(cfg.state / "s3"), "--port", str(free_port()),
                        *(f"--bucket={p.name}" for p in participants),
                        *([] if cfg.shared_data else [f"--bucket={DATASET_BUCKET}"]))
        self.sup.start(ChildSpec(name="s3", argv=argv, log_path=logs / "s3.log", stdout_path=info, env=env,
                                 cwd=REPO, critical=True))
        s3 = await self.sup.wait_until(lambda: json_event(info, "endpoint"), "s3", cfg.start_timeout_s)
        self.note(f"S3 at {s3['endpoint']} with {len(participants)} buckets")
        return url, s3

    async def monitor(self, chain: Chain, watcher: ScoreWatcher) -> str:
        """Poll children, chain and the first validator's state until W windows are scored; returns why
        the run stops."""
        cfg, validators = self.cfg, [p.name for p in watcher.participants if p.role == "validator"]
        cap: int | None = None
        unreadable: str | None = None  # the last reason noted, so it is said once
        while not self.stop.is_set():
            for event in self.sup.poll():
                self.note(event.message())
                self.events.append(event.message().splitlines()[0])
                if event.critical and event.kind == "failed":
                    return f"{event.name} failed"
            try:
                block: int | None = await chain.block()
            except Exception as exc:  # the SDK raises several types while the chain restarts
                self.note(f"chain not answering: {type(exc).__name__}")
                block = None
            if block is not None:
                window = block // self.hp.windows.blocks_per_window
                self.kill_due(window)
                for line in self.faults.tick(window) if self.faults is not None else []:
                    self.note(line)
                    self.events.append(line)
                cap = window + cfg.windows + cfg.slack_windows if cap is None else cap
                if window >= cap:
                    return f"window cap {cap} reached with {len(self.snapshots)} windows scored"
            snaps = await watcher.poll(chain, block)
            if watcher.unreadable is not None and watcher.unreadable != unreadable:
                self.note(f"the validator's scores cannot be read, windows are not reported: {watcher.unreadable}")
                self.events.append(f"scores unreadable: {watcher.unreadable}")
            unreadable = watcher.unreadable
            for snap in snaps:
                self.snapshots.append(snap)
                progress = f"{len(self.snapshots)}/{cfg.windows} windows; logs in {cfg.state / 'logs'}"
                self.board.show(snap, progress)
                self.dash.publish(snap)
                if cfg.validators > 1:
                    await self.read_validators(chain, watcher.participants, snap.window)
            if len(self.snapshots) >= cfg.windows:
                return f"{len(self.snapshots)} windows scored"
            if all(self.sup.state(v) in (ChildState.FINISHED, ChildState.FAILED) for v in validators):
                return "every validator exited"
            try:
                await asyncio.wait_for(self.stop.wait(), cfg.poll_s)
            except TimeoutError:
                pass
        return "interrupted"

    def kill_due(self, window: int) -> None:
        """--kill NAME@WINDOW: SIGKILL the node once the chain is at WINDOW; it stays dead."""
        for item in list(self.cfg.kill):
            name, _, at = item.partition("@")
            if window >= int(at) and item not in self.killed:
                self.killed.add(item)
                self.sup.stop_all(timeout_s=0, names=[name])
                self.sup.stopping = False  # stop_all marks the whole run as stopping: only this node is
                self.note(f"killed {name} at window {window} (--kill {item}); not restarted")
                self.events.append(f"killed {name} at window {window}")

    async def read_validators(self, chain: Chain, participants: list[Participant], window: int) -> None:
        """Per-validator trust and the spread of their weights on chain after `window` (several validators)."""
        try:
            seen = await read_validators(chain, participants, window)
        except Exception as exc:  # the SDK raises several types while the chain restarts
            self.note(f"validators not readable after window {window}: {type(exc).__name__}")
            return
        self.validator_windows.append(seen)
        self.dash.publish_validators(seen)
        trust = ", ".join(f"{name} {v:.3f}" for name, v in seen.vtrust.items())
        spread = "n/a" if seen.spread is None else f"{seen.spread:.3f}"
        self.note(f"window {window}: vtrust {trust}; weight spread {spread}")

    async def run(self) -> int:
        try:
            code = await self._run()
            if code != 130:  # Ctrl-C during the run means "stop now", dashboard included
                await self.linger()
            return code
        finally:
            await self.dash.stop()

    async def linger(self) -> None:
        """Keep the dashboard up after the run until Enter or Ctrl-C, when someone is at a terminal to say so."""
        if self.dash.url is None or not self.cfg.keep_dashboard or not sys.stdin.isatty():
            return
        self.note(f"run finished; the dashboard stays up at {self.dash.url} until you press Enter or Ctrl-C")
        loop, done = asyncio.get_running_loop(), asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.readline(), done.set()))
        try:
            await done.wait()
        finally:
            loop.remove_reader(sys.stdin.fileno())
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        cfg, hp, board, started = self.cfg, self.hp, self.board, time.time()
        cfg.state.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("BTCLI_TOKEN_SYMBOLS_CACHE", child_env(cfg)["BTCLI_TOKEN_SYMBOLS_CACHE"])
        manifest = prepare_state(cfg, hp)
        if note := commit_reveal_note(cfg, manifest):
            self.note(note)
            self.events.append(note)
        participants = plan_participants(cfg, manifest)
        plan = parse_plan(cfg.faults)
        check_plan(plan, {p.name: p.role for p in participants})
        watched_name = next((p.name for p in participants if p.role == "validator"), None)
        self.note(f"devnet in {cfg.state}: {cfg.validators} validators, {cfg.miners} honest miners, "
                  f"adversaries: {', '.join(cfg.adversaries) or 'none'}")
        reason, chain, loop = "setup failed", None, asyncio.get_running_loop()
        try:
            if page := await self.dash.start():
                self.note(f"dashboard: {page}")
            data = await asyncio.to_thread(ensure_dataset, cfg, hp)
            evaluator = await asyncio.to_thread(HeldoutEvaluator, hp, data, cfg.heldout_pages)
            initial = self.dash.summary["initial_loss"] = await asyncio.to_thread(evaluator.initial)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop.set)
            with board:
                url, s3 = await self.start_network(participants)
                if plan:
                    self.faults = FaultRunner(plan, self.sup, cfg.state, {p.name: p.hotkey for p in participants}, s3,
                                              [p.name for p in participants if p.role == "validator"])
                chain = devnet_chain(ChainConfig(network=url, netuid=cfg.netuid, wallet_path=manifest.wallet_path))
                await chain.connect()
                nodes_cfg, nodes_data = cfg, data
                if not cfg.shared_data:  # nodes read pages from the devnet's S3, pinned by hash; no page folder
                    pinned_hp, pinned = await asyncio.to_thread(publish_to_devnet, cfg, data, s3)
                    nodes_cfg = cfg.model_copy(update={"preset": str(pinned_hp), "overrides": []})
                    nodes_data = cfg.state / "no-shared-data"
                    self.hp = evaluator.hp = load_hparams(str(pinned_hp))  # the pin is in the revision
                    self.note(f"dataset published to s3://{DATASET_BUCKET}/dataset/{pinned[:16]}/ "
                              f"(manifest {pinned[:16]}…); nodes read their pages from there")
                faulty = self.faults.nodes_with_fault_file() if self.faults is not None else {}
                for p in participants:  # validators first: they publish the first peer list
                    spec = node_spec(nodes_cfg, p, url, manifest.wallet_path, nodes_data, s3)
                    if p.name in faulty:  # devnet/faults.py: this node alone cannot read a peer for a window
                        spec = spec.model_copy(update={"argv": [*spec.argv, "--fault-file", str(faulty[p.name])]})
                    self.sup.start(spec)
                self.note(f"started {len(participants)} nodes; logs in {cfg.state / 'logs'}")
                if self.measures_contribution:  # θ per window, copied as the first validator saves it
                    shutil.rmtree(self.contribution_dir, ignore_errors=True)
                    self.sup.start(contribution_watch(cfg.state, self.contribution_dir))
                doomed = {k.partition("@")[0] for k in cfg.kill}  # watch a validator that stays up
                watched = next((p for p in participants if p.role == "validator" and p.name not in doomed),
                               participants[0])
                watched_name = watched.name
                watcher = ScoreWatcher(cfg.state / "nodes" / watched.name, participants, evaluator)
                reason = await self.monitor(chain, watcher)
                self.note(f"stopping: {reason}")
                try:  # incentive at the end (the chain is still up)
                    last = self.snapshots[-1].window if self.snapshots else -1
                    graph = await chain.metagraph()
                    self.final_rows = build_rows(watcher.state(), last, graph, participants)
                    if cfg.validators > 1:
                        await self.read_validators(chain, participants, last)
                        self.validators_summary = summarize(self.validator_windows, participants, graph)
                except Exception as exc:
                    self.note(f"final metagraph not readable: {type(exc).__name__}")
        finally:
            self.dash.set_status(f"stopped: {reason}")
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if self.faults is not None:
                for line in self.faults.release():  # continue what is stopped: stop_all must find it running
                    self.note(line)
                    self.events.append(line)
            if chain is not None:
                await chain.close()
            self.sup.stop_all(names=[p.name for p in participants])  # nodes first, then chain and S3
            self.sup.stop_all()
        nodes = cfg.state / "nodes"
        metrics = {p.name: read_miner_metrics(nodes / p.name) for p in participants if p.role == "miner"}
        contribution = None
        if self.measures_contribution and self.snapshots:  # after the run: never on the validator's path
            self.note("measuring each miner's contribution (held-out loss change of its accepted updates alone)")
            try:
                measured = await asyncio.to_thread(measure_contribution, cfg.state, self.contribution_dir,
                                                   data=data, hp=self.hp, netuid=cfg.netuid,
                                                   pages=CONTRIBUTION_PAGES)
                contribution = {int(u): float(c) for u, c in measured["mean"].items()}
            except Exception as exc:  # the report stands without it
                self.note(f"contribution not measured: {type(exc).__name__}: {exc}")
        report = build_report(self.snapshots, participants, metrics, final_rows=self.final_rows,
                              initial_loss=initial, wall_s=time.time() - started, stopped_because=reason,
                              events=self.events, contribution=contribution)
        if self.validator_windows:
            report.validators = self.validators_summary or summarize(self.validator_windows, participants)
            report.weight_spread_per_window = {w.window: w.spread for w in self.validator_windows
                                               if w.spread is not None}
        honest = [p.name for p in participants if p.kind in (HONEST, "validator")]
        report.final_digests = final_digests(cfg.state, honest, watched_name) if watched_name else None
        if self.faults is not None:
            lines = {p.name: read_metrics(nodes / p.name) for p in participants if p.kind == HONEST and p.role == "miner"}
            report.faults = summarize_faults(self.faults.events, lines, self.faults.window_times,
                                             {s.window for s in self.snapshots},
                                             {h.window: h.loss for h in report.heldout_loss})
        path = write_report(report, cfg.report_dir)
        share = "n/a" if report.honest_incentive_share is None else f"{report.honest_incentive_share:.1%}"
        self.note(f"{report.windows} windows; honest incentive share {share}; report: {path}")
        if reason == "interrupted":
            return 130
        return 0 if report.windows >= cfg.windows else 1


# Held-out pages per contribution evaluation: all of them cost ~1 min per window after a run on 2 cores;
# 64 pages of 128 tokens leave equal honest miners ≈ 3 % apart over 20 windows (docs/incentives.md).
CONTRIBUTION_PAGES = 64




def add_cli(parser: argparse.ArgumentParser) -> None:
    DEVNET_FLAGS.add_to(parser)


def run_cli(args: argparse.Namespace) -> int:
    cfg = DEVNET_FLAGS.parse(args)  # FlagError: one line and exit 2 (neurons.cli)
    import torch

    torch.set_num_threads(cfg.node_threads)  # the launcher's held-out evaluation shares the cores too
    try:
        return asyncio.run(Devnet(cfg).run())
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"crucible devnet run: {exc}", file=sys.stderr)
        return 1
