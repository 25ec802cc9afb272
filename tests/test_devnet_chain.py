"""The real SDK (`bt.Client` + `transport.chain.Chain`) driving a real devnet chain process over DevnetSubstrate."""

from __future__ import annotations

import argparse
import asyncio
import json

import bittensor as bt
import pytest
from pydantic import SecretStr

from devnet import bootstrap
from devnet.chain_server import ChainServerConfig, serve
from devnet.chain_store import load_state
from devnet.chain_wire import RAO_PER_TAO
from devnet.substrate import devnet_client
from protocol.chain_commitment import ReadCredentials
from protocol.storage_config import BucketCredentials
from tests.plugins.chain import ChainProcess
from transport.chain import Chain, ChainCallFailed, ChainConfig


def creds(i: int) -> ReadCredentials:
    return ReadCredentials(endpoint=f"http://127.0.0.1:{9000 + i}", region="auto", bucket=f"miner-{i}",
                             access_key_id=f"READKEY{i:02d}ABCDEFGH", secret_access_key=f"secret-{i}-" + "x" * 30)


async def poll(fn, ok, timeout: float = 15.0, every: float = 0.1):
    """Re-run `fn` until `ok(value)`; the last value otherwise (the assertion after it fails)."""
    deadline = asyncio.get_running_loop().time() + timeout
    value = await fn()
    while not ok(value) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(every)
        value = await fn()
    return value


async def test_register_commit_weights_incentive(devnet_chain: ChainProcess):
    names = ["miner-0", "miner-1", "miner-2", "validator-0"]
    chains = {n: await devnet_chain.chain(n).connect() for n in names}
    try:
        uids = {n: await chains[n].register() for n in names}
        assert sorted(uids.values()) == [0, 1, 2, 3]
        v = chains["validator-0"]
        graph = await v.metagraph()
        assert graph.n == 4 and all(graph.hotkeys[uids[n]] == chains[n].hotkey for n in names)
        assert not any(graph.validator_permit)

        await v.add_stake(1000.0)
        with pytest.raises(ChainCallFailed) as dup:
            await chains["miner-0"].register()
        assert dup.value.name == "HotKeyAlreadyRegisteredInSubNet"

        # Commitments: two good ones, one garbage one written with the SDK's raw call.
        await chains["miner-0"].commit_credentials(creds(0))
        write = creds(1).bucket_config().model_copy(update={"access_key_id": "WRITEKEY" * 2,
                                                           "secret_access_key": SecretStr("w" * 40)})
        await chains["miner-1"].commit_credentials(BucketCredentials(read=creds(1).bucket_config(), write=write))
        raw = await v.client.read("commitment", netuid=1, hotkey_ss58=chains["miner-1"].hotkey)
        assert "WRITEKEY" not in raw.data and "w" * 40 not in raw.data  # only the read pair went on chain
        junk = bt.calls.Commitments.set_commitment(netuid=1, info={"fields": [{"Raw12": b"hello|world!"}]})
        assert (await chains["miner-2"].client.submit_call(junk, chains["miner-2"].wallet, signer="hotkey")).success
        read = await v.read_credentials()
        assert set(read.credentials) == {uids["miner-0"], uids["miner-1"]}
        assert read.credentials[uids["miner-1"]].credentials == creds(1)
        assert read.credentials[uids["miner-1"]].hotkey == chains["miner-1"].hotkey
        assert set(read.errors) == {uids["miner-2"]} and "version" in read.errors[uids["miner-2"]]

        # The permit arrives with the next epoch; a miner without one is refused by the chain itself.
        graph = await poll(v.metagraph, lambda g: g.validator_permit[uids["validator-0"]])
        assert graph.validators() == [uids["validator-0"]]
        assert graph.stake[uids["validator-0"]] >= 1000.0
        with pytest.raises(ChainCallFailed) as no_permit:
            await chains["miner-0"].set_weights([uids["miner-1"]], [1.0])
        assert no_permit.value.name == "NeuronNoValidatorPermit"

        miners = [uids[f"miner-{i}"] for i in range(3)]
        result = await v.set_weights(miners, [0.6, 0.3, 0.1])
        assert result.success and result.extrinsic_id
        with pytest.raises(ChainCallFailed) as fast:  # the SDK's preflight catches it before signing
            await v.set_weights(miners, [0.6, 0.3, 0.1])
        assert fast.value.code == "rate_limited"
        raw = bt.calls.SubtensorModule.set_mechanism_weights(netuid=1, mecid=0, dests=miners,
                                                             weights=[65535, 1, 1], version_key=0)
        refused = await v.client.submit_call(raw, v.wallet, signer="hotkey")
        assert not refused.success and refused.error.name == "SettingWeightsTooFast"

        set_at = (await v.metagraph()).last_update[uids["validator-0"]]
        graph = await poll(v.metagraph, lambda g: g.incentive[miners[2]] > 0)
        assert graph.block > set_at
        inc = [graph.incentive[u] for u in miners]
        assert inc[0] > inc[1] > inc[2] > 0 and abs(sum(inc) - 1.0) < 1e-3
        assert inc[0] == pytest.approx(0.6, abs=0.01)
        assert graph.dividends[uids["validator-0"]] == pytest.approx(1.0, abs=1e-3)
    finally:
        for chain in chains.values():
            await chain.close()


async def test_blocks_stream_and_timestamps(devnet_chain: ChainProcess):
    async with devnet_chain.chain("miner-0") as chain:
        assert await chain.block_time() == pytest.approx(0.2)
        head = await chain.block()
        assert await chain.wait_for_block(head + 3, timeout=10) >= head + 3
        seen = []
        async for number in chain.blocks():
            seen.append(number)
            if len(seen) == 4:
                break
        assert seen == sorted(seen) and seen[-1] - seen[0] == 3
        t0, t1 = await chain.block_timestamp(seen[0]), await chain.block_timestamp(seen[-1])
        assert 0 < (t1 - t0).total_seconds() < 30


async def test_bad_signature_and_nonce_rejected(devnet_chain: ChainProcess):
    async with devnet_chain.chain("miner-0") as chain:
        substrate = chain.client._substrate
        call = await substrate.compose(bt.calls.Commitments.set_commitment(netuid=1, info={"fields": [{"Raw2": b"hi"}]}))
        hotkey = chain.wallet.hotkey
        impostor = bt.Wallet("miner-1", "default", devnet_chain.manifest.wallet_path).hotkey

        class Forged:  # claims the miner's address, signs with another key
            ss58_address, public_key, crypto_type = hotkey.ss58_address, hotkey.public_key, 1

            def sign(self, payload: bytes) -> bytes:
                return impostor.sign(payload)

        forged = await substrate.submit(call, Forged())
        assert not forged.success and forged.error.name == "BadProof"
        nonce = await substrate.account_next_index(hotkey.ss58_address)
        future = await substrate.submit(call, hotkey, nonce=nonce + 5)
        assert not future.success and future.error.name == "Future"
        unknown = await chain.client.submit_call(bt.calls.SubtensorModule.register_network(hotkey=hotkey.ss58_address),
                                                 chain.wallet)
        assert not unknown.success and unknown.error.name == "Call"
        with pytest.raises(bt.ChainError, match="MEV Shield"):  # the SDK insists on shielding this intent
            await chain.client.execute(bt.BurnedRegister(netuid=1), chain.wallet)


async def test_state_survives_restart(chain_factory):
    chain_proc = chain_factory()
    names = ["miner-0", "miner-1", "validator-0"]
    async with chain_proc.chain("validator-0") as v, chain_proc.chain("miner-0") as m:
        await m.commit_credentials(creds(0))
        graph = await poll(v.metagraph, lambda g: g.block - g.last_update[0] >= 5)
        await v.set_weights([1, 2], [0.5, 0.5])
        before = await v.metagraph()
        weights = await v.client.query(("SubtensorModule", "Weights"), [1, 0])
    assert weights == [[1, 65535], [2, 65535]]
    chain_proc.restart()
    assert chain_proc.started_block == chain_proc.stopped_block >= before.block  # continues from the same block
    async with chain_proc.chain("validator-0") as v:
        after = await v.metagraph()
        assert after.block >= before.block
        assert after.hotkeys == before.hotkeys and len(after.hotkeys) == len(names)
        assert after.last_update[0] == before.last_update[0]
        assert await v.client.query(("SubtensorModule", "Weights"), [1, 0]) == weights
        read = await v.read_credentials()
        assert read.credentials[1].credentials == creds(0) and read.credentials[1].hotkey == after.hotkeys[1]
        balance = await v.client.balances.get(v.wallet.coldkeypub.ss58_address)
        assert balance.rao == 1000 * RAO_PER_TAO  # funded 1000 + 10000 TAO, staked 10000 at genesis
        assert graph.validator_permit[0]


async def test_stop_is_graceful_while_a_client_long_polls(chain_factory):
    chain_proc = chain_factory()
    async with chain_proc.chain("miner-0") as chain:
        head = await chain.block()

        async def follow() -> None:
            async for _ in chain.blocks():
                pass

        follower = asyncio.create_task(follow())
        await chain.wait_for_block(head + 2, timeout=10)
        assert await asyncio.to_thread(chain_proc.stop) == 0  # SIGTERM → saved, exited cleanly
        with pytest.raises(bt.RpcConnectionError):
            await asyncio.wait_for(follower, 30)
    assert load_state(chain_proc.state_dir).block == chain_proc.stopped_block >= head + 2


def test_init_cli_creates_wallets_usable_by_wallet_path(tmp_path):
    parser = bootstrap.add_cli(argparse.ArgumentParser())
    args = parser.parse_args(["--state", str(tmp_path), "--miners", "2", "--validators", "1", "--tempo", "7"])
    assert bootstrap.run_cli(args) == 0
    assert bootstrap.run_cli(args) == 2  # refuses to overwrite without --force
    manifest = bootstrap.load_manifest(tmp_path)
    state = load_state(tmp_path)
    sn = state.subnets[manifest.netuid]
    assert sn.params.tempo == 7 and sn.params.weights_rate_limit == 5 and len(sn.neurons) == 3  # tiny: 10-block windows
    assert [n.validator_permit for n in sn.neurons] == [True, False, False]
    chain = Chain(ChainConfig(network="devnet://127.0.0.1:1", netuid=1, wallet_name="miner-1",
                              wallet_path=manifest.wallet_path), client=devnet_client("devnet://127.0.0.1:1"))
    assert chain.hotkey == manifest.miners[1].hotkey_ss58 == sn.neurons[2].hotkey
    assert chain.wallet.coldkey.ss58_address == manifest.miners[1].coldkey_ss58  # unencrypted: no prompt


async def test_server_refuses_a_missing_state(tmp_path, capsys):
    assert await serve(ChainServerConfig(state_dir=tmp_path)) == 2
    assert "devnet init" in json.loads(capsys.readouterr().out)["error"]
