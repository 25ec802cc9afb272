"""`crucible`: the one command line of the node, and the lazy sub-command groups it is made of.

Every command is a target with `add_cli(parser)` (register its flags) and `run_cli(args) -> int`
(run, return the exit code): a module (`"neurons.miner_cli"`) or an object in one
(`"devnet.participant:MINER"`, for two commands that share a module). A group (`crucible`,
`crucible bench`, `crucible devnet`) maps names to targets; its parsers are `LazyParser`s that import
the target the first time they parse or print help, so `crucible --help` imports no command (none of
torch, the SDK or the model) and `crucible bench codec` imports the codec bench alone. A bad setting
(`neurons.flags.FlagError`, a bad hparams override) is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from neurons.flags import FlagError

# command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "miner": ("neurons.miner_cli", "train and publish compressed pseudo-gradients every window"),
    "validator": ("neurons.validator_cli", "score miners with the Gauntlet and set weights on chain"),
    "devnet": ("devnet.cli", "run a whole network on this machine (chain, S3, miners, validators)"),
    "data": ("neurons.data_cli", "prepare the tokenized dataset; train locally on one process"),
    "bench": ("bench.cli", "benchmarks that print JSON (codec, convergence, validator, storage)"),
    "explain": ("neurons.explain_cli", "show every component of a uid's score from the validator's state"),
}
USAGE_ERROR = 2


class Command(Protocol):
    def add_cli(self, parser: argparse.ArgumentParser) -> Any: ...

    def run_cli(self, args: argparse.Namespace) -> int: ...


def load(target: str) -> Command:
    """The command a target names: `package.module` or `package.module:ATTRIBUTE`."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


class LazyParser(argparse.ArgumentParser):
    """A sub-command's parser whose flags its target adds on first use (parse or help)."""

    target: str | None = None
    _loaded = False

    def _load(self) -> None:
        if self.target is not None and not self._loaded:
            self._loaded = True
            load(self.target).add_cli(self)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()

    def format_usage(self) -> str:
        self._load()
        return super().format_usage()


def add_group(parser: argparse.ArgumentParser, dest: str, entries: dict[str, tuple[str, str]],
              required: bool = True) -> None:
    """One sub-command per entry (name -> (target, help)); `run_group(args, dest)` runs the chosen one."""
    sub = parser.add_subparsers(dest=dest, required=required, parser_class=LazyParser,
                                metavar="{" + ",".join(entries) + "}")
    for name, (target, help_text) in entries.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        child.target = target
        # the deepest chosen parser's prog ("crucible devnet run") prefixes error messages
        child.set_defaults(**{f"_{dest}_target": target, "_prog": child.prog})


def run_group(args: argparse.Namespace, dest: str) -> int:
    return int(load(getattr(args, f"_{dest}_target")).run_cli(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crucible", description="Crucible: incentivized distributed LLM pre-training")
    add_group(parser, "command", COMMANDS, required=False)
    return parser


def with_default_part(argv: list[str]) -> list[str]:
    """`crucible devnet --miners 4 …` means `crucible devnet run --miners 4 …` (run is the devnet's main job)."""
    if len(argv) >= 2 and argv[0] == "devnet" and argv[1].startswith("-") and argv[1] not in ("-h", "--help"):
        return ["devnet", "run", *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(with_default_part(sys.argv[1:] if argv is None else list(argv)))
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    from protocol.hparams import HParamsError  # after parsing: `--help` needs none of protocol/

    try:
        return run_group(args, "command")
    except FlagError as exc:
        print(f"{args._prog}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except HParamsError as exc:
        print(f"{args._prog}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
