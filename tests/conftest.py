"""Shared fixtures: each plugin module starts one real part (data, S3 server, chain) for the tests.

Also `torchrun`, the one way tests start a multi-rank gloo job, and `held_tcp_init`, for a test that is
rank 0 itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

pytest_plugins = ["tests.plugins.data", "tests.plugins.chain", "tests.plugins.s3", "tests.plugins.network", "tests.plugins.hostile_s3"]

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
TAIL = 6000  # characters of each stream in a failure report


@dataclass
class TorchrunResult:
    """A finished torchrun: its own output (the launcher's) and each rank's stdout and stderr, whole."""

    returncode: int
    launcher: str
    stdout: list[str]
    stderr: list[str]

    @property
    def output(self) -> str:
        """Everything any process printed: what a test searches for a message, whichever rank printed it."""
        return "\n".join([self.launcher, *self.stdout, *self.stderr])

    def report(self) -> str:
        """For an assertion message: the launcher's output and every rank's streams (their tails), so a
        failed rank 1 ("Connection closed by peer") comes with rank 0's traceback that caused it."""
        parts = [f"torchrun exit code {self.returncode}", "--- torchrun ---", self.launcher[-TAIL:]]
        for rank, (out, err) in enumerate(zip(self.stdout, self.stderr, strict=True)):
            parts += [f"--- rank {rank} stderr ---", err[-TAIL:], f"--- rank {rank} stdout ---", out[-TAIL:]]
        return "\n".join(parts)


def torchrun(args: list[str], log_dir: Path, *, nproc: int = 2, env: dict[str, str] | None = None,
             timeout: float = 300) -> TorchrunResult:
    """`python -m torch.distributed.run --nproc_per_node <nproc> <args>` from the repository, on CPU.

    --standalone: torchrun's c10d rendezvous binds its TCPStore on port 0 itself and the ranks join that
    same store (torch shares the agent's store with the workers), so no port number is picked, released,
    and bound again later; a port picked that way (bind 0, close, pass it on) could be taken by another
    process meanwhile, and a rank then failed to join ("Connection closed by peer"). --redirects 3: each
    rank's stdout and stderr go to their own files under `log_dir`, all of them read back here. A run past
    `timeout` is stopped (torchrun stops its ranks on SIGTERM) and reported with what the ranks printed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="torchrun-", dir=log_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
           "--nproc_per_node", str(nproc), "--log-dir", str(logs), "--redirects", "3", *args]
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        launcher, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            launcher, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            launcher, _ = proc.communicate()
        timed_out = True

    def read(rank: int, stream: str) -> str:
        found = sorted(logs.glob(f"*/attempt_*/{rank}/{stream}.log"))
        return "".join(p.read_text(errors="replace") for p in found) if found else f"(no {stream}.log)"

    done = TorchrunResult(proc.returncode, launcher, [read(r, "stdout") for r in range(nproc)],
                          [read(r, "stderr") for r in range(nproc)])
    if timed_out:
        raise AssertionError(f"torchrun still running after {timeout} s\n{done.report()}")
    return done


def held_tcp_init() -> tuple[str, torch.distributed.TCPStore]:
    """A `tcp://127.0.0.1:<port>` init method whose port this process already holds: a multi-tenant TCPStore
    server bound on port 0. Rank 0 (this process) then calling `init_process_group(init_method=...)` reuses
    that server (multi-tenant stores in one process share it) instead of binding the port again, so no other
    process can take the port between its choice and the rendezvous. Keep the store until the group is up."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
    return f"tcp://127.0.0.1:{store.port}", store
