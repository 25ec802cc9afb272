"""Process supervision for the devnet: start children, restart the ones that crash, stop them all.

The devnet is a dozen OS processes (chain, S3 server, validators, miners) on one machine. A child
that dies with a non-zero status before the end is reported with the last lines of its log and
restarted, a bounded number of times; a child that exits 0 has finished its windows and is left
alone. Every child is the leader of its own process group (`start_new_session`), so stopping sends
SIGTERM to the whole group (grandchildren such as `rclone` included) and to every descendant that
left it (torchrun's ranks, each in a session of its own), waits, then SIGKILLs them, and checks
that nothing of it is left alive. On Linux each child also gets
PR_SET_PDEATHSIG, so even a launcher killed with SIGKILL does not leave children running.

    sup = Supervisor(SupervisorConfig(max_restarts=3))
    sup.start(ChildSpec(name="chain", argv=[...], log_path=Path("logs/chain.log")))
    for event in sup.poll(): print(event.message())
    sup.stop_all()
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class SupervisorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_restarts: int = Field(3, ge=0, description="Restarts allowed per child before it is given up.")
    restart_delay_s: float = Field(2.0, ge=0, description="Pause before restarting a crashed child.")
    stop_timeout_s: float = Field(
        10.0, gt=0, description="Wait after SIGTERM before SIGKILL of a process group."
    )
    tail_lines: int = Field(20, ge=1, description="Log lines shown when a child crashes.")


class ChildSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, description="Unique name of the child (log file, scoreboard).")
    argv: list[str] = Field(min_length=1, description="Command line; argv[0] is the executable.")
    log_path: Path = Field(description="stderr (and stdout unless stdout_path is set) go here, appended.")
    stdout_path: Path | None = Field(
        None, description="Separate stdout file (mode 0600, truncated at each start), e.g. for secrets."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment on top of ours.")
    cwd: Path | None = Field(None, description="Working folder (default: ours).")
    critical: bool = Field(False, description="The run cannot go on without this child (chain, S3).")


class ChildState(StrEnum):
    RUNNING = "running"
    WAITING = "waiting"  # crashed, restart scheduled
    FINISHED = "finished"  # exited 0
    FAILED = "failed"  # crashed more than max_restarts times
    STOPPED = "stopped"  # stopped by us


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    state: ChildState = ChildState.RUNNING
    restarts: int = 0
    last_code: int | None = None
    restart_at: float = 0.0
    planned: bool = False  # stopped by a fault plan's kill: the coming restart is not counted as a crash's
    pids: list[int] = field(default_factory=list)  # every pid it ran as, for checks

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass(frozen=True)
class ChildEvent:
    """Something the launcher should show: a crash (with a restart or not) or a clean finish."""

    name: str
    kind: str  # "crashed" | "failed" | "finished"
    code: int | None
    tail: list[str]
    restarts: int
    critical: bool

    def message(self) -> str:
        head = {
            "crashed": f"{self.name} exited with code {self.code}; restarting ({self.restarts})",
            "failed": f"{self.name} exited with code {self.code}; giving up after {self.restarts} restarts",
            "finished": f"{self.name} finished",
        }[self.kind]
        if not self.tail:
            return head
        return head + "\n" + "\n".join(f"    | {line}" for line in self.tail)


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file (reads at most 64 KiB from its end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read()
    except OSError:
        return []
    text = data.decode(errors="replace").splitlines()
    return list(collections.deque(text, maxlen=lines))


def json_event(path: Path, key: str, value: object = None, offset: int = 0) -> dict | None:
    """The first JSON-object line of a child's output (from byte `offset`) holding `key` (= `value`)."""
    try:
        text = path.read_bytes()[offset:].decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and key in obj and (value is None or obj[key] == value):
            return obj
    return None


def _proc_stats() -> dict[int, tuple[int, int, str]]:
    """pid → (ppid, pgid, state) of every process, from /proc (Linux); {} elsewhere."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgid, ...); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces or parentheses: the fields after the last ')' are fixed.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields if len(fields) > 2 else None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc (Linux); [] elsewhere."""
    return [pid for pid, (_, group, state) in _proc_stats().items() if group == pgid and state != "Z"]


def process_tree(pgid: int) -> list[int]:
    """Live processes of a process group AND every descendant of them, whatever their own group.

    A group signal misses descendants that made a session of their own: torchrun starts each worker
    rank with `start_new_session`, so SIGKILL of a sharded miner's group (`--miner-ranks`) left its
    ranks mining under the same hotkey beside the restarted node. Read this before signalling: once
    the leader is dead its children are re-parented and can no longer be traced to it.
    """
    table = _proc_stats()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _, _) in table.items():
        children[ppid].append(pid)
    found = {pid for pid, (_, group, _) in table.items() if group == pgid}
    frontier = list(found)
    while frontier:
        for child in children[frontier.pop()]:
            if child not in found:
                found.add(child)
                frontier.append(child)
    return sorted(pid for pid in found if table[pid][2] != "Z")


def _signal_all(pgid: int, pids: list[int], sig: signal.Signals) -> None:
    """Signal a process group and the given processes (its descendants outside the group)."""
    for target in [None, *pids]:
        try:
            os.killpg(pgid, sig) if target is None else os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _any_alive(pids: list[int]) -> bool:
    return any((fields := _stat_fields(pid)) is not None and fields[0] != "Z" for pid in pids)


# Looked up once here: between fork and exec the child must not dlopen (another thread may hold the lock).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the launcher dies, however it dies (Linux)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Supervisor:
    """Owns the devnet's children; not thread-safe (one launcher loop drives it)."""

    def __init__(self, config: SupervisorConfig | None = None):
        self.config = config or SupervisorConfig()
        self.children: dict[str, Child] = {}
        self.stopping = False

    def start(self, spec: ChildSpec) -> Child:
        if spec.name in self.children and self.children[spec.name].state == ChildState.RUNNING:
            raise ValueError(f"child {spec.name!r} is already running")
        child = self.children.get(spec.name) or Child(spec)
        child.spec = spec
        self._spawn(child)
        self.children[spec.name] = child
        return child

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(spec.log_path, "ab")  # noqa: SIM115 - the child owns it after Popen
        log.write(
            f"--- {time.strftime('%H:%M:%S')} start {spec.name} (restart {child.restarts}) ---\n".encode()
        )
        log.flush()
        out = log
        if spec.stdout_path is not None:
            spec.stdout_path.parent.mkdir(parents=True, exist_ok=True)
            out = os.fdopen(os.open(spec.stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        try:
            child.proc = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                cwd=spec.cwd,
                env={**os.environ, **spec.env},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
            if out is not log:
                out.close()
        child.pids.append(child.proc.pid)
        child.state = ChildState.RUNNING

    def poll(self) -> list[ChildEvent]:
        """Reap exited children, schedule or perform restarts; returns what happened since last time."""
        events: list[ChildEvent] = []
        now = time.monotonic()
        for child in self.children.values():
            if child.state == ChildState.WAITING and now >= child.restart_at and not self.stopping:
                child.restarts += 0 if child.planned else 1
                child.planned = False
                self._spawn(child)
                continue
            if child.state != ChildState.RUNNING or child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            child.last_code = code
            if group_members(child.proc.pid):  # leftovers of an exited child keep its pgid reserved
                self._kill_group(child.proc.pid, signal.SIGKILL)
            if code == 0:
                child.state = ChildState.FINISHED
                events.append(self._event(child, "finished", with_tail=False))
            elif child.restarts < self.config.max_restarts and not self.stopping:
                child.state, child.restart_at = ChildState.WAITING, now + self.config.restart_delay_s
                events.append(self._event(child, "crashed", restarts=child.restarts + 1))
            else:
                child.state = ChildState.FAILED
                events.append(self._event(child, "failed"))
        return events

    def _event(
        self, child: Child, kind: str, *, with_tail: bool = True, restarts: int | None = None
    ) -> ChildEvent:
        lines = tail(child.spec.log_path, self.config.tail_lines) if with_tail else []
        return ChildEvent(
            child.spec.name,
            kind,
            child.last_code,
            lines,
            child.restarts if restarts is None else restarts,
            child.spec.critical,
        )

    async def wait_until(self, probe: Callable[[], T | None], name: str, timeout_s: float) -> T:
        """Poll `probe()` until it returns something, e.g. a started child's ready line; fails early
        with a clear message if child `name` gave up, and after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if self.state(name) == ChildState.FAILED:
                raise RuntimeError(f"{name} failed to start; see {self.children[name].spec.log_path}")
            value = probe()
            if value is not None:
                return value
            await asyncio.sleep(0.2)
        raise RuntimeError(
            f"{name} did not come up within {timeout_s:.0f} s; see {self.children[name].spec.log_path}"
        )

    def state(self, name: str) -> ChildState:
        return self.children[name].state

    def alive(self) -> list[str]:
        return [n for n, c in self.children.items() if c.proc is not None and c.proc.poll() is None]

    @staticmethod
    def _kill_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _group_alive(child: Child) -> bool:
        assert child.proc is not None
        return child.proc.poll() is None or bool(group_members(child.proc.pid))

    def stop_all(self, timeout_s: float | None = None, names: list[str] | None = None) -> list[str]:
        """SIGTERM every child's group (or only `names`), wait, SIGKILL what is left; returns the names
        that needed SIGKILL. Stopped children are never restarted.

        Only groups known to be alive are signalled: a reaped leader whose group is empty may have had
        its pid reused by an unrelated process."""
        self.stopping = True
        timeout = self.config.stop_timeout_s if timeout_s is None else timeout_s
        chosen = (
            [self.children[n] for n in names if n in self.children]
            if names is not None
            else self.children.values()
        )
        targets = [c for c in chosen if c.proc is not None and self._group_alive(c)]
        trees = {c.spec.name: process_tree(c.proc.pid) for c in targets}  # before any leader dies

        def alive(c: Child) -> bool:
            return self._group_alive(c) or _any_alive(trees[c.spec.name])

        for child in targets:
            _signal_all(child.proc.pid, trees[child.spec.name], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(c) for c in targets):
            time.sleep(0.05)
        killed = [c.spec.name for c in targets if alive(c)]
        for child in targets:
            if alive(child):
                _signal_all(child.proc.pid, trees[child.spec.name], signal.SIGKILL)
        for child in targets:
            child.proc.wait()
            end = time.monotonic() + 5.0
            while alive(child) and time.monotonic() < end:
                time.sleep(0.05)
        for child in chosen:
            if child.state in (ChildState.RUNNING, ChildState.WAITING):
                child.state = ChildState.STOPPED
        return killed

    def kill(self, name: str, restart_after_s: float | None = None) -> bool:
        """SIGKILL a running child's whole group now (a fault plan's kill -9, devnet/faults.py) and restart it
        `restart_after_s` later (None: never); such a restart does not count against max_restarts.
        False when the child was not running."""
        child = self.children.get(name)
        if child is None or child.proc is None or child.proc.poll() is not None:
            return False
        tree = process_tree(child.proc.pid)  # torchrun's ranks live in sessions of their own
        _signal_all(child.proc.pid, tree, signal.SIGKILL)
        child.proc.wait()
        child.last_code = child.proc.returncode
        end = time.monotonic() + 5.0
        while (group_members(child.proc.pid) or _any_alive(tree)) and time.monotonic() < end:
            time.sleep(0.05)
        if restart_after_s is None:
            child.state = ChildState.STOPPED
        else:
            child.state, child.planned = ChildState.WAITING, True
            child.restart_at = time.monotonic() + restart_after_s
        return True

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
