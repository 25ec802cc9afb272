"""Storage without a server: key layout, configs, the retry loop and capped reads (tests/test_storage_server.py has the rest)."""

from __future__ import annotations

import io
import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol.storage_config import MiB
from protocol.storage_keys import (
    InvalidKey,
    KeyKind,
    aggregate_key,
    checkpoint_key,
    dataset_key,
    gradient_key,
    parse_key,
    peers_key,
    window_of_key,
)
from transport.bucket import (
    AccessDenied,
    Bucket,
    BucketConfig,
    BucketCredentials,
    BucketNotFound,
    ObjectNotFound,
    ObjectTooLarge,
    StorageUnavailable,
    read_capped,
)
from transport.bucket_errors import RetryPolicy, TransientError, call_with_retry

SECRET = "s3cr3t-value-that-must-never-leak"

# -- key layout -------------------------------------------------------------------------------------------


def test_key_layout_matches_design():
    assert gradient_key(12, "5GrwvaEF") == "gradients/12/5GrwvaEF.safetensors"
    assert peers_key(12) == "peers/12.json"
    assert aggregate_key(12) == "aggregates/12.json"
    assert checkpoint_key(10) == "checkpoints/10/model.safetensors"
    assert checkpoint_key(10, "config.json") == "checkpoints/10/config.json"
    assert dataset_key("pages/000001.bin") == "dataset/pages/000001.bin"


@given(window=st.integers(0, 10**12), hotkey=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True))
def test_windowed_keys_parse_back(window, hotkey):
    parsed = parse_key(gradient_key(window, hotkey))
    assert parsed is not None and (parsed.kind, parsed.window, parsed.hotkey) == (
        KeyKind.GRADIENT,
        window,
        hotkey,
    )
    for key in (peers_key(window), aggregate_key(window), checkpoint_key(window, "config.json")):
        assert window_of_key(key) == window


@pytest.mark.parametrize(
    "key",
    [
        "dataset/pages/1.bin",
        "gradients/x/a.safetensors",
        "gradients/01/a.safetensors",
        "gradients/1/a.bin",
        "peers/1.txt",
        "other/1.json",
        "checkpoints/1/../x",
        "",
    ],
)
def test_keys_without_window(key):
    assert window_of_key(key) is None


@pytest.mark.parametrize("bad", ["../x", "a/b", "a.b", "", "x" * 65])
def test_hotkey_cannot_escape_layout(bad):
    with pytest.raises(InvalidKey):
        gradient_key(1, bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: dataset_key("pages/../../gradients"),
        lambda: dataset_key("/abs"),
        lambda: peers_key(-1),
        lambda: checkpoint_key(1, "../x"),
    ],
)
def test_bad_key_parts_rejected(call):
    with pytest.raises(InvalidKey):
        call()


# -- configs ----------------------------------------------------------------------------------------------


def _config(**kw) -> BucketConfig:
    base = dict(
        endpoint_url="http://127.0.0.1:9000",
        bucket="alpha",
        access_key_id="AKIAEXAMPLEKEY0001",
        secret_access_key=SECRET,
    )
    return BucketConfig(**{**base, **kw})


def test_secret_never_printed():
    cfg = _config()
    creds = BucketCredentials(read=cfg, write=_config(access_key_id="AKIAEXAMPLEKEY0002"))
    for text in (str(cfg), repr(cfg), str(creds), json.dumps(creds.model_dump(mode="json"))):
        assert SECRET not in text
    with pytest.raises(ValidationError) as err:
        _config(secret_access_key="short-secret")
    assert "short-secret" not in str(err.value)


def test_r2_config():
    cfg = BucketConfig.for_r2("0123456789abcdef0123456789abcdef", "my-bucket", "a" * 32, "b" * 64)
    assert cfg.endpoint_url == "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com"
    assert cfg.region == "auto"
    client_cfg = Bucket(cfg).client.meta.config
    assert client_cfg.s3["addressing_style"] == "path" and client_cfg.signature_version == "s3v4"
    with pytest.raises(ValueError):
        BucketConfig.for_r2("not-an-account", "my-bucket", "a" * 32, "b" * 64)


def test_public_view_has_only_read_credentials():
    creds = BucketCredentials(
        read=_config(),
        write=_config(access_key_id="AKIAWRITEKEY000001", secret_access_key="write-secret-xxxxxxxx"),
    )
    public = creds.read_only()
    assert public.write is None and public.read == creds.read
    assert "write-secret" not in public.model_dump_json() and "AKIAWRITEKEY" not in public.model_dump_json()
    with pytest.raises(ValueError):
        BucketCredentials(read=_config(), write=_config(bucket="other"))


# -- retry loop and capped reads (pure) -------------------------------------------------------------------


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _flaky(errors: list[BaseException]):
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ok"

    return fn, calls


POLICY = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05)


@pytest.mark.parametrize(
    "exc",
    [
        _client_error("SlowDown", 503),
        _client_error("TooManyRequests", 429),
        _client_error("InternalError", 500),
        EndpointConnectionError(endpoint_url="http://x"),
        TransientError("short"),
    ],
)
def test_transient_errors_are_retried(exc):
    fn, calls = _flaky([exc, exc])
    waits: list[float] = []
    assert call_with_retry(fn, policy=POLICY, where="op", bucket="b", key="k", sleep=waits.append) == "ok"
    assert len(calls) == 3 and len(waits) == 2


@pytest.mark.parametrize(
    ("code", "status", "typed"),
    [
        ("NoSuchKey", 404, ObjectNotFound),
        ("NoSuchBucket", 404, BucketNotFound),
        ("AccessDenied", 403, AccessDenied),
        ("InvalidAccessKeyId", 403, AccessDenied),
    ],
)
def test_client_errors_are_final_and_typed(code, status, typed):
    fn, calls = _flaky([_client_error(code, status)])
    with pytest.raises(typed):
        call_with_retry(fn, policy=POLICY, where="op", bucket="b", key="k", sleep=lambda s: None)
    assert len(calls) == 1


def test_retries_exhausted_and_backoff_grows():
    fn, calls = _flaky([EndpointConnectionError(endpoint_url="http://x")] * 10)
    waits: list[float] = []
    with pytest.raises(StorageUnavailable) as err:
        call_with_retry(fn, policy=POLICY, where="op", bucket="b", key="k", sleep=waits.append)
    assert err.value.attempts == 4 and len(calls) == 4 and len(waits) == 3
    policy = RetryPolicy(max_attempts=10, base_delay_s=1.0, max_delay_s=8.0)
    for failures, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        assert all(ceiling / 2 <= policy.delay(failures) <= ceiling for _ in range(20))


class CountingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        out = super().read(n)
        self.bytes_read += len(out)
        return out


def test_read_capped_guards_the_stream():
    sink = bytearray()
    store = lambda off, chunk: sink.extend(chunk)  # noqa: E731
    declared_big = CountingStream(b"x" * 100)
    with pytest.raises(ObjectTooLarge):
        read_capped(declared_big, store, expected=100, limit=10, where="w")
    assert declared_big.bytes_read == 0 and declared_big.closed
    lying = CountingStream(b"x" * (5 * MiB))  # declares nothing (or lies): stopped after limit + 1 bytes
    with pytest.raises(ObjectTooLarge):
        read_capped(lying, store, expected=-1, limit=1000, where="w")
    assert lying.bytes_read <= 1001
    with pytest.raises(TransientError):
        read_capped(CountingStream(b"x" * 5), store, expected=8, limit=10, where="w")
