"""`crucible`: the one command line of the node.

Each subcommand lives in its own module exposing `add_cli(parser)` and `run_cli(args) -> int`; this
file only maps names to modules and imports them lazily, so `crucible --help` stays fast and a
part that has not landed yet says so with exit code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys

from neurons.subcommands import NOT_YET, load_module
from protocol.hparams import HParamsError

# command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "miner": ("neurons.miner_cli", "train and publish compressed pseudo-gradients every window"),
    "validator": ("neurons.validator_cli", "score miners with the Gauntlet and set weights on chain"),
    "devnet": ("devnet.cli", "run a whole network on this machine (chain, S3, miners, validators)"),
    "data": ("neurons.data_cli", "prepare the tokenized dataset; train locally on one process"),
    "bench": ("bench.cli", "benchmarks that print JSON (codec, convergence, validator, storage)"),
    "explain": ("neurons.explain_cli", "show every component of a uid's score from the validator's state"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="crucible", description="Crucible: incentivized distributed LLM pre-training")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        module = load_module(module_name)
        if module is not None:
            module.add_cli(child)
            modules[name] = module
        else:
            child.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser, modules


def with_default_part(argv: list[str]) -> list[str]:
    """`crucible devnet --miners 4 …` means `crucible devnet run --miners 4 …` (run is the devnet's main job)."""
    if len(argv) >= 2 and argv[0] == "devnet" and argv[1].startswith("-") and argv[1] not in ("-h", "--help"):
        return ["devnet", "run", *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(with_default_part(sys.argv[1:] if argv is None else list(argv)))
    if args.command is None:
        parser.print_help()
        return NOT_YET
    module = modules.get(args.command)
    if module is None:
        print(f"crucible {args.command}: not yet available in this version", file=sys.stderr)
        return NOT_YET
    try:
        return int(module.run_cli(args) or 0)
    except HParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
