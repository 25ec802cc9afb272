"""I/O clients: S3-compatible buckets, the chain, and fetching other participants' objects.

Everything here talks to the outside world and may retry, time out or use threads; what the bytes
mean and which objects count is decided in `protocol/`, which this package imports (and nothing
else of the project). Local tuning (timeouts, retries, part sizes) lives here too, since it changes
nothing other participants see.

Modules:

- `bucket.py`: `Bucket`, `open_bucket`: put/get/list/delete with size caps, typed errors, cleanup.
- `bucket_transfer.py`: `upload_multipart`, `download_ranges`, `read_capped`: large objects in parts.
- `bucket_errors.py`: `StorageError` and its family, `call_with_retry`: the one retry loop.
- `bucket_stats.py`: `ObjectInfo`, `StorageStats`: object metadata and transfer counters.
- `bucket_config.py`: `StorageConfig`: this node's bucket transport knobs.
- `endpoint_guard.py`: `guard_client`: resolve a bucket's host, check every address against the endpoint
  policy, connect only to a checked one (SSRF, DNS rebinding).
- `dataset.py`: `publish_dataset`, `RemotePageStore`: the network's page store in a bucket (manifest
  pinned by hash, ranged GETs of the assigned pages, each verified, a bounded disk cache, prefetch).
- `chain.py`: `Chain`, `sdk_client`: blocks, timestamps, metagraph, commitments, weights through the
  bittensor SDK.
- `chain_config.py`: `ChainConfig`: network, netuid and wallet; imports no SDK (fast `--help`).
- `fetch.py`: `ShardSource`, `BucketPool`, `first_from_validators`: peers' shards (one GET each, by
  a deadline, pinned to a content hash, mirror first) and what validators publish.
- `watch.py`: `UploadWatcher`, `Sighting`: a validator's own look at every miner's signed shard
  header during the upload phase: what was on time, and who was first.
"""
