"""transport.chain without a chain: credentials commitments, config and CLI flags, network resolution."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from devnet.substrate import devnet_chain
from neurons.flags import FlagError, Flags
from neurons.node_config import CHAIN_NAMES
from protocol.chain_commitment import (
    CommitmentParseError,
    ReadCredentials,
    commitment_fields,
    encode_credentials,
    parse_credentials,
)
from protocol.storage_config import BucketConfig
from transport.chain import (
    ChainConfig,
    MetagraphSnapshot,
    sdk_client,
    u16_weights,
)

R2 = ReadCredentials(
    endpoint="https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com", region="auto",
    bucket="0123456789abcdef0123456789abcdef", access_key_id="a" * 32, secret_access_key="b" * 64,
)


def test_credentials_roundtrip_and_fit_three_raw_fields():
    text = encode_credentials(R2)
    assert text.startswith("c1|https://")
    assert parse_credentials(text) == R2
    fields = commitment_fields(text, max_fields=3)
    assert 1 < len(fields) <= 3 and all(len(next(iter(f.values()))) <= 128 for f in fields)
    assert b"".join(next(iter(f.values())) for f in fields).decode() == text
    with pytest.raises(ValueError, match="at most 1"):
        commitment_fields(text, max_fields=1)


def test_bridges_to_the_storage_bucket_config():
    cfg = R2.bucket_config()
    assert cfg.endpoint_url == R2.endpoint and cfg.secret_access_key.get_secret_value() == "b" * 64
    assert ReadCredentials.from_bucket_config(cfg) == R2
    aws = BucketConfig(region="eu-west-1", bucket="my-bucket", access_key_id="K" * 20, secret_access_key="s" * 40)
    assert ReadCredentials.from_bucket_config(aws).endpoint == "https://s3.eu-west-1.amazonaws.com"


def test_secret_never_prints():
    assert "b" * 64 not in repr(R2) and "b" * 64 not in str(R2)
    assert R2.secret() == "b" * 64


@pytest.mark.parametrize(
    "text, reason",
    [
        (None, "no commitment"),
        ("", "no commitment"),
        ("hello|world", "version"),
        ("c2|http://a:1|auto|bucket|AAAAAAAAAAAAAAAA|BBBBBBBBBBBBBBBB", "version"),
        ("c1|http://a:1|auto|bucket|AAAAAAAA", "6 '|'-separated"),
        ("c1|ftp://a|auto|bucket|AAAAAAAAAAAAAAAA|BBBBBBBBBBBBBBBB", "endpoint"),
        ("c1|http://a:1/path|auto|bucket|AAAAAAAAAAAAAAAA|BBBBBBBBBBBBBBBB", "endpoint"),
        ("c1|http://u:p@a:1|auto|bucket|AAAAAAAAAAAAAAAA|BBBBBBBBBBBBBBBB", "endpoint"),
        ("c1|http://a:99999|auto|bucket|AAAAAAAAAAAAAAAA|BBBBBBBBBBBBBBBB", "endpoint"),
        ("c1|http://a:1|AUTO|bucket|AAAAAAAAAAAAAAAA|BBBBBBBBBBBBBBBB", "region"),
        ("c1|http://a:1|auto|Bucket_Name|AAAAAAAAAAAAAAAA|BBBBBBBBBBBBBBBB", "bucket"),
        ("c1|http://a:1|auto|bucket|short|BBBBBBBBBBBBBBBB", "access_key_id"),
        ("c1|http://a:1|auto|bucket|AAAAAAAAAAAAAAAA|has space ok", "secret"),
        ("0x" + "ff" * 20, "version"),
    ],
)
def test_garbage_commitments_give_reasons(text, reason):
    with pytest.raises(CommitmentParseError, match=reason):
        parse_credentials(text)


def test_oversized_commitment_refused_before_parsing():
    with pytest.raises(CommitmentParseError, match="bytes"):
        parse_credentials("c1|" + "x" * 500, max_bytes=384)


@settings(max_examples=300, deadline=None)
@given(hs.text(max_size=400) | hs.builds(lambda parts: "|".join(["c1", *parts]), hs.lists(hs.text(max_size=40), max_size=7)))
def test_parser_only_ever_raises_its_own_error(text):
    try:
        creds = parse_credentials(text)
    except CommitmentParseError:
        return
    assert parse_credentials(encode_credentials(creds)) == creds


def test_cli_flags_follow_bittensor_conventions():
    chain_flags = Flags(ChainConfig, names=CHAIN_NAMES)
    parser = chain_flags.add_to(argparse.ArgumentParser())
    args = parser.parse_args(["--netuid", "3", "--subtensor.network", "devnet://127.0.0.1:9946",
                              "--wallet.name", "miner-0", "--wallet.hotkey", "hk", "--wallet.path", "/tmp/w"])
    cfg = chain_flags.parse(args)
    assert cfg == ChainConfig(network="devnet://127.0.0.1:9946", netuid=3, wallet_name="miner-0",
                              wallet_hotkey="hk", wallet_path="/tmp/w")
    default = chain_flags.parse(parser.parse_args(["--netuid", "1"]))
    assert default.network == "finney" and default.wallet_name == "default"
    with pytest.raises(FlagError, match="^--netuid: Field required"):
        chain_flags.parse(parser.parse_args([]))
    with pytest.raises(FlagError, match="^--network: unknown network"):
        chain_flags.parse(parser.parse_args(["--netuid", "1", "--network", "mainnet"]))


def test_clients_resolve_networks_without_connecting():
    from devnet.substrate import DevnetSubstrate, devnet_client

    devnet = devnet_client("devnet://127.0.0.1:9946")
    assert isinstance(devnet._substrate, DevnetSubstrate) and devnet._substrate.endpoint == "http://127.0.0.1:9946/rpc"
    assert sdk_client("test").endpoint.startswith("wss://")
    assert sdk_client("ws://127.0.0.1:9944").endpoint == "ws://127.0.0.1:9944"
    with pytest.raises(ValueError):
        devnet_client("devnet://nohost")
    with pytest.raises(ValueError, match="crucible devnet"):  # production code never dials a devnet by itself
        sdk_client("devnet://127.0.0.1:9946")


def test_u16_weights_max_upscale_and_drop_zeros():
    assert u16_weights([0, 1, 2], [0.5, 0.25, 0.0]) == ([0, 1], [65535, 32768])


def test_metagraph_snapshot_helpers():
    g = MetagraphSnapshot(netuid=1, block=9, tempo=5, hotkeys=("a", "b"), coldkeys=("x", "y"), stake=(10.0, 0.0),
                          incentive=(0.0, 1.0), dividends=(1.0, 0.0), consensus=(0.0, 1.0),
                          validator_permit=(True, False), last_update=(3, 0), registered_at=(0, 0))
    assert g.n == 2 and g.uids == (0, 1) and g.uid_of("b") == 1 and g.uid_of("zz") is None
    assert g.validators() == [0]


async def test_unreachable_devnet_is_a_clear_error():
    import socket

    from transport.chain import ChainAccessError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chain = devnet_chain(ChainConfig(network=f"devnet://127.0.0.1:{port}", netuid=1))
    with pytest.raises(ChainAccessError, match="unreachable"):
        await chain.connect()
