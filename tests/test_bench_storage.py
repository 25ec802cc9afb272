"""`crucible bench storage`: the measurement behind keeping our own multipart upload instead of s3transfer
(see bench/storage.py): with one failing part, ours re-sends that part, s3transfer the whole object."""

from __future__ import annotations

from bench.storage import fault_uploads
from protocol.storage_config import MiB
from transport.bucket_config import StorageConfig


def test_one_failed_part_costs_us_one_part_and_s3transfer_the_whole_object(s3_server):
    s3_server.ensure_bucket("bench-faults")
    storage = StorageConfig(part_size=5 * MiB, multipart_threshold=5 * MiB, max_concurrency=2, backoff_base_s=0.01,
                            backoff_max_s=0.02)
    ours, managed = fault_uploads(s3_server.bucket_config("bench-faults"), storage, 20 * MiB, part=4)
    assert ours["MiB_sent"] == 25.0  # 4 parts, the failed one twice
    assert managed["attempts"] == 2 and managed["MiB_sent"] >= 35.0  # the failed transfer started over
