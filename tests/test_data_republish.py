"""Re-publishing a dataset repairs what is wrong in the bucket: `publish_dataset` kept every object already in the bucket with the
right size, so a same-size object with other bytes (a replaced tokenizer, a flipped byte in a shard) was
never repaired: publish printed the pin as if all were well and every node then refused the dataset. An
object whose single-part ETag (MD5) is not the local file's is now uploaded again."""

from protocol.data import PAGE_TABLE_SUFFIX, TOKENIZER_FILE
from transport.dataset import RemotePageStore, object_key, publish_dataset

from .plugins.s3 import TEST_STORAGE


def test_republishing_repairs_same_size_objects_with_other_bytes(s3_bucket, tiny_dataset, tiny_hp, tmp_path):
    pinned, manifest = publish_dataset(s3_bucket, tiny_dataset.path)
    tok_key = object_key(pinned, TOKENIZER_FILE)
    s3_bucket.put(tok_key, b"{}" + b" " * (manifest.tokenizer_bytes - 2))
    shard = manifest.shards[0]
    key = object_key(pinned, shard.file)
    data = bytearray(s3_bucket.get(key, 1 << 30))
    data[shard.offset] ^= 1
    s3_bucket.put(key, bytes(data))
    table_key = object_key(pinned, shard.file + PAGE_TABLE_SUFFIX)
    s3_bucket.put(table_key, b"\0" * 16 * shard.pages)

    again, _ = publish_dataset(s3_bucket, tiny_dataset.path)
    assert again == pinned
    store = RemotePageStore(s3_bucket.config, pinned, tmp_path / "cache", tiny_hp, storage=TEST_STORAGE)
    assert store.pages([0, 1]).shape == (2, tiny_hp.model.seq_len)  # tokenizer, table and page 0 repaired


def test_republishing_an_intact_dataset_uploads_nothing(s3_bucket, tiny_dataset, monkeypatch):
    publish_dataset(s3_bucket, tiny_dataset.path)
    sent = []
    monkeypatch.setattr(type(s3_bucket), "put", lambda self, key, *a, **k: sent.append(key))
    monkeypatch.setattr(type(s3_bucket), "put_file", lambda self, key, *a, **k: sent.append(key))
    publish_dataset(s3_bucket, tiny_dataset.path)
    assert [k for k in sent if not k.endswith("manifest.json")] == []
