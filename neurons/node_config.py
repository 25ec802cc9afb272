"""`NodeConfig`: every setting of `crucible miner` / `crucible validator`, typed, with its flags.

The fields are the single source of each default and check; `NODE_FLAGS` (see `neurons.flags`)
turns them into the command line: the bittensor chain flags (`--netuid`, `--network` alias
`--subtensor.network` and `--subtensor.chain_endpoint`, `--wallet.name/.hotkey/.path`, reusing
`transport.chain_config.ChainConfig`), the hparams choice (`--preset` alias `--hparams`, repeatable
`--set`), the dataset, state folder, device, window count, log level (`--logging.debug`,
`--logging.trace` as in bittensor), the Prometheus endpoint (`--metrics.port/.addr`) and the node's
own bucket (`--bucket.*`, each with a CRUCIBLE_BUCKET_* environment fallback read by
pydantic-settings, so the keys need never be on argv, where `ps` shows them).

Defaults that only make sense for a demo apply only off the public networks: on `finney`, `test`
and `archive` a node refuses to start without an explicit `--preset` (the tiny model on a real subnet
would waste everybody's time) and without a pinned dataset: either the hparams name the dataset's
bucket (`data.bucket`, pages are fetched and verified, `--data` is not read) or `--data` is a folder
checked against the pinned `data.manifest_hash`; on `local`, `ws://` and `devnet://` they default
to `tiny` and `data/tiny`. This module imports neither torch, the SDK nor the node, so building a parser
stays cheap; `neurons.node_cli.open_node` does the I/O.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from neurons.flags import Flags
from protocol.endpoint_policy import ANY_ENDPOINT, EndpointAllowance, endpoint_problem
from protocol.hparams import PRESETS, HParams, load_hparams
from protocol.storage_config import BucketConfig, BucketCredentials
from transport.chain_config import ChainConfig

ENV_PREFIX = "CRUCIBLE_BUCKET_"
# bittensor's spellings of ChainConfig's fields; the first one is what error messages name.
CHAIN_NAMES: dict[str, tuple[str, ...]] = {
    "network": ("--network", "--subtensor.network", "--subtensor.chain_endpoint"),
    "netuid": ("--netuid",),
    "wallet_name": ("--wallet.name",),
    "wallet_hotkey": ("--wallet.hotkey",),
    "wallet_path": ("--wallet.path",),
}
HPARAMS_NAMES: dict[str, tuple[str, ...]] = {"preset": ("--preset", "--hparams"), "overrides": ("--set",)}
HPARAMS_METAVARS = {"overrides": "SECTION.FIELD=VALUE"}
# bittensor's logging switches; TRACE is DEBUG for third-party libraries too (the SDK, boto3, transformers)
LOGGING_SWITCHES = {"log_level": {"--logging.info": "INFO", "--logging.debug": "DEBUG", "--logging.trace": "TRACE"}}
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEMO_PRESET, DEMO_DATA = "tiny", Path("data/tiny")


def check_preset(value: str) -> str:
    """A preset name or an existing .toml/.json file; ValueError listing the presets otherwise."""
    if value in PRESETS:
        return value
    path = Path(value)
    if path.suffix in (".toml", ".json"):
        if not path.is_file():
            raise ValueError(f"file not found: {value}")
        return value
    raise ValueError(f"unknown preset {value!r}: use one of {', '.join(PRESETS)} or a .toml/.json file")


class HParamsChoice(BaseModel):
    """Which hyperparameters: a preset (or file) and field overrides; every command that builds a model."""

    model_config = ConfigDict(extra="forbid")
    preset: str = Field("tiny", min_length=1, description="hparams preset name or a .toml/.json file")
    overrides: list[str] = Field(default_factory=list, description="override one hyperparameter (repeatable)")

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        return None if v is None else check_preset(v)

    def hparams(self) -> HParams:
        """The chosen hyperparameters; HParamsError with one line when the preset or an override is bad."""
        assert self.preset is not None, "NodeConfig fills the preset in"
        return load_hparams(self.preset, self.overrides)


class BucketSettings(BaseSettings):
    """the node's own bucket (flags or CRUCIBLE_BUCKET_* environment variables)"""

    # pydantic-settings reads CRUCIBLE_BUCKET_<FIELD> for every field not given as a flag; empty counts as unset
    # (compose's ${VAR:-}); nothing else (no .env file, no secrets dir) is read.
    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX, env_ignore_empty=True)
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
    preset: str | None = Field(None, min_length=1, description=(
        f"hparams preset ({', '.join(PRESETS)}) or a .toml/.json file (default: {DEMO_PRESET} on local, ws:// and "
        "devnet:// networks; required on finney, test and archive)"))
    data: Path | None = Field(None, description=(
        f"prepared dataset folder (default: {DEMO_DATA} on local, ws:// and devnet:// networks; required on "
        "finney, test and archive)"))
    data_cache_mb: int = Field(1024, ge=1, description=(
        "disk for the page cache (MiB, under STATE_DIR/dataset) when the hparams name a dataset bucket "
        "(data.bucket); --data is not read then"))
    state_dir: Path | None = Field(None, description="local state folder (default ~/.crucible/HOTKEY)")
    device: str = Field("auto", min_length=1, description="torch device: cpu, cuda, cuda:N, or auto (cuda when available)")
    windows: int | None = Field(None, ge=1, description="stop after this many windows (default: run forever)")
    log_level: str = Field("INFO", description="logging level: TRACE (DEBUG, third-party libraries too), DEBUG, INFO, WARNING, ERROR")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    bucket: BucketSettings = Field(default_factory=BucketSettings)
    bucket_allow_private: bool = Field(False, description=(
        "let THIS node's own bucket endpoint be plain http or resolve to a private, loopback or other "
        "non-public address (your own MinIO, split-horizon DNS); peers still apply the network's endpoint "
        "policy to what you commit"))
    # How this miner computes its inner steps (neurons.training.TrainSettings): node-local, never θ's rule.
    micro_batch: int | None = Field(None, ge=1, description=(
        "miner: samples per forward/backward on each rank; gradients accumulate up to the network's "
        "inner.batch_size (default: the rank's whole share at once). Choose it to fit GPU memory"))
    precision: Literal["fp32", "bf16"] = Field("fp32", description=(
        "miner and validator: compute precision, fp32 or bf16 (autocast, or FSDP2 mixed precision with --fsdp; "
        "master weights, AdamW, error feedback and the outer step stay float32, so θ stays bit-identical across "
        "nodes; a validator's stage-2 loss scores move by ~1e-5, see neurons/sharded_eval.py)"))
    activation_checkpointing: bool = Field(False, description=(
        "miner: recompute decoder-layer activations in the backward pass (less memory, ~30 % more compute)"))
    compile: bool = Field(False, description="miner: torch.compile the model (GPUs; slow to start on CPU)")
    fsdp: bool = Field(False, description=(
        "under torchrun: FSDP2-shard the model by rows across the ranks instead of replicating it (miner: with "
        "gradients, AdamW and error feedback, neurons.sharding; validator: stage 2 and the outer step, "
        "neurons.sharded_eval); --precision bf16 becomes FSDP2's mixed precision"))

    @field_validator("data", "state_dir")
    @classmethod
    def _home(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()  # `~/…` from an env file (systemd, PM2) means $HOME

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in LOG_LEVELS:
            raise ValueError(f"unknown logging level {v!r}: use one of {', '.join(LOG_LEVELS)}")
        return v.upper()

    @model_validator(mode="after")
    def _demo_defaults(self) -> NodeConfig:
        """The tiny preset and data/tiny off the public networks; on them, both must be chosen."""
        network = self.chain.network
        if self.preset is None and self.chain.is_public:
            raise ValueError(f"--preset: required on network {network}: one of {', '.join(PRESETS)} or a .toml/.json "
                             f"file ({DEMO_PRESET} is the default on local networks only)")
        self.preset = self.preset or DEMO_PRESET
        if self.chain.is_public:
            self._check_public_dataset(network)
        elif self.data is None:
            self.data = DEMO_DATA
        return self

    def _check_public_dataset(self, network: str) -> None:
        """A public network reads one pinned dataset: its bucket (no --data needed) or a checked folder."""
        try:
            data = load_hparams(self.preset, self.overrides).data
        except Exception:  # a bad preset or override is reported with its own line when the node is built
            return
        if data.bucket is not None:
            return  # pages come from the pinned bucket (--data is not read)
        if self.data is None:
            raise ValueError(f"--data: required on network {network}: the hparams name no dataset bucket "
                             f"(data.bucket), so pass a folder made by `crucible data prepare --preset "
                             f"{self.preset} --out DIR` or fetched from the network ({DEMO_DATA} is the default "
                             "on local networks only)")
        if data.manifest_hash is None:
            raise ValueError(f"--preset: on network {network} the hparams must pin the network's dataset "
                             "(data.manifest_hash, from the subnet's hparams file): without it two nodes could "
                             "train on different pages and every stage-2 score would be noise")

    def python_log_level(self) -> int:
        """The level for the root logger (TRACE is DEBUG with third-party libraries unmuted)."""
        return logging.DEBUG if self.log_level == "TRACE" else logging.getLevelNamesMapping()[self.log_level]

    def torch_device(self) -> str:
        """`device` with `auto` resolved (imports torch, so only when the node is being built)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def train_settings(self):  # -> neurons.training.TrainSettings (imports torch, so only when building the node)
        from neurons.training import TrainSettings

        return TrainSettings(micro_batch=self.micro_batch, precision=self.precision,
                             checkpointing=self.activation_checkpointing, compile=self.compile)

    def state_folder(self, hotkey: str) -> Path:
        return self.state_dir or Path.home() / ".crucible" / hotkey


HPARAMS_FLAGS = Flags(HParamsChoice, names=HPARAMS_NAMES, metavars=HPARAMS_METAVARS)
NODE_FLAGS = Flags(
    NodeConfig,
    names={**{f"chain.{k}": v for k, v in CHAIN_NAMES.items()}, **HPARAMS_NAMES,
           "bucket_allow_private": ("--bucket.allow-private",)},
    metavars=HPARAMS_METAVARS,
    switches=LOGGING_SWITCHES,
)
REQUIRED_BUCKET_FIELDS = ("name", "read_key", "read_secret", "write_key", "write_secret")
# BucketConfig's field -> BucketSettings' field ("{pair}" is read or write)
BUCKET_FIELDS = {"endpoint_url": "endpoint", "region": "region", "bucket": "name", "access_key_id": "{pair}_key",
                 "secret_access_key": "{pair}_secret"}


def _bucket_setting(bucket: BucketSettings, pair: str, exc: ValidationError) -> str:
    """One line for a BucketConfig error: the flag and variable, the bad value (never a secret), the rule."""
    first = exc.errors()[0]
    name = BUCKET_FIELDS.get(str(first["loc"][0]) if first["loc"] else "", "name").format(pair=pair)
    path = f"bucket.{name}"
    value = getattr(bucket, name)
    got = "" if value is None or isinstance(value, SecretStr) else f" (got {value!r})"
    message = first["msg"].removeprefix("Value error, ").removeprefix(f"{first['loc'][0]} " if first["loc"] else "")
    return f"{NODE_FLAGS.spellings(path)[0]} (${NODE_FLAGS.env_var(path)}): {message}{got}"


def bucket_credentials(bucket: BucketSettings, endpoints: EndpointAllowance | None = None,
                       allow_private: bool = False) -> BucketCredentials:
    """Read and write key pairs of the node's bucket; ValueError with one line naming the flag otherwise.

    `endpoints` (the network's `HParams.endpoints.allowance()`) is the endpoint policy the bucket is
    held to, as peers will hold its commitment: a refused endpoint fails here, at start-up, instead of
    silently earning nothing. `allow_private` (`--bucket.allow-private`) lifts it for this node's own
    connections only. None: not checked (tests, tools).
    """
    missing = [name for name in REQUIRED_BUCKET_FIELDS if not getattr(bucket, name)]
    if missing:
        path = f"bucket.{missing[0]}"
        raise ValueError(f"bucket not configured: set {NODE_FLAGS.spellings(path)[0]} (or ${NODE_FLAGS.env_var(path)})")
    allowance = ANY_ENDPOINT if allow_private and endpoints is not None else endpoints
    problem = None if allowance is None or bucket.endpoint is None else endpoint_problem(bucket.endpoint, allowance)
    if problem is not None:
        raise ValueError(f"{NODE_FLAGS.spellings('bucket.endpoint')[0]} (${NODE_FLAGS.env_var('bucket.endpoint')}): "
                         f"{problem} (got {bucket.endpoint!r}); peers refuse it under this network's endpoint policy (a private endpoint "
                         f"for this node's own use: {NODE_FLAGS.spellings('bucket_allow_private')[0]})")
    common = dict(endpoint_url=bucket.endpoint, region=bucket.region, bucket=bucket.name,
                  endpoint_allowance=allowance)
    pairs = {}
    for pair in ("read", "write"):
        try:
            pairs[pair] = BucketConfig(**common, access_key_id=getattr(bucket, f"{pair}_key"),
                                       secret_access_key=getattr(bucket, f"{pair}_secret"))
        except ValidationError as exc:
            raise ValueError(_bucket_setting(bucket, pair, exc)) from None
    return BucketCredentials(**pairs)
