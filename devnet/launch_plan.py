"""What `crucible devnet run` starts, decided before anything starts: its typed config and flags, the
devnet folder (chain state, wallets), the participants, the dataset (prepared once, published to the
devnet S3 and pinned), and each node's command line and environment.

`devnet.launcher.Devnet` runs the plan (processes, monitoring, report); this module only builds it,
so its parts are testable without starting a network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from devnet.bootstrap import (
    HOTKEY,
    BootstrapConfig,
    DevnetManifest,
    Tao,
    init_devnet,
    load_manifest,
    subnet_params_for,
)
from devnet.chain_state import DispatchError, SubnetParams, parse_subnet_params
from devnet.chain_store import load_state, save_state
from devnet.chain_wire import RAO_PER_TAO
from devnet.faults import GRAMMAR, check_plan, parse_plan
from devnet.s3 import free_port
from devnet.scoreboard import HONEST, Participant
from devnet.supervisor import ChildSpec
from neurons.flags import Flags
from neurons.node_config import ENV_PREFIX, NODE_FLAGS, BucketSettings, NodeConfig
from protocol.data import DatasetError, PageStore
from protocol.hparams import HParams, load_hparams
from transport.chain import ChainConfig

REPO = Path(__file__).resolve().parents[1]
# The kinds devnet/adversaries.py implements (a test keeps the two in step; importing it here is heavy).
ADVERSARY_KINDS = ("noise", "zero", "copycat", "late", "desync", "poison", "freeloader")


class DevnetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    miners: int = Field(4, ge=0, le=48, description="Honest miners (wallets miner-0 …).")
    validators: int = Field(1, ge=1, le=8, description="Validators, each staked at genesis.")
    windows: int = Field(10, ge=1, description="Windows the first validator must score before the run stops.")
    adversaries: list[str] = Field(
        default_factory=list, description=f"Adversarial miners, one per entry: {', '.join(ADVERSARY_KINDS)}."
    )
    subnet_params: list[str] = Field(
        default_factory=list,
        description="Subnet hyperparameter NAME=VALUE on the devnet chain, real spellings accepted "
                    "(MinAllowedWeights=8, weights_version_key=3, WeightsSetRateLimit=100, ImmunityPeriod=…, "
                    "MaxWeightsLimit=…, MaxAllowedValidators=…); applied to an existing chain too.")
    validator_stakes: list[Tao] = Field(
        default_factory=list,
        description="Genesis stake in TAO of validator-0, validator-1, … (e.g. 6000 3000 1000); the last repeats; "
                    "at most one per validator.")
    miner_profile: list[float] = Field(
        default_factory=list,
        description="Update quality in (0, 1] of honest miner 0, 1, … (devnet/profiles.py; the last repeats; "
                    "none: all 1), for pay-versus-contribution tests.")
    contribution: bool = Field(False, description=(
        "Measure each miner's contribution (devnet/contribution.py: θ copied per window during the run, each "
        "accepted update's held-out loss change measured after it) and correlate it with pay in the report "
        "(always on with --miner-profile)."))
    miner_ranks: int = Field(1, ge=1, le=8, description=(
        "Ranks of honest miner-0: above 1 it runs under torchrun as an FSDP2-sharded miner (--fsdp, gloo on CPU), "
        "to see a sharded miner earn like the others."))
    kill: list[str] = Field(
        default_factory=list,
        description="NAME@WINDOW: kill that node (SIGKILL, not restarted) once the chain reaches the window, "
                    "e.g. validator-0@8 to see the next validator's records take over.")
    faults: list[str] = Field(
        default_factory=list,
        description=f"A planned fault, {GRAMMAR}, repeatable (devnet/faults.py): kill:NODE@W[+Ns] (kill -9 at "
                    "window W, restarted N s later, default 2), storage-stall@W+Ns / chain-stall@W+Ns (SIGSTOP the "
                    "S3 server / chain for N s), unreachable:NODE:PEER@W (NODE alone cannot read PEER's window-W "
                    "shard), delete-shard:NODE@W (its window-W shard deleted at W+2); the report says what each cost.")
    state: Path = Field(Path(".devnet"), description="Devnet folder (chain, s3, data, nodes, logs).")
    report: Path | None = Field(None, description="Report folder (default STATE/report).")
    preset: str = Field("tiny", description="Hyperparameter preset or file, passed to every node.")
    overrides: list[str] = Field(default_factory=list, description="SECTION.FIELD=VALUE for every node.")
    data: Path | None = Field(None, description="A prepared dataset (default STATE/data, built if missing).")
    shared_data: bool = Field(False, description="Nodes read the prepared folder directly (quick runs) instead of "
                                                 "the dataset published to the devnet's S3 and pinned by hash.")
    block_time: float | None = Field(None, ge=0, description="Seconds per block (default: the preset's).")
    fresh: bool = Field(False, description="Delete STATE's chain, s3, nodes, logs, report first (not data).")
    netuid: int = Field(1, ge=1, le=65535, description="Subnet id of the devnet.")
    max_restarts: int = Field(3, ge=0, description="Restarts per crashed process before giving it up.")
    slack_windows: int = Field(10, ge=1, description="Extra windows allowed for start-up before a cut-off.")
    heldout_pages: int = Field(32, ge=1, description="Held-out pages the global model is evaluated on.")
    node_threads: int = Field(1, ge=1, description="Torch/OMP threads per node (the nodes share the cores).")
    poll_s: float = Field(0.5, gt=0, description="Seconds between supervisor and scoreboard polls.")
    start_timeout_s: float = Field(120.0, gt=0, description="Seconds chain or S3 may take to start.")
    dashboard: bool = Field(True, description="Serve the web dashboard on 127.0.0.1 (--no-dashboard: off).")
    dashboard_port: int = Field(0, ge=0, le=65535, description="Port of the web dashboard (0: a free port).")
    keep_dashboard: bool = Field(True, description="After the run, keep the dashboard up until Enter or Ctrl-C "
                                                   "(only when stdin is a terminal).")

    @model_validator(mode="after")
    def _check(self) -> DevnetConfig:
        bad = [k for k in self.adversaries if k not in ADVERSARY_KINDS]
        if bad:
            raise ValueError(f"unknown adversary kind {bad[0]!r}; choose from {', '.join(ADVERSARY_KINDS)}")
        params = SubnetParams(**parse_subnet_params(self.subnet_params))  # a bad NAME or VALUE: one line
        stakes = self.validator_stakes or []
        if len(stakes) > self.validators:  # the extra ones would be ignored
            raise ValueError(f"--validator-stake: {len(stakes)} stakes for {self.validators} validator(s) "
                             "(one per validator, the last repeats)")
        for i in range(self.validators if stakes else 0):  # a validator without a permit could never start
            tao = stakes[min(i, len(stakes) - 1)]
            if tao * RAO_PER_TAO < params.validator_min_stake:
                raise ValueError(f"--validator-stake: validator-{i} would stake {tao:g} TAO, below the subnet's "
                                 f"validator_min_stake of {params.validator_min_stake / RAO_PER_TAO:g} TAO: "
                                 "it would get no validator permit")
        for item in self.kill:
            name, sep, window = item.partition("@")
            if not sep or not name or not window.isdecimal():
                raise ValueError(f"--kill {item!r}: expected NAME@WINDOW (e.g. validator-0@8)")
            if name not in self.node_roles():
                raise ValueError(f"--kill {item!r}: no node named {name!r} (nodes: {', '.join(self.node_roles())})")
        killed = {item.partition("@")[0] for item in self.kill}
        if self.validators and all(f"validator-{i}" in killed for i in range(self.validators)):
            raise ValueError("--kill: every validator would be killed and none restarted, so nothing would score or "
                             "step after that and the run could only end at its window cap; keep one alive "
                             "(--validators N) or restart it with --fault kill:validator-0@W+2s")
        # a bad fault or one naming no node fails here, as one line, before --fresh clears anything
        check_plan(parse_plan(self.faults), self.node_roles())
        if any(not 0.0 < q <= 1.0 for q in self.miner_profile):
            raise ValueError("--miner-profile: each quality must be in (0, 1]")
        if self.miners + len(self.adversaries) == 0:
            raise ValueError("a devnet needs at least one miner (--miners or --adversary)")
        return self

    def node_roles(self) -> dict[str, str]:
        """Node name to role, as plan_participants names them (devnet/bootstrap.py's wallet names)."""
        roles = {f"validator-{i}": "validator" for i in range(self.validators)}
        roles |= {f"miner-{i}": "miner" for i in range(self.miners)}
        for i, kind in enumerate(self.adversaries):
            roles[f"adv-{kind}-{self.adversaries[:i].count(kind)}"] = "miner"
        return roles

    @property
    def report_dir(self) -> Path:
        return self.report or self.state / "report"


def prepare_state(cfg: DevnetConfig, hp: HParams) -> DevnetManifest:
    """Wallets and genesis in STATE/chain; reused when present and large enough, unless --fresh."""
    if cfg.fresh:
        for sub in ("chain", "s3", "nodes", "logs", "cache", "s3-server.json"):
            path = cfg.state / sub
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if cfg.report is None:
            shutil.rmtree(cfg.report_dir, ignore_errors=True)
    chain_dir, miners = cfg.state / "chain", cfg.miners + len(cfg.adversaries)
    if (chain_dir / "devnet.json").exists():
        m = load_manifest(chain_dir)
        if len(m.miners) < miners or len(m.validators) < cfg.validators or m.netuid != cfg.netuid:
            raise ValueError(f"{chain_dir} holds {len(m.miners)} miners and {len(m.validators)} validators "
                             f"on netuid {m.netuid}; pass --fresh to start a new devnet")
        if cfg.validator_stakes:  # genesis stakes: an existing chain has its own (grown by emission since)
            raise ValueError(f"--validator-stake sets the stakes of a new chain, and {chain_dir} exists: pass --fresh "
                             "to start one with them, or leave --validator-stake out to reuse it")
        if cfg.subnet_params:  # the chain is not running yet: set them in its saved state
            state = load_state(chain_dir)
            sn = state.subnet(m.netuid)
            sn.params = SubnetParams(**{**sn.params.model_dump(), **parse_subnet_params(cfg.subnet_params)})
            save_state(chain_dir, state)
        return m
    boot = BootstrapConfig(miners=miners, validators=cfg.validators, netuid=cfg.netuid,
                           subnet=subnet_params_for(hp, **parse_subnet_params(cfg.subnet_params)),
                           validator_stakes_tao=cfg.validator_stakes or None)
    return init_devnet(chain_dir, boot)


def commit_reveal_note(cfg: DevnetConfig, manifest: DevnetManifest) -> str | None:
    """A line to say at start when the devnet's subnet has commit-reveal on: the launcher's chain has no drand
    pulse source, so every commit stays pending and Yuma pays nothing (docs/protocol.md)."""
    try:
        params = load_state(cfg.state / "chain").subnet(manifest.netuid).params
    except (OSError, ValueError, DispatchError):
        return None
    if not params.commit_reveal_enabled:
        return None
    return ("commit-reveal is on (CommitRevealWeightsEnabled) and this offline devnet has no drand pulses: "
            "weights are committed but never revealed, so vtrust stays 0 and no incentive is paid "
            "(docs/protocol.md, 'Offline devnet with commit-reveal on')")


def plan_participants(cfg: DevnetConfig, manifest: DevnetManifest) -> list[Participant]:
    """Validators, honest miners, then adversaries (on the next miner wallets)."""
    out = [Participant(name=w.name, role="validator", kind="validator", wallet=w.name, hotkey=w.hotkey_ss58)
           for w in manifest.validators[: cfg.validators]]
    for i, wallet in enumerate(manifest.miners[: cfg.miners + len(cfg.adversaries)]):
        kind = HONEST if i < cfg.miners else cfg.adversaries[i - cfg.miners]
        name = wallet.name if kind == HONEST else f"adv-{kind}-{sum(q.kind == kind for q in out)}"
        out.append(Participant(name=name, role="miner", kind=kind, wallet=wallet.name,
                               hotkey=wallet.hotkey_ss58))
    return out


def child_env(cfg: DevnetConfig) -> dict[str, str]:
    """Environment of every child: importable repo, one torch thread, SDK caches inside STATE."""
    threads = str(cfg.node_threads)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "TOKENIZERS_PARALLELISM": "false",
            # node logs without transformers' progress bars and advisory warnings (--logging.trace brings logs back)
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "BTCLI_TOKEN_SYMBOLS_CACHE": str((cfg.state / "cache" / "token_symbols.json").resolve())}


def crucible(*args: str) -> list[str]:
    return [sys.executable, "-m", "neurons.cli", *args]


def ensure_dataset(cfg: DevnetConfig, hp: HParams) -> Path:
    """--data, else STATE/data, else the repo's data/<preset> if it matches, else build STATE/data."""
    for path in [cfg.data] if cfg.data is not None else [cfg.state / "data", REPO / "data" / hp.name]:
        try:
            PageStore(path, hp)
            return path.resolve()
        except DatasetError as exc:
            if cfg.data is not None:
                raise ValueError(f"--data {path}: {exc}") from None
    out, log = cfg.state / "data", cfg.state / "logs" / "data.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = crucible("data", "prepare", "--preset", cfg.preset, "--out", str(out),
                   *(f"--set={o}" for o in cfg.overrides))
    with open(log, "ab") as fh:
        env = {**os.environ, **child_env(cfg)}
        code = subprocess.run(cmd, stdout=fh, stderr=fh, cwd=REPO, env=env).returncode
    if code != 0:
        raise ValueError(f"dataset preparation failed (exit {code}); see {log}")
    return out.resolve()


DATASET_BUCKET = "dataset"


def publish_to_devnet(cfg: DevnetConfig, data: Path, s3: dict) -> tuple[Path, str]:
    """Publish the prepared pages to the devnet's `dataset` bucket; returns the hparams file that pins it
    (the launcher's hparams with data.manifest_hash and the bucket's place; mode 0600: the read key) and the hash.
    Nodes get it as --preset, so the key stays out of argv."""
    import json

    from protocol.storage_config import BucketConfig
    from transport.bucket import Bucket
    from transport.dataset import publish_dataset

    write = BucketConfig(endpoint_url=s3["endpoint"], region=s3["region"], bucket=DATASET_BUCKET,
                         access_key_id=s3["write"]["access_key_id"],
                         secret_access_key=s3["write"]["secret_access_key"])
    pinned, _ = publish_dataset(Bucket(write), data)
    hp = load_hparams(cfg.preset, cfg.overrides).model_dump(mode="json")
    hp["data"].update(manifest_hash=pinned, endpoint=s3["endpoint"], region=s3["region"], bucket=DATASET_BUCKET,
                      read_key=s3["read"]["access_key_id"], read_secret=s3["read"]["secret_access_key"])
    path = cfg.state / "hparams-dataset.json"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(hp, fh, indent=1)
    return path.resolve(), pinned


def node_config(cfg: DevnetConfig, p: Participant, url: str, wallet_path: str, data: Path, s3: dict) -> NodeConfig:
    """The participant's node settings, the keys left out (they go through the environment)."""
    chain = ChainConfig(network=url, netuid=cfg.netuid, wallet_name=p.wallet, wallet_hotkey=HOTKEY,
                        wallet_path=wallet_path)
    return NodeConfig(chain=chain, preset=cfg.preset, overrides=cfg.overrides, data=data,
                      state_dir=(cfg.state / "nodes" / p.name).resolve(), device="cpu", windows=cfg.windows + 1,
                      # model_construct: the launcher's own CRUCIBLE_BUCKET_* must not leak into a node's argv
                      bucket=BucketSettings.model_construct(endpoint=s3["endpoint"], region=s3["region"], name=p.name))


def node_spec(cfg: DevnetConfig, p: Participant, url: str, wallet_path: str, data: Path,
              s3: dict) -> ChildSpec:
    """`crucible devnet miner|validator …`: the mainnet node flags, the devnet's chain client and, for an
    adversary, `--adversary KIND`; the bucket's keys in the environment."""
    node = node_config(cfg, p, url, wallet_path, data, s3)
    adversary = ["--adversary", p.kind] if p.role == "miner" and p.kind != HONEST else []
    if p.role == "miner" and p.kind == HONEST and cfg.miner_profile:
        index = int(p.wallet.rsplit("-", 1)[-1]) if p.wallet.rsplit("-", 1)[-1].isdigit() else 0
        adversary = ["--quality", repr(cfg.miner_profile[min(index, len(cfg.miner_profile) - 1)])]
    argv = crucible("devnet", p.role, *NODE_FLAGS.argv(node), *adversary)
    if p.role == "miner" and p.kind == HONEST and p.wallet.endswith("-0") and cfg.miner_ranks > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.miner_ranks),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *argv[1:], "--fsdp"]
    keys = {f"{ENV_PREFIX}{side.upper()}_{part}": s3[side][field] for side in ("read", "write")
            for part, field in (("KEY", "access_key_id"), ("SECRET", "secret_access_key"))}
    return ChildSpec(name=p.name, argv=argv, log_path=cfg.state / "logs" / f"{p.name}.log",
                     env={**child_env(cfg), **keys}, cwd=REPO)



DEVNET_FLAGS = Flags(DevnetConfig, names={"adversaries": ("--adversary",), "overrides": ("--set",),
                                          "subnet_params": ("--subnet-param",),
                                          "validator_stakes": ("--validator-stake",), "kill": ("--kill",),
                                          "miner_profile": ("--miner-profile",), "faults": ("--fault",)},
                     metavars={"adversaries": "KIND", "overrides": "SECTION.FIELD=VALUE",
                               "subnet_params": "NAME=VALUE", "validator_stakes": "TAO", "kill": "NAME@WINDOW",
                               "miner_profile": "Q", "faults": "PLAN"})
