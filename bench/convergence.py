"""`crucible bench convergence`: SparseLoCo vs DiLoCo vs data-parallel AdamW on equal tokens.

Does the network's optimizer give up loss for uploads two orders of magnitude smaller? K simulated
peers train the preset's model (tiny by default) on the offline corpus, in one process; every method
consumes exactly the same pages (`assign` per peer and window). The result is the held-out loss curve
of each method's global model (a fixed set of held-out pages, evaluated after every window), its final
value, and the bytes one peer sends per window: SparseLoCo a real signed shard (`write_shard`), DiLoCo
the dense fp32 pseudo-gradient, data-parallel AdamW H dense fp32 gradients (all-reduce at 1× payload).
The bar: SparseLoCo's final held-out loss within 5 % of DiLoCo's.

The headline uses the preset's hyperparameters; `--outer-lr` and `--set` exist to explore, and every
value used is echoed under `settings`. The methods themselves live in `bench.convergence_methods`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from bittensor.sp_core import Keypair

from bench.cli import add_json_flag, print_json
from bench.convergence_methods import METHODS, MethodResult, Settings, Workload
from neurons.corpus import stdlib_documents
from neurons.dataset import prepare_dataset
from protocol.data import PageStore, assign
from protocol.hparams import HParams, load_hparams
from protocol.model import param_shapes

QUICK = {"peers": 2, "windows": 10}
FULL = {"peers": 4, "windows": 30}
LOSS_BAR = 1.05  # SparseLoCo's final held-out loss may be at most 5 % above DiLoCo's


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    parser.add_argument("--preset", default="tiny", help="hparams preset or TOML/JSON file (default tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one hyperparameter for this bench only (repeatable; not the headline)")
    parser.add_argument("--data", default=None,
                        help="prepared dataset folder; prepared there from the offline corpus if it has no "
                             "index.json (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help=f"short run: {QUICK['peers']} peers × {QUICK['windows']} windows")
    parser.add_argument("--peers", type=int, default=None,
                        help=f"simulated peers K (default {FULL['peers']}, quick {QUICK['peers']})")
    parser.add_argument("--windows", type=int, default=None,
                        help=f"training windows (default {FULL['windows']}, quick {QUICK['windows']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the peers' identities (so their data)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--heldout-pages", type=int, default=64, help="held-out pages evaluated every window")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default all)")
    parser.add_argument("--outer-lr", type=float, default=None,
                        help="SparseLoCo outer step size, to explore (default: the preset's outer.lr)")
    parser.add_argument("--diloco-lr", type=float, default=0.7, help="DiLoCo outer Nesterov SGD step size")
    parser.add_argument("--diloco-momentum", type=float, default=0.9, help="DiLoCo outer Nesterov momentum")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the loss curves")
    parser.add_argument("--progress", action="store_true", help="print each window's held-out loss to stderr")


def _store(hp: HParams, data: str | None, scratch: Path) -> PageStore:
    folder = Path(data) if data else scratch / "data"
    if not (folder / "index.json").is_file():
        prepare_dataset(hp, folder, list(stdlib_documents(hp.data.corpus_max_chars)))
    return PageStore(folder, hp)


def _workload(hp: HParams, store: PageStore, peers: int, windows: int, seed: int, heldout_pages: int,
              device: torch.device) -> Workload:
    keypairs = {}
    for i in range(peers):
        kp = Keypair.create_from_uri(f"//crucible-bench-convergence-{seed}-{i}")
        keypairs[kp.ss58_address] = kp
    n = hp.samples_per_window
    if n > store.num_train:
        raise ValueError(f"dataset has {store.num_train} train pages, a peer needs {n} per window")
    indices = [{peer: assign(peer, w, hp.data.seed, n, store.num_train) for peer in keypairs}
               for w in range(windows)]
    samples = [{peer: store.pages(idx) for peer, idx in per_peer.items()} for per_peer in indices]
    heldout = store.pages(range(min(heldout_pages, store.num_heldout)), split="heldout")
    return Workload(hp, device, keypairs, samples, indices, heldout, seed)


def _method_json(result: MethodResult) -> dict:
    per_window = result.bytes_per_window
    return {
        "final_heldout_loss": round(result.final, 5),
        "curve": [round(v, 5) for v in result.curve],
        "train_curve": [round(v, 5) for v in result.train_curve],
        "bytes_per_peer_per_window": round(sum(per_window) / len(per_window)) if per_window else 0,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 2),
    }


def plot_curves(path: str | Path, methods: dict[str, dict], tokens_per_window: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in methods.items():
        curve = entry["curve"]
        xs = [w * tokens_per_window for w in range(len(curve))]
        ax.plot(xs, curve, marker="o", markersize=3, label=f"{name} ({curve[-1]:.3f})")
    ax.set_xlabel("training tokens (all peers)")
    ax.set_ylabel("held-out loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(2)
    hp = load_hparams(getattr(args, "preset", "tiny"), overrides=list(getattr(args, "overrides", []) or []))
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    base = QUICK if args.quick else FULL
    peers = int(args.peers if args.peers is not None else base["peers"])
    windows = int(args.windows if args.windows is not None else base["windows"])
    if peers < 1 or windows < 1:
        raise ValueError("--peers and --windows must be at least 1")
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not chosen:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    settings = Settings(
        outer_lr=hp.outer.lr if args.outer_lr is None else float(args.outer_lr),
        diloco_lr=float(args.diloco_lr), diloco_momentum=float(args.diloco_momentum),
    )
    torch.manual_seed(int(args.seed))

    def progress(method: str, window: int, loss: float) -> None:
        if getattr(args, "progress", False):
            print(f"{method:>10} window {window + 1:3d}/{windows}: held-out loss {loss:.4f}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="crucible-bench-conv-") as scratch:
        store = _store(hp, args.data, Path(scratch))
        work = _workload(hp, store, peers, windows, int(args.seed), int(args.heldout_pages), device)
        results = {m: METHODS[m](work, settings, progress) for m in METHODS if m in chosen}
        data_info = {"dataset_train_pages": store.num_train, "dataset_heldout_pages": store.num_heldout}

    tokens = {m: r.tokens for m, r in results.items()}
    if len(set(tokens.values())) != 1:
        raise RuntimeError(f"bench convergence: methods consumed different token counts {tokens}")
    methods = {m: _method_json(r) for m, r in results.items()}
    first = next(iter(results.values()))
    params = sum(math.prod(shape) for shape in param_shapes(hp).values())
    out: dict = {
        "preset": hp.name,
        "revision": hp.revision(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "initial_heldout_loss": round(first.curve[0], 5),
        "tokens_per_method": first.tokens,
        "methods": methods,
        "settings": {
            "peers": peers, "windows": windows, "quick": bool(args.quick), "seed": int(args.seed),
            "inner_steps": hp.inner.steps, "batch_size": hp.inner.batch_size, "seq_len": hp.model.seq_len,
            "inner_lr": hp.inner.lr, "outer_lr": settings.outer_lr, "preset_outer_lr": hp.outer.lr,
            "error_decay": hp.sparseloco.error_decay, "topk": hp.sparseloco.topk,
            "diloco_lr": settings.diloco_lr, "diloco_momentum": settings.diloco_momentum,
            "heldout_pages": len(work.heldout), "overrides": list(getattr(args, "overrides", []) or []),
            "params": params, "dense_fp32_bytes": 4 * params, **data_info,
        },
    }
    if "sparseloco" in methods and "diloco" in methods:
        sl, dl = methods["sparseloco"], methods["diloco"]
        ratio = sl["final_heldout_loss"] / dl["final_heldout_loss"]
        compression = dl["bytes_per_peer_per_window"] / sl["bytes_per_peer_per_window"]
        out["compression_vs_diloco"] = round(compression, 2)
        out["sparseloco_vs_diloco_loss_ratio"] = round(ratio, 4)
        out["within_5pct_of_diloco"] = ratio <= LOSS_BAR
    if getattr(args, "plot", None):
        title = (f"{hp.name}: {peers} peers × {windows} windows × H={hp.inner.steps}, "
                 f"{first.tokens:,} tokens per method")
        plot_curves(args.plot, methods, first.tokens // windows, title)
        out["plot"] = str(args.plot)
    return out


def run_cli(args: argparse.Namespace) -> int:
    return print_json(benchmark(args), args)
