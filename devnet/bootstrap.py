"""Genesis of a devnet: wallets on disk, a subnet, registered and staked neurons, one chain state file.

`crucible devnet init --state DIR --miners N --validators V` creates, with the SDK's own wallet API,
unencrypted bittensor wallets under `DIR/wallets` (`owner`, `miner-0…`, `validator-0…`, each with
hotkey `default`, so `--wallet.path DIR/wallets --wallet.name miner-0` works as on mainnet), and
writes the genesis `ChainState` directly: the subnet (owned by `owner`), funded coldkeys, every
hotkey registered through the same `chain_state.register` rule the chain applies to extrinsics,
validators staked, and the first epoch run so the staked validators hold permits from block 0.
The chain process (`crucible devnet chain --state DIR`) then takes over. A `devnet.json` manifest
lists who is who.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path
from typing import Annotated

import bittensor as bt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from devnet.chain_epoch import run_epoch
from devnet.chain_state import (
    SubnetParams,
    add_stake,
    create_subnet,
    fund,
    new_chain,
    parse_subnet_params,
    register,
)
from devnet.chain_store import save_state, state_path
from devnet.chain_wire import RAO_PER_TAO, U16_MAX
from neurons.flags import config_error
from protocol.hparams import HParams, load_hparams

MANIFEST_FILE = "devnet.json"
HOTKEY = "default"


MAX_TAO = 21_000_000  # TAO's total supply: no genesis balance or stake is larger
# A genesis amount in TAO: finite (nan or inf cannot become rao), not negative, at most the total supply.
Tao = Annotated[float, Field(ge=0, le=MAX_TAO, allow_inf_nan=False)]


class BootstrapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    miners: int = Field(4, ge=0, description="Miner wallets to create (miner-0 …).")
    validators: int = Field(1, ge=0, description="Validator wallets to create (validator-0 …).")
    netuid: int = Field(1, ge=1, le=65535, description="The subnet the devnet runs.")
    register_all: bool = Field(True, description="Register every hotkey at genesis (else only fund the coldkeys).")
    fund_tao: Tao = Field(1000.0, description="Free TAO every coldkey starts with.")
    validator_stake_tao: Tao = Field(10_000.0, description="TAO each validator stakes at genesis.")
    validator_stakes_tao: list[Tao] | None = Field(
        None, description="Per-validator genesis stake in TAO (validator-0 first); overrides validator_stake_tao.")
    seed: str | None = Field(None, description="Genesis seed; a random one when not given.")
    subnet: SubnetParams = Field(
        default_factory=lambda: SubnetParams(tempo=10, weights_rate_limit=2, immunity_period=100, max_allowed_uids=64),
        description="Hyperparameters of the subnet (devnet defaults: short tempo and rate limit).",
    )


class WalletEntry(BaseModel):
    name: str = Field(description="Wallet name (folder under the wallet path).")
    hotkey: str = Field(HOTKEY, description="Hotkey file name.")
    hotkey_ss58: str = Field(description="Hotkey address.")
    coldkey_ss58: str = Field(description="Coldkey address.")


class DevnetManifest(BaseModel):
    netuid: int = Field(description="The devnet subnet.")
    genesis: str = Field(description="Genesis hash of the chain state.")
    wallet_path: str = Field(description="Value for --wallet.path.")
    owner: WalletEntry = Field(description="Subnet owner wallet.")
    miners: list[WalletEntry] = Field(description="Miner wallets, in uid order when registered.")
    validators: list[WalletEntry] = Field(description="Validator wallets.")


def subnet_params_for(hp: HParams, **overrides: object) -> SubnetParams:
    """Devnet subnet hyperparameters that fit the network's windows: one epoch per window, weights
    allowed twice per window (a validator sets them once), immunity of ten windows."""
    bpw = hp.windows.blocks_per_window
    base = {"tempo": bpw, "weights_rate_limit": max(1, bpw // 2), "immunity_period": min(10 * bpw, U16_MAX),
            "max_allowed_uids": 64}
    return SubnetParams(**{**base, **overrides})


def validator_stakes_rao(cfg: BootstrapConfig) -> list[int]:
    """Each validator's genesis stake (rao): `validator_stakes_tao` (the last value repeats), else the common one."""
    given = cfg.validator_stakes_tao or [cfg.validator_stake_tao]
    if any(t < 0 for t in given):
        raise ValueError("validator stakes must be non-negative")
    return [int(given[min(i, len(given) - 1)] * RAO_PER_TAO) for i in range(cfg.validators)]


def ensure_wallet(wallet_path: Path, name: str) -> bt.Wallet:
    """An unencrypted wallet `name` with hotkey `default`, created with the SDK's wallet API if missing."""
    wallet = bt.Wallet(name=name, hotkey=HOTKEY, path=str(wallet_path))
    if not wallet.coldkeypub_file.exists_on_device():
        wallet.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    if not wallet.hotkey_file.exists_on_device():
        wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return wallet


def _entry(wallet: bt.Wallet) -> WalletEntry:
    return WalletEntry(name=wallet.name, hotkey_ss58=wallet.hotkey.ss58_address,
                       coldkey_ss58=wallet.coldkeypub.ss58_address)


def init_devnet(state_dir: str | Path, config: BootstrapConfig | None = None, *, force: bool = False) -> DevnetManifest:
    """Create wallets and the genesis chain state in `state_dir`; refuses to overwrite unless `force`."""
    cfg = config or BootstrapConfig()
    state_dir = Path(state_dir)
    if state_path(state_dir).exists() and not force:
        raise FileExistsError(f"{state_path(state_dir)} exists; pass force=True (--force) to start a new chain")
    wallet_path = state_dir / "wallets"
    owner = ensure_wallet(wallet_path, "owner")
    miners = [ensure_wallet(wallet_path, f"miner-{i}") for i in range(cfg.miners)]
    validators = [ensure_wallet(wallet_path, f"validator-{i}") for i in range(cfg.validators)]

    state = new_chain(cfg.seed or secrets.token_hex(16), int(time.time() * 1000))
    create_subnet(state, cfg.netuid, owner.coldkeypub.ss58_address, owner.hotkey.ss58_address, cfg.subnet)
    stakes = validator_stakes_rao(cfg)
    for wallet in [owner, *miners, *validators]:
        fund(state, wallet.coldkeypub.ss58_address, int(cfg.fund_tao * RAO_PER_TAO))
    for wallet, stake_rao in zip(validators, stakes, strict=True):
        fund(state, wallet.coldkeypub.ss58_address, stake_rao)
    if cfg.register_all:
        for wallet in [*validators, *miners]:
            register(state, cfg.netuid, wallet.coldkeypub.ss58_address, wallet.hotkey.ss58_address, burned=False)
        for wallet, stake_rao in zip(validators, stakes, strict=True):
            if stake_rao:
                add_stake(state, wallet.coldkeypub.ss58_address, wallet.hotkey.ss58_address, cfg.netuid, stake_rao)
        run_epoch(state, cfg.netuid)  # assigns validator permits from the genesis stake
    save_state(state_dir, state)
    manifest = DevnetManifest(
        netuid=cfg.netuid, genesis=state.genesis, wallet_path=str(wallet_path), owner=_entry(owner),
        miners=[_entry(w) for w in miners], validators=[_entry(w) for w in validators],
    )
    (state_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return manifest


def load_manifest(state_dir: str | Path) -> DevnetManifest:
    return DevnetManifest.model_validate_json((Path(state_dir) / MANIFEST_FILE).read_text())


# --- CLI --------------------------------------------------------------------------------------------------


def add_cli(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--state", required=True, type=Path, help="Devnet state folder to create.")
    parser.add_argument("--miners", type=int, default=4, help="Miner wallets to create and register.")
    parser.add_argument("--validators", type=int, default=1, help="Validator wallets to create, register and stake.")
    parser.add_argument("--netuid", type=int, default=1, help="Subnet id of the devnet.")
    parser.add_argument("--hparams", default="tiny", help="Preset or file whose window length sets the tempo.")
    parser.add_argument("--tempo", type=int, default=None, help="Blocks per epoch (default: blocks per window).")
    parser.add_argument("--subnet-param", action="append", default=[], metavar="NAME=VALUE",
                        help="A subnet hyperparameter (e.g. MinAllowedWeights=8, weights_version_key=3); repeatable.")
    parser.add_argument("--validator-stake", action="append", type=float, default=[], metavar="TAO",
                        help="Genesis stake of validator-0, validator-1, … in order; repeatable.")
    parser.add_argument("--no-register", action="store_true", help="Only create and fund wallets.")
    parser.add_argument("--force", action="store_true", help="Replace an existing chain state.")
    return parser


_INIT_FLAGS = {"miners": "--miners", "validators": "--validators", "netuid": "--netuid", "tempo": "--tempo",
               "validator_stakes_tao": "--validator-stake", "subnet": "--subnet-param"}


def run_cli(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {"tempo": args.tempo} if args.tempo is not None else {}
    try:
        overrides.update(parse_subnet_params(args.subnet_param))
    except ValueError as exc:
        print(json.dumps({"event": "devnet_init_error", "error": str(exc)}), flush=True)
        return 2
    try:  # a bad value is one line naming it (a pydantic error, a bad preset), like every other command
        cfg = BootstrapConfig(miners=args.miners, validators=args.validators, netuid=args.netuid,
                              register_all=not args.no_register,
                              subnet=subnet_params_for(load_hparams(args.hparams), **overrides),
                              validator_stakes_tao=args.validator_stake or None)
    except ValidationError as exc:
        print(json.dumps({"event": "devnet_init_error", "error": config_error(exc, _INIT_FLAGS)}), flush=True)
        return 2
    except ValueError as exc:  # HParamsError: a bad --hparams
        print(json.dumps({"event": "devnet_init_error", "error": str(exc)}), flush=True)
        return 2
    try:
        manifest = init_devnet(args.state, cfg, force=args.force)
    except FileExistsError as exc:
        print(json.dumps({"event": "devnet_init_error", "error": str(exc)}), flush=True)
        return 2
    print(json.dumps({"event": "devnet_initialized", "state": str(args.state), "netuid": manifest.netuid,
                      "wallet_path": manifest.wallet_path, "miners": len(manifest.miners),
                      "validators": len(manifest.validators)}), flush=True)
    return 0
