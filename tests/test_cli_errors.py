"""Every bad input an operator can give, through the real command line (a fresh `crucible` process each):
exit code ≠ 0, exactly one line on stderr that names the flag, file or network at fault, no traceback,
no pydantic dump and no "Unclosed client session" after a chain error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devnet.bootstrap import BootstrapConfig
from gauntlet.records import WindowEntry
from gauntlet.state import ScoringState, UidState, save_state
from neurons.node_files import SCORES_FILE
from tests.plugins.chain import FAST_SUBNET

REPO = Path(__file__).resolve().parents[1]
KEYS = {"CRUCIBLE_BUCKET_NAME": "bucket", "CRUCIBLE_BUCKET_READ_KEY": "r" * 20, "CRUCIBLE_BUCKET_READ_SECRET": "s" * 20,
        "CRUCIBLE_BUCKET_WRITE_KEY": "w" * 20, "CRUCIBLE_BUCKET_WRITE_SECRET": "t" * 20,
        "CRUCIBLE_BUCKET_ENDPOINT": "https://0123456789abcdef.r2.cloudflarestorage.com"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crucible(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRUCIBLE_")}
    return subprocess.run([sys.executable, "-m", "neurons.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          env={**clean, **(env or {})}, timeout=120)


def validator_state(folder: Path) -> Path:
    """A validator state folder that scored uid 0 in window 3 (and knows nothing of uid 99)."""
    folder.mkdir(parents=True)
    entry = WindowEntry(window=3, hotkey="5Fake", present=True, timely=True, mu=25.0, sigma=8.0)
    state = ScoringState(last_window=3, uids={0: UidState(hotkey="5Fake", mu=25.0, sigma=8.0, history=[entry])})
    save_state(state, folder / SCORES_FILE)
    return folder


def test_every_bad_input_is_one_line_on_stderr_naming_what_is_wrong(chain_factory, tmp_path):
    chain = chain_factory(BootstrapConfig(miners=1, validators=1, subnet=FAST_SUBNET))
    wallet = ["--wallet.path", chain.manifest.wallet_path, "--wallet.name", "miner-0", "--netuid",
              str(chain.manifest.netuid)]
    local = ["--network", "local", "--netuid", "1"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    state = validator_state(tmp_path / "validator")
    cases: list[tuple[list[str], dict[str, str], tuple[str, ...]]] = [
        # (argv, environment, what the one line must name)
        (["miner", "--network", "bogus", "--netuid", "1"], {}, ("--network", "'bogus'", "finney")),
        (["validator", "--netuid", "-1"], {}, ("--netuid", "greater than or equal to 0")),
        (["miner", *local, "--preset", "huge"], {}, ("--preset", "'huge'", "tiny, 150m, 1b, 8b, 72b")),
        (["miner", "--netuid", "1"], {}, ("--preset", "required on network finney")),
        (["validator", "--network", "test", "--netuid", "1", "--preset", "tiny"], {}, ("--data", "required")),
        (["miner", *local, "--log-level", "chatty"], {}, ("--log-level", "'chatty'", "DEBUG")),
        (["miner", *local, "--bucket.endpoint", "foo"], KEYS, ("--bucket.endpoint", "'foo'", "not a URL")),
        (["miner", *local, "--bucket.endpoint", "http://127.0.0.1:9000"], KEYS,
         ("--bucket.endpoint", "'http://127.0.0.1:9000'", "--bucket.allow-private")),
        (["miner", *local, "--bucket.name", "Bad_Name"], KEYS, ("--bucket.name", "'Bad_Name'", "3-63 chars")),
        (["miner", *local], {**KEYS, "CRUCIBLE_BUCKET_WRITE_KEY": "short"},
         ("--bucket.write-key", "$CRUCIBLE_BUCKET_WRITE_KEY", "16 characters")),
        (["miner", *local], {k: v for k, v in KEYS.items() if "WRITE_SECRET" not in k},
         ("--bucket.write-secret", "$CRUCIBLE_BUCKET_WRITE_SECRET")),
        (["data", "prepare", "--out", str(blocker / "sub")], {}, ("--out", str(blocker / "sub"), "cannot create")),
        (["data", "prepare", "--out", str(tmp_path / "d"), "--input", str(tmp_path / "none.txt")], {},
         ("input not found", "none.txt")),
        (["data", "prepare", "--out", str(tmp_path / "d"), "--preset", "huge"], {}, ("--preset", "'huge'", "72b")),
        (["data", "prepare", "--out", str(tmp_path / "d"), "--set", "inner.lr=-3"], {}, ("inner.lr", "-3")),
        (["data", "train", "--data", str(tmp_path / "no-data")], {}, ("--data", "no-data")),
        (["explain", "--uid", "99", "--state-dir", str(state)], {}, ("uid 99", "no record for window 3")),
        (["explain", "--uid", "0", "--state-dir", str(tmp_path / "nowhere")], {}, ("no validator state", "nowhere")),
        # chain errors: unreachable (the devnet client and the SDK's own transport), unknown subnet, no permit
        (["devnet", "miner", "--network", f"devnet://127.0.0.1:{closed_port()}", *wallet], KEYS,
         ("cannot connect to devnet://127.0.0.1",)),
        (["miner", "--network", f"ws://127.0.0.1:{closed_port()}", *wallet], KEYS, ("cannot connect to ws://127.0.0.1",)),
        (["devnet", "miner", "--network", chain.url, *wallet, "--netuid", "7"], KEYS, ("subnet 7 does not exist",)),
        (["devnet", "validator", "--network", chain.url, *wallet], KEYS, ("no validator permit",)),
    ]
    # two at a time: each is a fresh interpreter importing torch, and the suite runs on 2 cores
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda case: crucible(case[0], case[1]), cases))
    for (argv, _env, names), run in zip(cases, runs, strict=True):
        where = f"crucible {' '.join(argv)}: rc {run.returncode}, stderr:\n{run.stderr}"
        assert run.returncode != 0, where
        lines = run.stderr.splitlines()
        assert len(lines) == 1, where
        assert lines[0].startswith("crucible "), where  # the command, then what is wrong
        for name in names:
            assert name in lines[0], f"{name!r} missing: {where}"
        for noise in ("Traceback", "validation error", "Unclosed", "For further information"):
            assert noise not in run.stderr and noise not in run.stdout, where
