"""Lazy sub-command groups (`crucible bench ...`, `crucible devnet ...`).

A group maps names to modules exposing `add_arguments(parser)`/`run(args)` (benchmarks, which return
a JSON-able dict) or `add_cli(parser)`/`run_cli(args)` (tools, which return an exit code). A module
that has not landed yet answers "not yet available" with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

NOT_YET = 2


def load_module(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def add_group(parser: argparse.ArgumentParser, dest: str, entries: dict[str, tuple[str, str]],
              required: bool = True) -> None:
    sub = parser.add_subparsers(dest=dest, required=required)
    for name, (module_name, help_text) in entries.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        module = load_module(module_name)
        if module is None:
            child.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        elif hasattr(module, "add_cli"):
            module.add_cli(child)
        else:
            module.add_arguments(child)
            child.add_argument("--json", action="store_true", help="print only the JSON result")
        child.set_defaults(**{f"_{dest}_module": module_name})


def run_group(args: argparse.Namespace, dest: str) -> int:
    module_name = getattr(args, f"_{dest}_module")
    module = load_module(module_name)
    if module is None:
        print(f"crucible: '{getattr(args, dest)}' is not yet available in this version", file=sys.stderr)
        return NOT_YET
    if hasattr(module, "run_cli"):
        return int(module.run_cli(args) or 0)
    result = module.run(args)
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=True))
    return 0
