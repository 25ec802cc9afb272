"""`NodeConfig`: every setting of `crucible miner` / `crucible validator`, typed, with its flags.

The fields are the single source of each default and check; `NODE_FLAGS` (see `neurons.flags`)
turns them into the command line: the bittensor chain flags (`--netuid`, `--network` alias
`--subtensor.network`, `--wallet.name/.hotkey/.path`, reusing `transport.chain.ChainConfig`), the
hparams choice (`--preset` alias `--hparams`, repeatable `--set`), the dataset, state folder,
device, window count, log level, the Prometheus endpoint (`--metrics.port/.addr`) and the node's
own bucket (`--bucket.*`, each with a CRUCIBLE_BUCKET_* environment fallback, so the keys need never
be on argv, where `ps` shows them). This module imports neither torch nor the node, so building a
parser stays cheap; `neurons.node_cli.open_node` does the I/O.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from neurons.flags import Flags, config_error
from protocol.hparams import HParams, load_hparams
from protocol.storage_config import BucketConfig, BucketCredentials
from transport.chain import ChainConfig

ENV_PREFIX = "CRUCIBLE_BUCKET_"
# bittensor's spellings of ChainConfig's fields; the first one is what error messages name.
CHAIN_NAMES: dict[str, tuple[str, ...]] = {
    "network": ("--network", "--subtensor.network"),
    "netuid": ("--netuid",),
    "wallet_name": ("--wallet.name",),
    "wallet_hotkey": ("--wallet.hotkey",),
    "wallet_path": ("--wallet.path",),
}
HPARAMS_NAMES: dict[str, tuple[str, ...]] = {"preset": ("--preset", "--hparams"), "overrides": ("--set",)}
HPARAMS_METAVARS = {"overrides": "SECTION.FIELD=VALUE"}


class HParamsChoice(BaseModel):
    """Which hyperparameters: a preset (or file) and field overrides; every command that builds a model."""

    model_config = ConfigDict(extra="forbid")
    preset: str = Field("tiny", min_length=1, description="hparams preset name or a .toml/.json file")
    overrides: list[str] = Field(default_factory=list, description="override one hyperparameter (repeatable)")

    def hparams(self) -> HParams:
        """The chosen hyperparameters; HParamsError with one line when the preset or an override is bad."""
        return load_hparams(self.preset, self.overrides)


class BucketSettings(BaseModel):
    """the node's own bucket (flags or CRUCIBLE_BUCKET_* environment variables)"""

    model_config = ConfigDict(extra="forbid")
    endpoint: str | None = Field(None, description="S3 endpoint URL (R2: https://ACCOUNT.r2.cloudflarestorage.com)")
    region: str = Field("auto", description="signing region ('auto' on R2)")
    name: str | None = Field(None, description="bucket name")
    read_key: str | None = Field(None, description="read-only access key id (published on chain)")
    read_secret: SecretStr | None = Field(None, description="read-only secret (published on chain)")
    write_key: str | None = Field(None, description="write access key id (stays on this machine)")
    write_secret: SecretStr | None = Field(None, description="write secret (stays on this machine)")


class MetricsConfig(BaseModel):
    """Prometheus metrics endpoint"""

    model_config = ConfigDict(extra="forbid")
    port: int | None = Field(None, ge=1, le=65535, description="serve Prometheus metrics on ADDR:PORT (default: off)")
    addr: str = Field("127.0.0.1", description="address the metrics endpoint binds (0.0.0.0 inside a container)")


class NodeConfig(HParamsChoice):
    chain: ChainConfig
    data: Path = Field(Path("data/tiny"), description="prepared dataset folder")
    state_dir: Path | None = Field(None, description="local state folder (default ~/.crucible/HOTKEY)")
    device: str = Field("auto", min_length=1, description="torch device: cpu, cuda, cuda:N, or auto (cuda when available)")
    windows: int | None = Field(None, ge=1, description="stop after this many windows (default: run forever)")
    log_level: str = Field("INFO", description="logging level")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    bucket: BucketSettings = Field(default_factory=BucketSettings)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown logging level {v!r}")
        return v.upper()

    def torch_device(self) -> str:
        """`device` with `auto` resolved (imports torch, so only when the node is being built)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def state_folder(self, hotkey: str) -> Path:
        return self.state_dir or Path.home() / ".crucible" / hotkey


HPARAMS_FLAGS = Flags(HParamsChoice, names=HPARAMS_NAMES, metavars=HPARAMS_METAVARS)
NODE_FLAGS = Flags(
    NodeConfig,
    names={**{f"chain.{k}": v for k, v in CHAIN_NAMES.items()}, **HPARAMS_NAMES},
    env={f"bucket.{name}": ENV_PREFIX + name.upper() for name in BucketSettings.model_fields},
    metavars=HPARAMS_METAVARS,
)
REQUIRED_BUCKET_FIELDS = ("name", "read_key", "read_secret", "write_key", "write_secret")


def bucket_credentials(bucket: BucketSettings) -> BucketCredentials:
    """Read and write key pairs of the node's bucket; ValueError with one line naming the flag otherwise."""
    missing = [name for name in REQUIRED_BUCKET_FIELDS if not getattr(bucket, name)]
    if missing:
        path = f"bucket.{missing[0]}"
        raise ValueError(f"bucket not configured: set {NODE_FLAGS.spellings(path)[0]} (or ${NODE_FLAGS.env[path]})")
    common = dict(endpoint_url=bucket.endpoint, region=bucket.region, bucket=bucket.name)
    try:
        return BucketCredentials(
            read=BucketConfig(**common, access_key_id=bucket.read_key, secret_access_key=bucket.read_secret),
            write=BucketConfig(**common, access_key_id=bucket.write_key, secret_access_key=bucket.write_secret),
        )
    except ValidationError as exc:
        raise ValueError(f"bad bucket settings: {config_error(exc)}") from None
