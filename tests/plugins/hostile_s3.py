"""The `hostile_s3` fixture: a lying S3 proxy (`devnet.hostile_s3.HostileS3`) over the session rclone server.

    def test_x(hostile_s3):
        hostile_s3.bucket(write=True).put("g/1", b"A" * 64)        # honest upload, through the proxy
        hostile_s3.behave("g/*", Behaviour(last_modified=timedelta(minutes=-10)), ops={"LIST"})
        hostile_s3.behave("g/*", Behaviour(bodies=(b"B" * 64,)), ops={"GET"})
        reader = hostile_s3.bucket()                                   # read key, short test timeouts
        assert reader.get("g/1", 1 << 20) == b"B" * 64

The proxy, its `Behaviour`s and what it records are documented in devnet/hostile_s3.py (it lives
there so that `crucible bench fetch` can use it too); this module re-exports them for tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devnet.hostile_s3 import OPS, QUICK_STORAGE, Behaviour, ClientInfo, HostileS3, Seen
from devnet.s3 import S3Server


@pytest.fixture
def hostile_s3(s3_server: S3Server, s3_bucket_name: str) -> Iterator[HostileS3]:
    """A started hostile proxy over the session rclone server, with a fresh bucket (`.bucket_name`)."""
    proxy = HostileS3.over(s3_server, bucket_name=s3_bucket_name)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


__all__ = ["OPS", "QUICK_STORAGE", "Behaviour", "ClientInfo", "HostileS3", "Seen", "hostile_s3"]
