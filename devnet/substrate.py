"""`DevnetSubstrate`: the bittensor SDK's `Substrate` seam, backed by the devnet chain process.

`bt.Client(substrate=DevnetSubstrate("devnet://127.0.0.1:PORT"))` runs the SDK's own code — the
metagraph builder, `SetWeights` with its preflight and u16 conforming, the executor, `submit_call`,
`wait_for_block`, commitments — against `devnet/chain_server.py` instead of a subtensor node. Reads
return the plain decoded values the SDK expects; writes are signed here by the SDK's keypair over
canonical JSON (`chain_wire.signing_payload`), verified by the server, and come back as the SDK's
`ExtrinsicResult`, with failures as `ChainError`s carrying the real pallet error names.

Not simulated (each raises `ChainError` saying so): SCALE decoding, multisig, MEV-shielded
submission (`mev_next_key` is None, so the SDK refuses shielded intents), historical state (reads
pinned to an older block see the head, except block hashes, headers and timestamps).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import aiohttp
import bittensor as bt
from bittensor._transport.contract import UnsignedExtrinsic
from bittensor._transport.errors import SubstrateRequestException
from bittensor.balance import Balance
from bittensor.result import (
    ChainError,
    ConnectionNotReady,
    ExtrinsicResult,
    RpcConnectionError,
    chain_error_from_dispatch,
    chain_error_from_substrate_request,
)
from bittensor.settings import DEFAULT_ERA_PERIOD

from devnet.chain_wire import DevnetCall, compose, extrinsic_hash, hex_bytes, signing_payload, to_json_value
from transport.chain import Chain, ChainConfig

DEVNET_SCHEME = "devnet://"


def parse_devnet_url(url: str) -> tuple[str, int]:
    """(host, port) of a `devnet://host:port` URL; ValueError for anything else."""
    if not url.startswith(DEVNET_SCHEME):
        raise ValueError(f"not a devnet URL: {url!r} (expected devnet://host:port)")
    parsed = urlparse("http://" + url[len(DEVNET_SCHEME):])
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"devnet URL needs a host and a port: {url!r}")
    return parsed.hostname, parsed.port


class DevnetSubstrate:
    """Implements `bittensor._substrate.Substrate` over HTTP to a devnet chain process."""

    def __init__(self, url: str, *, request_timeout_s: float = 150.0):
        host, port = parse_devnet_url(url)
        self.url = url
        self.endpoint = f"http://{host}:{port}/rpc"
        self.token_symbols: dict[int, str] = {}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._genesis: str | None = None
        self._block_time: float | None = None

    def balance(self, rao: int, netuid: int = 0) -> Balance:
        symbol = self.token_symbols.get(netuid) if netuid else None
        return Balance(int(rao), netuid, symbol)

    # --- lifecycle and transport -------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            info = await self._rpc("info")
        except BaseException:
            await self.close()
            raise
        self._genesis = info["genesis"]
        self._block_time = float(info["block_time"])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _rpc(self, method: str, /, **params: Any) -> Any:
        if self._session is None:
            raise ConnectionNotReady("DevnetSubstrate is not connected; use `async with Client(...)` first.")
        try:
            async with self._session.post(self.endpoint, json={"method": method, "params": params}) as resp:
                if resp.status != 200:
                    raise RpcConnectionError(f"devnet chain at {self.url} answered HTTP {resp.status}")
                body = await resp.json()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RpcConnectionError(f"devnet chain at {self.url} unreachable: {exc or type(exc).__name__}") from exc
        if "error" in body:
            raise ChainError(body["error"]["message"])
        return body["result"]

    # --- reads -------------------------------------------------------------------------------------------

    async def block_hash(self, block: int | None = None) -> str:
        result = await self._rpc("block_hash", block=block)
        if result is None:
            raise ChainError(f"block {block} is not on the devnet chain yet")
        return result

    async def block_number(self) -> int:
        return int((await self._rpc("header"))["number"])

    async def finalized_block_number(self) -> int:
        return await self.block_number()  # the devnet finalizes every block instantly

    async def block_time(self) -> float:
        if self._block_time is None:
            self._block_time = int(await self.constant("Aura", "SlotDuration")) / 1000.0
        return self._block_time

    async def spec_version(self) -> int:
        return int((await self._rpc("info"))["spec_version"])

    async def get_block(self, block_number: int | None = None, block_hash: str | None = None) -> dict | None:
        return await self._rpc("get_block", block=block_number, block_hash=block_hash)

    async def query(self, module: str, storage_function: str, params: list | None = None,
                    block_hash: str | None = None) -> Any:
        return await self._rpc("query", module=module, name=storage_function, params=_plain(params),
                               block_hash=block_hash)

    async def map_has_entries(self, module: str, storage_function: str, params: list,
                              block_hash: str | None = None) -> bool:
        return bool(await self.query_map(module, storage_function, params, block_hash))

    async def query_map(self, module: str, storage_function: str, params: list | None = None,
                        block_hash: str | None = None) -> list[tuple[Any, Any]]:
        rows = await self._rpc("query_map", module=module, name=storage_function, params=_plain(params),
                               block_hash=block_hash)
        return [(key, value) for key, value in rows]

    async def query_batch(self, module: str, storage_function: str, param_sets: list[list],
                          block_hash: str | None = None) -> list[Any]:
        if not param_sets:
            return []
        return await self._rpc("query_batch", module=module, name=storage_function,
                               param_sets=[_plain(p) for p in param_sets], block_hash=block_hash)

    async def runtime_call(self, api: str, method: str, params: Any, block_hash: str | None = None) -> Any:
        return await self._rpc("runtime_call", api=api, method=method, params=_plain(params), block_hash=block_hash)

    async def constant(self, module: str, name: str) -> Any:
        return await self._rpc("constant", module=module, name=name)

    async def decode_scale(self, type_string: str, data: Any) -> Any:
        raise ChainError("the devnet chain speaks JSON, not SCALE: decode_scale is not available")

    async def blocks(self, *, finalized: bool = False) -> AsyncIterator[dict]:
        """Headers from the current head on, one per block (long-polls the chain process)."""
        header = await self._rpc("header")
        yield {"header": header}
        last = int(header["number"])
        while True:
            header = await self._rpc("wait_block", after=last, timeout=30.0)
            head = int(header["number"])
            for number in range(last + 1, head + 1):
                yield {"header": header if number == head else await self._rpc("header", block=number)}
            last = max(last, head)

    async def events(self, block_hash: str | None = None) -> list[dict]:
        return await self._rpc("events", block_hash=block_hash)

    # --- calls and fees ----------------------------------------------------------------------------------

    async def compose(self, call: Any) -> DevnetCall:
        if isinstance(call, DevnetCall):
            return call
        module, function, params = call
        return compose(module, function, params)

    async def estimate_fee(self, call: Any, keypair: Any) -> Balance:
        return Balance.from_rao(0)  # the devnet charges no transaction fees

    async def estimate_weight(self, call: Any, keypair: Any) -> dict:
        return {"ref_time": 0, "proof_size": 0}

    async def account_next_index(self, address: str) -> int:
        return int(await self._rpc("account_next_index", address=address))

    # --- writes ------------------------------------------------------------------------------------------

    async def mev_next_key(self) -> bytes | None:
        return None  # no MEV shield on the devnet; the SDK refuses shielded submission cleanly

    async def _payload(self, call: Any, address: str, nonce: int | None, period: int | None, tip: int = 0) -> bytes:
        composed = await self.compose(call)
        if nonce is None:
            nonce = await self.account_next_index(address)
        era = None
        if period is not None:
            era = {"birth": await self.block_number(), "period": int(period)}
        assert self._genesis is not None
        return signing_payload(self._genesis, composed, address, nonce, era, tip)

    async def sign_extrinsic(self, call: Any, keypair: Any, *, nonce: int, period: int) -> tuple[bytes, str]:
        payload = await self._payload(call, keypair.ss58_address, nonce, period)
        signature = await _sign(keypair, payload)
        return payload + signature, extrinsic_hash(payload, signature)

    async def find_extrinsic(self, extrinsic_hash: str, block_hash: str) -> ExtrinsicResult | None:
        receipt = await self._rpc("find_extrinsic", hash=extrinsic_hash, block_hash=block_hash)
        return None if receipt is None else _result(receipt)

    async def prepare(self, call: Any, *, address: str, crypto_type: int = 1, nonce: int | None = None,
                      period: int | None = DEFAULT_ERA_PERIOD, tip: int = 0,
                      metadata_hash: bytes | None = None) -> UnsignedExtrinsic:
        from bittensor.sp_core import ss58_decode

        if nonce is None:
            nonce = await self.account_next_index(address)
        payload = await self._payload(call, address, nonce, period, tip)
        composed = await self.compose(call)
        assert self._genesis is not None
        return UnsignedExtrinsic(
            call_data=composed.data, address=address, public_key=bytes(ss58_decode(address)),
            crypto_type=crypto_type, era="00" if period is None else {"period": period},
            nonce=nonce, tip=tip, tip_asset_id=None, genesis_hash=self._genesis,
            era_block_hash=self._genesis, spec_version=await self.spec_version(), transaction_version=1,
            metadata_hash=None, payload=payload, payload_json={}, included_in_extrinsic=b"",
            included_in_signed_data=b"",
        )

    async def submit_signature(self, unsigned: UnsignedExtrinsic, signature: bytes | str, *,
                               wait_for_inclusion: bool = True, wait_for_finalization: bool = True) -> ExtrinsicResult:
        sig = hex_bytes(signature) if isinstance(signature, str) else bytes(signature)
        return await self._submit_raw(unsigned.payload, sig[-64:], unsigned.crypto_type,
                                      wait_for_inclusion or wait_for_finalization)

    async def submit(self, call: Any, keypair: Any, *, nonce: int | None = None,
                     period: int | None = DEFAULT_ERA_PERIOD, wait_for_inclusion: bool = True,
                     wait_for_finalization: bool = True) -> ExtrinsicResult:
        payload = await self._payload(call, keypair.ss58_address, nonce, period)
        signature = await _sign(keypair, payload)
        return await self._submit_raw(payload, signature, int(getattr(keypair, "crypto_type", 1)),
                                      wait_for_inclusion or wait_for_finalization)

    async def submit_signed(self, extrinsic: Any, keypair: Any, *, wait_for_inclusion: bool = True,
                            wait_for_finalization: bool = True) -> ExtrinsicResult:
        raw = bytes(extrinsic)
        return await self._submit_raw(raw[:-64], raw[-64:], int(getattr(keypair, "crypto_type", 1)),
                                      wait_for_inclusion or wait_for_finalization)

    async def _submit_raw(self, payload: bytes, signature: bytes, crypto_type: int, wait: bool) -> ExtrinsicResult:
        answer = await self._rpc("submit", payload="0x" + payload.hex(), signature="0x" + signature.hex(),
                                 crypto_type=crypto_type, wait=wait)
        if "rejected" in answer:  # a pool rejection, decoded exactly as RpcSubstrate decodes a node's
            error = chain_error_from_substrate_request(SubstrateRequestException(answer["rejected"]))
            return ExtrinsicResult(success=False, message=error.message, error=error)
        if "submitted" in answer:
            return ExtrinsicResult(success=True, message="Submitted (not waiting).")
        return _result(answer["included"])

    # --- multisig ----------------------------------------------------------------------------------------

    def multisig_account(self, signatories: list[str], threshold: int) -> Any:
        raise ChainError("multisig is not simulated by the devnet chain")

    async def submit_multisig(self, call: Any, keypair: Any, multisig_account: Any, *,
                              wait_for_inclusion: bool = True, wait_for_finalization: bool = True) -> ExtrinsicResult:
        raise ChainError("multisig is not simulated by the devnet chain")


def _plain(value: Any) -> Any:
    return to_json_value(value) if value is not None else None


async def _sign(keypair: Any, payload: bytes) -> bytes:
    signature = keypair.sign(payload)
    if inspect.isawaitable(signature):
        signature = await signature
    signature = bytes(signature)
    return signature[-64:]  # a 65-byte signature carries a MultiSignature version prefix


def _result(receipt: dict) -> ExtrinsicResult:
    extrinsic_id = f"{receipt['block']}-{receipt['index']:04d}"
    if receipt["success"]:
        return ExtrinsicResult(success=True, message="Success", block_hash=receipt["block_hash"],
                               extrinsic_id=extrinsic_id, fee=Balance.from_rao(0), events=list(receipt["events"]))
    error = chain_error_from_dispatch(receipt["error"])
    return ExtrinsicResult(success=False, message=error.message, block_hash=receipt["block_hash"],
                           extrinsic_id=extrinsic_id, events=list(receipt["events"]), error=error)


def devnet_client(url: str) -> bt.Client:
    """A `bt.Client` whose `Substrate` is the devnet chain at `devnet://host:port` (not connected yet)."""
    host, port = parse_devnet_url(url)
    # The label only keys the SDK's display caches; it never dials this URL.
    return bt.Client(f"ws://{host}:{port}/devnet", substrate=DevnetSubstrate(url))


def devnet_chain(config: ChainConfig, wallet: bt.Wallet | None = None) -> Chain:
    """A `Chain` on the devnet chain that `config.network` (devnet://host:port) names."""
    return Chain(config, wallet=wallet, client=devnet_client(config.network))


__all__ = ["DEVNET_SCHEME", "DevnetSubstrate", "devnet_chain", "devnet_client", "parse_devnet_url"]
