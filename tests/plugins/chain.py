"""Fixtures for a real devnet chain: a `devnet.chain_server` process in a tmp folder, fast blocks, wallets.

    from tests.plugins.chain import *  # noqa: F403  (or list it in tests/conftest.py's pytest_plugins)

`devnet_chain` (module scope) is a fresh chain with funded but unregistered wallets; `chain_factory`
starts chains with other settings (each one stopped at teardown); `ChainProcess.restart()` stops the
process with SIGTERM and starts it again on the same port and state folder.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devnet.bootstrap import BootstrapConfig, DevnetManifest, init_devnet
from devnet.chain_epoch import produce_block
from devnet.chain_state import SubnetParams
from devnet.chain_store import load_state, save_state
from devnet.participant import devnet_endpoints
from devnet.substrate import devnet_client
from transport.chain import Chain, ChainConfig

__all__ = ["ChainProcess", "FAST_SUBNET", "bt_cache_env", "chain_factory", "devnet_chain", "start_chain"]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0

# Test subnet: 0.2 s blocks, an epoch every 5 blocks, weights every 5 blocks.
FAST_SUBNET = SubnetParams(tempo=5, weights_rate_limit=5, immunity_period=20, max_allowed_uids=16,
                           validator_min_stake=100 * 10**9)


@dataclass
class ChainProcess:
    state_dir: Path
    manifest: DevnetManifest
    block_time: float
    port: int = 0
    url: str = ""
    started_block: int = -1  # head the process reported when it started
    stopped_block: int = -1  # head it reported when it stopped
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> ChainProcess:
        log = open(self.state_dir / "chain.log", "ab")  # noqa: SIM115 - owned by the child process
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "devnet.chain_server", "--state", str(self.state_dir),
               "--port", str(self.port), "--block-time", str(self.block_time)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO)
        log.close()
        line = _read_line(self.proc, START_TIMEOUT_S)
        started = json.loads(line)
        if started.get("event") != "chain_started":
            raise RuntimeError(f"chain did not start: {line!r}")
        self.url = started["url"]
        self.started_block = int(started["block"])
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            for raw in self.proc.stdout.read().decode().splitlines():
                event = json.loads(raw)
                if event.get("event") == "chain_stopped":
                    self.stopped_block = int(event["block"])
            self.proc.stdout.close()
        self.proc = None
        return code

    def restart(self) -> ChainProcess:
        self.stop()
        return self.start()

    def chain(self, wallet_name: str, netuid: int | None = None) -> Chain:
        """A (not yet connected) `Chain` on this devnet chain for one of its wallets, reading commitments
        with the devnet's endpoint allowance (http on loopback, as every devnet node)."""
        return Chain(self.config(wallet_name, netuid), client=devnet_client(self.url), endpoints=devnet_endpoints())

    def config(self, wallet_name: str, netuid: int | None = None) -> ChainConfig:
        return ChainConfig(network=self.url, netuid=netuid or self.manifest.netuid, wallet_name=wallet_name,
                           wallet_path=self.manifest.wallet_path)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise TimeoutError("devnet chain printed nothing before the timeout")
    line = proc.stdout.readline().decode()
    if not line:
        raise RuntimeError(f"devnet chain exited with {proc.wait()} before printing its URL")
    return line


@pytest.fixture(scope="session")
def bt_cache_env(tmp_path_factory) -> Iterator[None]:
    """Keep the SDK's token-symbol cache out of the real home folder."""
    old = os.environ.get("BTCLI_TOKEN_SYMBOLS_CACHE")
    os.environ["BTCLI_TOKEN_SYMBOLS_CACHE"] = str(tmp_path_factory.mktemp("btcache") / "symbols.json")
    yield
    if old is None:
        os.environ.pop("BTCLI_TOKEN_SYMBOLS_CACHE", None)
    else:
        os.environ["BTCLI_TOKEN_SYMBOLS_CACHE"] = old


def start_chain(state_dir: Path, config: BootstrapConfig, block_time: float = 0.2, start_block: int = 0) -> ChainProcess:
    """A chain process on a fresh genesis; with `start_block`, genesis already has that many empty blocks,
    stamped `block_time` apart up to now, so the head starts there (see `tests.plugins.network.lead_in`)."""
    manifest = init_devnet(state_dir, config)
    if start_block > 0:
        state = load_state(state_dir)
        now_ms = int(time.time() * 1000)
        step_ms = int(block_time * 1000)
        state.timestamps[0] = now_ms - start_block * step_ms  # genesis that long ago, then one block per step
        for i in range(1, start_block + 1):
            produce_block(state, state.timestamps[0] + i * step_ms)
        save_state(state_dir, state)
    return ChainProcess(state_dir=state_dir, manifest=manifest, block_time=block_time).start()


@pytest.fixture
def chain_factory(tmp_path_factory, bt_cache_env) -> Iterator[Callable[..., ChainProcess]]:
    started: list[ChainProcess] = []

    def make(config: BootstrapConfig | None = None, block_time: float = 0.2) -> ChainProcess:
        cfg = config or BootstrapConfig(miners=2, validators=1, subnet=FAST_SUBNET)
        chain = start_chain(tmp_path_factory.mktemp("devnet"), cfg, block_time)
        started.append(chain)
        return chain

    yield make
    for chain in started:
        chain.stop()


@pytest.fixture(scope="module")
def devnet_chain(tmp_path_factory, bt_cache_env) -> Iterator[ChainProcess]:
    """3 miners + 1 validator wallets, funded, nothing registered; 0.2 s blocks, tempo 5."""
    cfg = BootstrapConfig(miners=3, validators=1, register_all=False, subnet=FAST_SUBNET)
    chain = start_chain(tmp_path_factory.mktemp("devnet"), cfg, block_time=0.2)
    yield chain
    chain.stop()
