"""Network hyperparameters: the one source of truth every participant must agree on.

Every number the protocol uses (window length, inner/outer optimiser, SparseLoCo compression,
Gauntlet scoring, peers, checkpoints, size limits) is a field here, grouped by component, each with
a description and a validator where a bad value is possible. Code never hard-codes these values.

Anchors are the Templar / Covenant-72B public values (docs/protocol.md §8); presets scale the model and
schedule from a CPU-sized `tiny` network up to the 72B run.

    hp = load_hparams("tiny")                                  # a preset
    hp = load_hparams("my.toml", overrides=["inner.steps=4"])  # a file, with dotted overrides
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from protocol.endpoint_policy import EndpointAllowance
from protocol.storage_config import BucketConfig


class HParamsError(ValueError):
    """A bad hyperparameter file or value; the message is one line naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelHParams(_Section):
    vocab_size: int = Field(4096, ge=256, le=1 << 20, description="Tokenizer vocabulary size (tokens).")
    hidden_size: int = Field(256, ge=16, description="Transformer width.")
    intermediate_size: int = Field(688, ge=16, description="SwiGLU MLP inner width.")
    num_layers: int = Field(2, ge=1, description="Number of decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(4, ge=1, description="Key/value heads (grouped-query attention).")
    seq_len: int = Field(128, ge=8, description="Tokens per training sample (page).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    tie_embeddings: bool = Field(False, description="Share input embedding and LM head weights.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelHParams:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self


class WindowHParams(_Section):
    blocks_per_window: int = Field(125, ge=1, description="Chain blocks per training window (anchor 125 ≈ 25 min).")
    upload_grace_blocks: int = Field(
        0, ge=0, description="Blocks after a window's end during which its shards are still accepted."
    )
    expected_block_time_s: float = Field(12.0, gt=0, description="Nominal seconds per block (planning only).")


class InnerOptimHParams(_Section):
    steps: int = Field(30, ge=1, description="Inner AdamW steps per window (H; anchor 30).")
    batch_size: int = Field(8, ge=1, description="Samples per inner step.")
    lr: float = Field(1.3e-4, gt=0, lt=1, description="Inner AdamW peak learning rate (anchor 1.3e-4).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip per inner step.")
    warmup_windows: int = Field(0, ge=0, description="Windows of linear learning-rate warm-up at the start of the run.")


class OuterOptimHParams(_Section):
    lr: float = Field(1.0, gt=0, description="Outer SGD step size α applied to the aggregated update (anchor 1.0).")
    clip_growth: float = Field(
        2.0, gt=1, le=1e3,
        description="A window's clip norm is at most this many times the previous window's (the robust ceiling).",
    )
    max_update_norm: float = Field(
        1e4, gt=0, le=1e12, description="Absolute ceiling on any peer's update norm after clipping (L2, all tensors).",
    )


class SparseLoCoHParams(_Section):
    error_decay: float = Field(0.95, ge=0, le=1, description="Error-feedback decay β: e ← β·e + Δ (anchor 0.95).")
    chunk_2d: int = Field(64, ge=1, le=4096, description="Side of the square chunk for 2-D tensors (anchor 64).")
    chunk_1d: int = Field(4096, ge=1, le=4096, description="Chunk length for 1-D tensors (anchor 4096).")
    topk: int = Field(64, ge=1, description="Values kept per chunk (anchor 64 → density 1.5625 %).")
    quant_bits: Literal[2] = Field(2, description="Bits per kept value (4 levels; only 2 is supported on the wire).")
    quant_range_sigma: float = Field(6.0, gt=0, description="Quantisation covers mean ± this many σ (anchor 6).")
    index_bits: Literal[12] = Field(12, description="Bits per packed in-chunk index (chunks ≤ 4096 elements).")

    @model_validator(mode="after")
    def _chunks_fit_index(self) -> SparseLoCoHParams:
        limit = 1 << self.index_bits
        if self.chunk_2d * self.chunk_2d > limit or self.chunk_1d > limit:
            raise ValueError(f"chunk sizes must hold at most {limit} elements for {self.index_bits}-bit indices")
        if self.topk > min(self.chunk_2d * self.chunk_2d, self.chunk_1d):
            raise ValueError("topk must not exceed the chunk size")
        return self


class ShardHParams(_Section):
    debug_sample_size: int = Field(
        256, ge=8, description="Parameter values of θ_w in each shard's sync debug sample (protocol/sample.py)."
    )


class GauntletHParams(_Section):
    sync_max_steps: float = Field(5.0, gt=0, le=1e6, description="Steps behind at which sync reaches zero.")
    sync_penalty_steps: float = Field(3.0, ge=0, description="More steps behind than this is penalised (anchor 3).")
    sync_exponent: float = Field(2.5, gt=0, le=100, description="Exponent of the sync score curve.")
    copy_halve_overlap: float = Field(0.4, gt=0, le=1, description="Top-k index overlap that halves the later uploader.")
    copy_zero_overlap: float = Field(0.5, gt=0, le=1, description="Top-k index overlap that zeroes the later uploader.")
    eval_miners_per_window: int = Field(15, ge=1, description="Miners evaluated in stage 2 per window (anchor 15).")
    eval_batches: int = Field(4, ge=1, description="Batches of assigned and of random samples per evaluation.")
    eval_time_fraction: float = Field(
        0.5, gt=0, le=1,
        description="Stage 2 starts no new evaluation after this fraction of a window's duration (chain time), "
                    "so a validator keeps pace with the windows; the rest wait for a later window.",
    )
    eval_step_scale: float = Field(0.2, gt=0, le=100, description="Evaluation applies this × outer lr of a miner's update.")
    binary_ma_alpha: float = Field(0.05, gt=0, le=1, description="Moving-average rate of the binary indicator.")
    openskill_beta: float = Field(7.0, gt=0, le=1000, description="OpenSkill Plackett–Luce beta (anchor 7).")
    openskill_tau: float = Field(0.1, ge=0, le=100, description="OpenSkill tau, dynamics factor (anchor 0.1).")
    rating_tie_margin: float = Field(
        0.15, ge=0, le=10,
        description="Relative scores (loss score / the window's reference) closer than this tie in the rating "
                    "match: measured noise between equal honest miners is ≈ 0.05–0.1 (docs/incentives.md).",
    )
    value_alpha: float = Field(
        0.3, gt=0, le=1, description="Moving-average rate of a miner's relative score (its 'value', what pays).")
    value_shrink_windows: float = Field(
        2.0, ge=0, le=100,
        description="Shrinkage of the value while evidence is thin: value × n / (n + this), n = evaluations.",
    )
    memory_margin: float = Field(
        0.1, ge=0, le=10,
        description="The memory indicator is +1 only if a miner's update lowered the loss on its assigned samples "
                    "more than the control (the other miners' mean update, scaled to its strength) by more than "
                    "this, in units of the control's improvement on random data (docs/incentives.md).",
    )
    memory_floor: float = Field(
        0.3, ge=-1, lt=1,
        description="Bias-corrected binary MA at or below which the memory factor is 0 (a freeloader's or "
                    "copier's ≈ −0.5, an honest miner's ≈ 0.9; docs/incentives.md).",
    )
    memory_full: float = Field(
        0.7, gt=-1, le=1, description="Bias-corrected binary MA at or above which the memory factor is 1.")
    value_clip: float = Field(
        3.0, gt=0, le=100, description="Relative scores are clipped to [−value_clip, value_clip] (contains outliers).")
    missing_penalty: float = Field(0.75, ge=0, le=1, description="Multiplier on positive scores for a missing/late shard.")
    score_zero_threshold: float = Field(1e-4, ge=0, le=1, description="Final scores below this become zero.")
    weight_mode: Literal["power", "gather_reserve"] = Field("power", description="How scores become weights.")
    weight_power: float = Field(
        1.0, gt=0, le=8,
        description="Scores are raised to this power before normalising (bounded: a steep power turns noise "
                    "into winner-takes-all, docs/incentives.md).",
    )
    gather_share: float = Field(0.75, ge=0, le=1, description="gather_reserve mode: weight share of the primary peers.")
    burn_uid: int | None = Field(None, ge=0, description="Uid receiving the burn share, or none.")
    burn_share: float = Field(0.0, ge=0, le=1, description="Share of weight sent to burn_uid.")

    @model_validator(mode="after")
    def _ordering(self) -> GauntletHParams:
        if self.copy_zero_overlap < self.copy_halve_overlap:
            raise ValueError("copy_zero_overlap must be ≥ copy_halve_overlap")
        if self.sync_penalty_steps > self.sync_max_steps:
            raise ValueError("sync_penalty_steps must be ≤ sync_max_steps")
        if self.memory_full <= self.memory_floor:
            raise ValueError("memory_full must be > memory_floor")
        if self.burn_share > 0 and self.burn_uid is None:
            raise ValueError("burn_share > 0 needs a burn_uid")
        return self


class PeerHParams(_Section):
    primary: int = Field(20, ge=1, description="Primary peers whose shards everyone aggregates (anchor G = 20).")
    reserve: int = Field(10, ge=0, description="Reserve peers used when primaries are missing (anchor 10).")
    lead_windows: int = Field(
        2, ge=1, le=8,
        description="The peer list chosen from window w's scores is for window w + lead: 2 leaves a validator "
                    "a whole window to score w before miners look for the list at w + 2's deadline.",
    )


class SubnetHParams(_Section):
    weights_version_key: int = Field(
        0, ge=0, le=2**64 - 1,
        description="Version key sent with set_weights: the subnet's WeightsVersionKey (subtensor refuses an older "
                    "key with IncorrectWeightVersionKey). A validator reads the subnet's value at start and stops "
                    "with one line when it differs.",
    )


class FetchHParams(_Section):
    object_seconds: float = Field(
        60.0, gt=0, le=3600,
        description="Deadline for one object from a peer (request, headers and body together), seconds.",
    )
    window_fraction: float = Field(
        0.25, gt=0, le=1, description="Share of a window a node waits for one window's downloads, all peers together.",
    )
    poll_seconds: float = Field(
        10.0, gt=0, le=600, description="How often a validator looks at every miner's shard during the upload phase.",
    )
    record_grace_blocks: int = Field(
        3, ge=1, le=100,
        description="Blocks after the upload deadline by which the aggregate record must be published to count.",
    )


class CheckpointHParams(_Section):
    every_windows: int = Field(10, ge=1, description="A validator publishes a checkpoint every K windows.")
    retention_windows: int = Field(50, ge=2, description="Bucket objects older than this many windows are deleted.")

    @model_validator(mode="after")
    def _replay_fits_retention(self) -> CheckpointHParams:
        # Recovery is the latest checkpoint + a replay of every window since (records and shards). The latest
        # checkpoint is up to K windows old, one more while the next is being published, one more for the
        # window in flight: a retention shorter than K + 2 deletes what replay needs.
        if self.retention_windows < self.every_windows + 2:
            raise ValueError(
                f"retention_windows ({self.retention_windows}) must be at least every_windows + 2 "
                f"({self.every_windows + 2}): recovery replays every window since the latest checkpoint")
        return self


class DataHParams(_Section):
    seed: int = Field(1337, description="Seed of the sample assignment permutation.")
    heldout_fraction: float = Field(0.02, gt=0, lt=0.5, description="Share of pages kept for held-out evaluation.")
    corpus_max_chars: int = Field(24_000_000, ge=10_000, description="Cap on characters read to build the offline corpus.")
    # The network's published dataset (`crucible data publish`, protocol/data.py's manifest); none: a local folder.
    manifest_hash: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="blake2b-256 of the dataset's manifest: every node must read exactly this dataset.",
    )
    endpoint: str | None = Field(None, description="S3 endpoint of the dataset's bucket (the network's endpoint policy applies).")
    region: str = Field("auto", min_length=1, max_length=32, description="Signing region of the dataset's bucket.")
    bucket: str | None = Field(None, description="Bucket holding dataset/<manifest_hash[:16]>/ (none: a local --data folder).")
    read_key: str | None = Field(None, description="Read-only access key id of the dataset's bucket (public).")
    read_secret: str | None = Field(None, description="Read-only secret of the dataset's bucket (public, like the key).")

    @model_validator(mode="after")
    def _location_complete(self) -> DataHParams:
        if self.bucket is not None and (self.manifest_hash is None or not self.read_key or not self.read_secret):
            raise ValueError("a dataset bucket needs manifest_hash, read_key and read_secret")
        return self

    def location(self, allowance: EndpointAllowance | None) -> BucketConfig | None:
        """The dataset bucket's read config under the network's endpoint policy; None without a bucket."""
        if self.bucket is None:
            return None
        return BucketConfig(endpoint_url=self.endpoint, region=self.region, bucket=self.bucket,
                            access_key_id=self.read_key, secret_access_key=self.read_secret,
                            endpoint_allowance=allowance)


class EndpointHParams(_Section):
    """Which bucket endpoints nodes accept beyond https:// on public addresses (protocol/endpoint_policy.py).

    Every preset is strict; a network whose buckets live on private addresses says so here (the
    devnet: plain http on loopback, injected by `crucible devnet miner|validator`). Not part of the
    revision: it says where a network runs, not what it computes or sends.
    """

    allow_http: bool = Field(False, description="Accept plain http:// bucket endpoints (devnets, private test networks).")
    allow_networks: tuple[str, ...] = Field(
        (), description="CIDRs whose non-public addresses are accepted as bucket endpoints, e.g. 127.0.0.0/8.",
    )

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as exc:
                raise ValueError(f"not a CIDR network: {exc}") from None
        return v

    def allowance(self) -> EndpointAllowance:
        """The allowance every node of this network applies to committed endpoints."""
        return EndpointAllowance(http=self.allow_http, networks=tuple(ipaddress.ip_network(c) for c in self.allow_networks))


class HParams(_Section):
    name: str = Field("custom", description="Preset or file this set came from (not part of the revision).")
    init_seed: int = Field(0, description="Seed of the network's deterministic initialisation θ_0.")
    model: ModelHParams = Field(default_factory=ModelHParams, description="Model shape.")
    windows: WindowHParams = Field(default_factory=WindowHParams, description="Window timing.")
    inner: InnerOptimHParams = Field(default_factory=InnerOptimHParams, description="Inner optimiser.")
    outer: OuterOptimHParams = Field(default_factory=OuterOptimHParams, description="Outer optimiser.")
    sparseloco: SparseLoCoHParams = Field(default_factory=SparseLoCoHParams, description="Compression.")
    shard: ShardHParams = Field(default_factory=ShardHParams, description="Shard contents beyond the update.")
    gauntlet: GauntletHParams = Field(default_factory=GauntletHParams, description="Validator scoring.")
    peers: PeerHParams = Field(default_factory=PeerHParams, description="Peer selection.")
    fetch: FetchHParams = Field(default_factory=FetchHParams, description="Download deadlines and upload observation.")
    subnet: SubnetHParams = Field(default_factory=SubnetHParams, description="What the subnet's chain rules ask of nodes.")
    checkpoints: CheckpointHParams = Field(default_factory=CheckpointHParams, description="Checkpoints.")
    data: DataHParams = Field(default_factory=DataHParams, description="Data and assignment.")
    endpoints: EndpointHParams = Field(default_factory=EndpointHParams, description="Accepted bucket endpoints.")

    @property
    def samples_per_window(self) -> int:
        """Samples one miner trains on in one window."""
        return self.inner.steps * self.inner.batch_size

    _revision: str | None = PrivateAttr(None)

    def revision(self) -> str:
        """Short digest of everything that changes θ or the wire; peers must share it (computed once).

        `name` and `endpoints` are left out: where a set came from and which bucket addresses a network
        accepts change neither θ nor the wire (a devnet node and the launcher watching it agree); so is
        where the dataset is stored (its pinned manifest hash is in).
        """
        if self._revision is None:
            payload = self.model_dump(mode="json", exclude={"name": True, "endpoints": True,
                                                            "data": {"endpoint", "region", "bucket", "read_key",
                                                                     "read_secret"}})
            if payload["data"]["manifest_hash"] is None:  # unpinned: revisions as before the field existed
                del payload["data"]["manifest_hash"]
            if payload["subnet"] == SubnetHParams().model_dump(mode="json"):  # default: as before the section
                del payload["subnet"]
            blob = json.dumps(payload, sort_keys=True).encode()
            self._revision = hashlib.blake2b(blob, digest_size=8).hexdigest()
        return self._revision

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> HParams:
        copied = super().model_copy(update=update, deep=deep)
        copied._revision = None  # a copy with other values has another revision
        return copied


def _preset(name: str, **sections: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, **sections}


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _preset(
        "tiny",
        model=dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=2, num_heads=4,
                   num_kv_heads=4, seq_len=128),
        windows=dict(blocks_per_window=10, upload_grace_blocks=1, expected_block_time_s=1.0),
        inner=dict(steps=8, batch_size=8, lr=1e-3, weight_decay=0.1),
        shard=dict(debug_sample_size=128),
        fetch=dict(object_seconds=4.0, poll_seconds=1.0, record_grace_blocks=3),
        gauntlet=dict(eval_miners_per_window=64, eval_batches=2),
        peers=dict(primary=8, reserve=4),
        checkpoints=dict(every_windows=5, retention_windows=20),
        data=dict(corpus_max_chars=6_000_000),
    ),
    "150m": _preset(
        "150m",
        model=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                   num_kv_heads=12, seq_len=2048),
        inner=dict(steps=30, batch_size=16, lr=4e-4),
    ),
    "1b": _preset(
        "1b",
        model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                   num_kv_heads=4, seq_len=2048),
        inner=dict(steps=30, batch_size=32, lr=2e-4),
    ),
    "8b": _preset(
        "8b",
        model=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                   num_kv_heads=8, seq_len=2048, rope_theta=500000.0),
        inner=dict(steps=30, batch_size=64, lr=1.3e-4),
    ),
    # Covenant-72B: LLaMA-3-style 80 layers, width 8192, GQA with 8 KV heads, seq 2048, H = 30,
    # inner lr 1.3e-4, 20 gathered peers; SparseLoCo anchors are the section defaults.
    "72b": _preset(
        "72b",
        model=dict(vocab_size=262144, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                   num_kv_heads=8, seq_len=2048, rope_theta=500000.0),
        inner=dict(steps=30, batch_size=192, lr=1.3e-4),
    ),
}


def _set_dotted(target: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = target
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise HParamsError(f"hparams: {dotted}: '{key}' is not a section")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # plain strings need no quotes on the command line
    node[keys[-1]] = value


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HParamsError(f"hparams: file not found: {path}")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise HParamsError(f"hparams: {path}: top level must be an object")
            return data
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HParamsError(f"hparams: {path}: cannot parse: {exc}") from None
    raise HParamsError(f"hparams: {path}: expected a .toml or .json file")


def load_hparams(source: str = "tiny", overrides: list[str] | None = None) -> HParams:
    """Build HParams from a preset name or a TOML/JSON file, then apply `section.field=value` overrides.

    A file may name a base preset with a top-level `preset = "tiny"` key.
    """
    if source in PRESETS:
        data: dict[str, Any] = copy.deepcopy(PRESETS[source])
    else:
        data = _read_file(Path(source))
        base = data.pop("preset", None)
        if base is not None:
            if base not in PRESETS:
                raise HParamsError(f"hparams: preset: unknown preset '{base}' (known: {', '.join(PRESETS)})")
            data = _deep_merge(copy.deepcopy(PRESETS[base]), data)
        data.setdefault("name", Path(source).stem)
    for item in overrides or []:
        if "=" not in item:
            raise HParamsError(f"hparams: override '{item}' must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw.strip())
    try:
        return HParams.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "hparams"
        raise HParamsError(f"hparams: {where}: {first['msg']} (got {first.get('input')!r})") from None


def known_sources() -> list[str]:
    return list(PRESETS)
