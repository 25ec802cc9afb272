"""Pytest fixtures for a real S3 server: `rclone serve s3` over a temporary folder (no mocks).

Loaded by tests/conftest.py through `pytest_plugins`. One server per test session; every test gets its own fresh bucket, so tests never see
each other's objects.

    def test_x(s3_bucket):            # a Bucket with the write key, retries tuned for tests
        s3_bucket.put("peers/1.json", b"{}")
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from devnet.s3 import S3Server
from transport.bucket import Bucket, BucketCredentials, StorageConfig

# Short timeouts and backoff: a test talking to a dead server should fail in seconds, not minutes.
TEST_STORAGE = StorageConfig(
    connect_timeout_s=2.0, read_timeout_s=20.0, max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.2
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket_name(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session server."""
    if not s3_server.running:  # a test may have stopped it; later tests still get a server
        s3_server.start()
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.ensure_bucket(name)
    return name


@pytest.fixture
def s3_credentials(s3_server: S3Server, s3_bucket_name: str) -> BucketCredentials:
    return s3_server.credentials(s3_bucket_name)


@pytest.fixture
def s3_bucket(s3_server: S3Server, s3_bucket_name: str) -> Bucket:
    return Bucket(s3_server.bucket_config(s3_bucket_name), TEST_STORAGE)
