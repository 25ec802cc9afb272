"""Chain access for miners and validators, on the real bittensor v11 SDK (`bt.Client`, async).

Everything Crucible needs from subtensor goes through `Chain`: the current block and a block stream,
block timestamps, a typed metagraph snapshot, bucket read-credentials in the Commitments pallet,
and set_weights with its result checked. `Chain` takes a ready `bt.Client`: `sdk_client(name)` for `finney`, `test`, `local` or a
`ws://`/`wss://` URL; the devnet plugs its `Substrate` backend into the same `bt.Client`
(`devnet.substrate.devnet_client`), so nothing else differs between the two.
Wallets follow the bittensor convention (`--wallet.name/--wallet.hotkey/--wallet.path`).

    async with Chain(ChainConfig(network="test", netuid=1, wallet_name="miner-0")) as chain:
        graph = await chain.metagraph()
        await chain.set_weights([1, 2], [0.3, 0.7])
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from math import isfinite
from pathlib import Path
from typing import Any

import bittensor as bt
from bittensor.intents import normalize
from bittensor.result import BittensorError, ExtrinsicResult

from protocol.chain_commitment import (
    RAW_FIELD_MAX,
    CommitmentParseError,
    ReadCredentials,
    commitment_fields,
    encode_credentials,
    parse_credentials,
)
from protocol.endpoint_policy import STRICT, EndpointAllowance
from protocol.storage_config import BucketConfig, BucketCredentials
from transport.chain_config import DEVNET_SCHEME, NETWORK_NAMES, ChainConfig  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


class ChainAccessError(RuntimeError):
    """A chain read or write could not complete; `name` is the chain's error name when there is one."""

    def __init__(self, message: str, name: str | None = None, code: str | None = None):
        super().__init__(message)
        self.reason = message
        self.name = name
        self.code = code


class ChainCallFailed(ChainAccessError):
    """An extrinsic was refused (preflight, pool or dispatch); carries the SDK's reason and error name."""


def sdk_client(network: str) -> bt.Client:
    """A `bt.Client` for a network name or ws(s):// URL (not connected yet).

    A `devnet://` network has no public endpoint: the devnet's own entry points
    (`crucible devnet miner|validator`) build its client and hand it to `Chain`.
    """
    if network.startswith(DEVNET_SCHEME):
        raise ValueError(f"{network} is a devnet chain: run the node with `crucible devnet miner|validator`")
    return bt.Client(network)


@dataclass(frozen=True)
class MetagraphSnapshot:
    """One subnet at one block: per-uid columns, all the same length, indexed by uid."""

    netuid: int
    block: int
    tempo: int
    hotkeys: tuple[str, ...]
    coldkeys: tuple[str, ...]
    stake: tuple[float, ...]  # alpha staked on the hotkey
    incentive: tuple[float, ...]  # 0..1
    dividends: tuple[float, ...]  # 0..1
    consensus: tuple[float, ...]  # 0..1
    validator_permit: tuple[bool, ...]
    last_update: tuple[int, ...]
    registered_at: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.hotkeys)

    @property
    def uids(self) -> tuple[int, ...]:
        return tuple(range(self.n))

    def uid_of(self, hotkey: str) -> int | None:
        try:
            return self.hotkeys.index(hotkey)
        except ValueError:
            return None

    def validators(self) -> list[int]:
        return [uid for uid in self.uids if self.validator_permit[uid]]

    @classmethod
    def from_sdk(cls, graph: bt.Metagraph) -> MetagraphSnapshot:
        ns = graph.neurons
        return cls(
            netuid=graph.netuid, block=graph.block, tempo=graph.tempo,
            hotkeys=tuple(n.hotkey for n in ns), coldkeys=tuple(n.coldkey for n in ns),
            stake=tuple(float(n.total_stake.alpha) for n in ns), incentive=tuple(n.incentive for n in ns),
            dividends=tuple(n.dividends for n in ns), consensus=tuple(n.consensus for n in ns),
            validator_permit=tuple(n.validator_permit for n in ns), last_update=tuple(n.last_update for n in ns),
            registered_at=tuple(n.block_at_registration for n in ns),
        )


@dataclass(frozen=True)
class CommittedCredentials:
    uid: int
    hotkey: str
    block: int  # block the commitment was made at
    credentials: ReadCredentials


@dataclass(frozen=True)
class CredentialsRead:
    """Every registered uid's bucket credentials at `block`; bad or missing ones as per-uid reasons."""

    block: int
    credentials: dict[int, CommittedCredentials]
    errors: dict[int, str]


@dataclass(frozen=True)
class WeightRules:
    """A subnet's weight rules at one block (the subtensor storage item each comes from in comments)."""

    n: int  # SubnetworkN: registered uids
    min_allowed_weights: int = 1  # MinAllowedWeights
    max_weights_limit: int = 65535  # MaxWeightsLimit: largest u16 share of a vector's sum
    version_key: int = 0  # WeightsVersionKey: the oldest key the subnet accepts


def u16_weights(uids: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[int]]:
    """What the chain stores for these weights: max-upscaled u16, zeros dropped (the SDK's `normalize`)."""
    return normalize(list(uids), list(weights))


def _failed(result: ExtrinsicResult, what: str) -> ChainCallFailed:
    error = result.error
    name = error.name if error is not None else None
    code = error.code.value if error is not None else None
    return ChainCallFailed(f"{what} failed: {result.message}" + (f" ({name})" if name else ""), name, code)


def _preflight_name(what: str, code: str, message: str) -> str | None:
    """The pallet error the chain would have raised for a refusal the SDK's SetWeights preflight caught
    (bittensor/intents/weights.py `_preflight`/`_conform` raise ChainErrors with a code but no name)."""
    if what != "set_weights":
        return None
    if code == "rate_limited":
        return "SettingWeightsTooFast"
    if "requires at least" in message:
        return "WeightVecLengthIsLow"
    if code == "not_registered":
        return "HotKeyNotRegisteredInSubNet"
    return None


class Chain:
    """One node's connection to the chain: reads, block waits and the few writes Crucible makes."""

    def __init__(self, config: ChainConfig, *, wallet: bt.Wallet | None = None, client: bt.Client | None = None,
                 endpoints: EndpointAllowance = STRICT):
        self.config = config
        self._wallet = wallet
        self.client = client or sdk_client(config.network)
        self.endpoints = endpoints  # the network's endpoint allowance (HParams.endpoints), for read_credentials

    @property
    def wallet(self) -> bt.Wallet:
        if self._wallet is None:
            path = str(Path(self.config.wallet_path).expanduser())
            self._wallet = bt.Wallet(name=self.config.wallet_name, hotkey=self.config.wallet_hotkey, path=path)
        return self._wallet

    @property
    def hotkey(self) -> str:
        return self.wallet.hotkey.ss58_address

    async def connect(self) -> Chain:
        try:
            await self.client.connect()
        except BaseException as exc:
            # bt.Client.connect opens the transport (an aiohttp session on the devnet) before its first
            # reads; a failure after that would leave the session to the garbage collector, which prints
            # "Unclosed client session" after the error. Close it here, whatever the caller does next.
            with contextlib.suppress(Exception):
                await self.client.close()
            if isinstance(exc, BittensorError):
                raise ChainAccessError(f"cannot connect to {self.config.network}: {exc}") from exc
            raise
        return self

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> Chain:
        return await self.connect()

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # --- blocks ------------------------------------------------------------------------------------------

    async def block(self) -> int:
        return await self.client.block()

    async def blocks(self) -> AsyncIterator[int]:
        """Block numbers from the current head on, as the chain produces them."""
        async for header in self.client.blocks():
            yield header.number

    async def wait_for_block(self, block: int, timeout: float | None = None) -> int:
        """Wait until the head reaches `block`; returns the head then (asyncio.TimeoutError after `timeout`)."""
        header = await self.client.wait_for_block(block, timeout=timeout)
        return header.number

    async def block_timestamp(self, block: int | None = None) -> datetime:
        """UTC time of a block (the head by default), from `Timestamp.Now`."""
        return await self.client.timestamp(block=block)

    async def block_time(self) -> float:
        return await self.client.block_time()

    async def block_hash(self, block: int | None = None) -> str:
        """Hash of a block (the head by default); ChainAccessError for a block not produced yet."""
        try:
            return await self.client._substrate.block_hash(block)  # the SDK exposes no public accessor
        except BittensorError as exc:
            raise ChainAccessError(f"no hash for block {block}: {exc}") from exc

    # --- metagraph and commitments -----------------------------------------------------------------------

    async def metagraph(self, block: int | None = None) -> MetagraphSnapshot:
        graph = await self.client.subnets.metagraph(self.config.netuid, block=block, commitments=False)
        if graph is None:
            raise ChainAccessError(f"subnet {self.config.netuid} does not exist on {self.config.network}")
        return MetagraphSnapshot.from_sdk(graph)

    async def uid(self) -> int | None:
        value = await self.client.query(("SubtensorModule", "Uids"), [self.config.netuid, self.hotkey])
        return None if value is None else int(value)

    async def _max_commitment_bytes(self) -> int:
        return int(await self.client.constant(("Commitments", "MaxFields"))) * RAW_FIELD_MAX

    async def commit_credentials(self, creds: ReadCredentials | BucketConfig | BucketCredentials) -> ExtrinsicResult:
        """Publish this hotkey's bucket READ credentials; ChainCallFailed if the chain refuses.

        A storage `BucketCredentials` (read + write pair) is reduced to its read pair here, so the
        write secret cannot reach the chain by mistake.
        """
        if isinstance(creds, BucketCredentials):
            creds = creds.read
        if isinstance(creds, BucketConfig):
            creds = ReadCredentials.from_bucket_config(creds)
        max_fields = int(await self.client.constant(("Commitments", "MaxFields")))
        fields = commitment_fields(encode_credentials(creds), max_fields)
        call = bt.calls.Commitments.set_commitment(netuid=self.config.netuid, info={"fields": fields})
        result = await self.client.submit_call(call, self.wallet, signer="hotkey")
        if not result.success:
            raise _failed(result, "set_commitment")
        return result

    async def read_credentials(self, block: int | None = None) -> CredentialsRead:
        """Every registered uid's committed credentials; other people's garbage lands in `errors`.

        Garbage includes an endpoint the endpoint policy refuses under `self.endpoints`
        (protocol/endpoint_policy.py): its reason names the category (loopback, private, ...).
        """
        view = await self.client.at(block)
        committed = await view.subnets.commitments(self.config.netuid)
        max_bytes = await self._max_commitment_bytes()
        good: dict[int, CommittedCredentials] = {}
        bad: dict[int, str] = {}
        for hotkey, c in committed.items():
            if c.uid is None:
                continue  # left behind by a hotkey that is no longer registered
            try:
                if not c.is_revealed:
                    raise CommitmentParseError(f"commitment is {c.status}, not plain text")
                creds = parse_credentials(c.value, max_bytes, self.endpoints)
                good[c.uid] = CommittedCredentials(c.uid, hotkey, c.block, creds)
            except CommitmentParseError as exc:
                bad[c.uid] = str(exc)
        return CredentialsRead(block=view.block, credentials=good, errors=bad)

    # --- writes ------------------------------------------------------------------------------------------

    async def validator_trust(self) -> list[float]:
        """Per uid, Yuma's validator trust (`SubtensorModule.ValidatorTrust`, u16 → 0..1); the SDK's
        metagraph does not carry it."""
        raw = await self.client.query(("SubtensorModule", "ValidatorTrust"), [self.config.netuid])
        return [int(v) / 65535 for v in (raw or [])]

    async def weight_rules(self) -> WeightRules:
        """The subnet's weight rules now: SubnetworkN, MinAllowedWeights, MaxWeightsLimit, WeightsVersionKey
        (subtensor storage items of those names, as the SDK's SetWeights preflight reads them)."""
        netuid = self.config.netuid

        async def item(name: str, default: int) -> int:
            value = await self.client.query(("SubtensorModule", name), [netuid])
            return default if value is None else int(value)

        return WeightRules(n=await item("SubnetworkN", 0), min_allowed_weights=await item("MinAllowedWeights", 0),
                           max_weights_limit=await item("MaxWeightsLimit", 65535),
                           version_key=await item("WeightsVersionKey", 0))

    async def set_weights(self, uids: Sequence[int], weights: Sequence[float], version_key: int = 0) -> ExtrinsicResult:
        """Set this validator's weights through the SDK's `SetWeights` (clip, u16, preflight); check the result.

        On a subnet with commit-reveal on, the SDK sends a timelocked commit instead (`result.data["reveal_round"]`):
        success means the commit is stored; the chain applies the weights itself once the drand pulse of that
        round is on chain (logged here as pending). A too-early commit is named CommittingWeightsTooFast, as the
        chain names it (the SDK's preflight says only "rate limited")."""
        if len(uids) != len(weights):
            raise ValueError(f"{len(uids)} uids but {len(weights)} weights")
        if any(not isfinite(w) or w < 0 for w in weights):
            raise ValueError("weights must be finite and non-negative")
        intent = bt.SetWeights(netuid=self.config.netuid, uids=[int(u) for u in uids],
                               weights=[float(w) for w in weights], version_key=version_key)
        try:
            result = await self._execute(intent, "set_weights")
        except ChainCallFailed as exc:
            if exc.name == "SettingWeightsTooFast" and exc.code == "rate_limited" and await self.commit_reveal():
                exc.name = "CommittingWeightsTooFast"
            raise
        reveal_round = (result.data or {}).get("reveal_round")
        if reveal_round is not None:
            log.info("set_weights: timelocked commit of %d weights stored (%s); pending reveal at drand round %s",
                     len(uids), result.extrinsic_id or "included", reveal_round)
        return result

    async def commit_reveal(self) -> bool:
        """Whether the subnet runs commit-reveal of weights (`SubtensorModule.CommitRevealWeightsEnabled`)."""
        return bool(await self.client.query(("SubtensorModule", "CommitRevealWeightsEnabled"), [self.config.netuid]))

    async def register(self) -> int:
        """Burned registration of this wallet's hotkey (signed by the coldkey); returns the uid.

        Sent as the raw `burned_register` call: the SDK's `BurnedRegister` intent insists on MEV-shielded
        submission, which a devnet (or a local chain without the shield) cannot decrypt.
        """
        call = bt.calls.SubtensorModule.burned_register(netuid=self.config.netuid, hotkey=self.hotkey)
        try:
            result = await self.client.submit_call(call, self.wallet, signer="coldkey")
        except BittensorError as exc:
            raise ChainCallFailed(f"burned_register failed: {exc}", getattr(exc, "name", None)) from exc
        if not result.success:
            raise _failed(result, "burned_register")
        uid = await self.uid()
        if uid is None:
            raise ChainCallFailed("burned_register succeeded but the hotkey holds no uid")
        return uid

    async def add_stake(self, amount_tao: float, hotkey: str | None = None) -> ExtrinsicResult:
        """Stake TAO from this wallet's coldkey onto `hotkey` (default: this wallet's hotkey)."""
        intent = bt.AddStake(hotkey_ss58=hotkey or self.hotkey, netuid=self.config.netuid, amount_tao=amount_tao)
        return await self._execute(intent, "add_stake")

    async def _execute(self, intent: Any, what: str) -> ExtrinsicResult:
        try:
            result = await self.client.execute(intent, self.wallet)
        except bt.ChainError as exc:  # preflight caught it, with the code the chain would have used
            name = exc.name or _preflight_name(what, exc.code.value, exc.message)
            raise ChainCallFailed(f"{what} refused: {exc.message}", name, exc.code.value) from exc
        except BittensorError as exc:
            raise ChainCallFailed(f"{what} refused: {exc}") from exc
        if not result.success:
            raise _failed(result, what)
        return result


async def wait_for_block(chain: Chain, block: int, timeout: float | None = None) -> int:
    """Module-level shorthand for `chain.wait_for_block`."""
    return await chain.wait_for_block(block, timeout=timeout)


__all__ = [
    "ReadCredentials", "Chain", "ChainAccessError", "ChainCallFailed", "ChainConfig", "CommittedCredentials",
    "CredentialsRead", "MetagraphSnapshot", "WeightRules", "sdk_client",
    "u16_weights", "wait_for_block",
]
