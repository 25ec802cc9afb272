"""`ChainConfig`: which chain, subnet and wallet a node uses; importable without the bittensor SDK.

Kept apart from `transport.chain` (which imports the SDK, about 2 s) so that building the command
line (`crucible miner --help`, a bad `--network`) stays fast. Wallets follow the bittensor
convention (`--wallet.name/--wallet.hotkey/--wallet.path`); the wallet path is expanded when used.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEVNET_SCHEME = "devnet://"
NETWORK_NAMES = ("finney", "test", "local", "archive")
PUBLIC_NETWORKS = ("finney", "test", "archive")  # real subnets: no demo defaults (tiny preset, data/tiny)
DEFAULT_WALLET_PATH = "~/.bittensor/wallets"  # the SDK's own default (bittensor.wallet.DEFAULT_WALLET_PATH)


class ChainConfig(BaseModel):
    """the chain, subnet and wallet (bittensor's flags)"""

    model_config = ConfigDict(extra="forbid", frozen=True)
    network: str = Field("finney", description="finney | test | local | archive | ws(s)://host:port | devnet://host:port.")
    netuid: int = Field(..., ge=0, le=65535, description="Subnet this node takes part in.")
    wallet_name: str = Field("default", description="Wallet (coldkey) name, as --wallet.name.")
    wallet_hotkey: str = Field("default", description="Hotkey name inside the wallet, as --wallet.hotkey.")
    wallet_path: str = Field(DEFAULT_WALLET_PATH, description="Folder holding wallets, as --wallet.path.")

    @field_validator("network")
    @classmethod
    def _network(cls, v: str) -> str:
        if v in NETWORK_NAMES or v.startswith(("ws://", "wss://", DEVNET_SCHEME)):
            return v
        raise ValueError(f"unknown network {v!r}: use {', '.join(NETWORK_NAMES)}, a ws(s):// URL or devnet://host:port")

    @property
    def is_public(self) -> bool:
        """finney, test, archive or any wss:// endpoint (a TLS chain endpoint is someone's real network, e.g.
        wss://entrypoint-finney.opentensor.ai:443): a real subnet, where demo defaults make no sense.

        Plain ws:// (a lite node or a private chain on your own machine or LAN) keeps the defaults: that
        is a choice of the operator's, not a proof that the chain is private (only its genesis hash is)."""
        return self.network in PUBLIC_NETWORKS or self.network.startswith("wss://")
