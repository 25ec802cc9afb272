"""Command-line flags generated from a pydantic model, and the model built back from the parsed flags.

A config model (`NodeConfig`, `DevnetConfig`) is the one place where a setting's type, default,
bounds and description live; `Flags` turns its fields into argparse flags and the parsed Namespace
back into a validated model, so no default is written twice and every check runs in pydantic.

Spelling: a field `state_dir` is `--state-dir`; a field of a nested model `metrics.port` is
`--metrics.port` and `bucket.read_key` is `--bucket.read-key`. `names` gives a field other
spellings (bittensor's `--wallet.name`, `--subtensor.network`; the first one is the one error
messages use); `switches` adds value-less flags that set a field to a constant (bittensor's
`--logging.debug` sets `log_level`). A nested model that is a pydantic-settings `BaseSettings`
falls back to environment variables by itself (its `env_prefix` + field name, read when the model is
built, so a secret need never be on argv); its flags' help names the variable. Booleans get
`--x/--no-x`; lists are repeatable flags.

Flags are registered with `default=SUPPRESS`: a flag that is not given leaves no attribute on the
Namespace, and the model's own default applies. Values stay strings until pydantic converts them, so a
bad value is one line naming the flag (`--netuid: Input should be a valid integer, ...`) instead of
argparse's usage dump.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)


class FlagError(ValueError):
    """A config built from flags is invalid; the message is one line naming the flag."""


def config_error(exc: ValidationError, flag_of: Mapping[str, str] | None = None) -> str:
    """The first validation error as one line: `field: message` (`--flag: message` when `flag_of`
    knows the field's path)."""
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    message = first["msg"].removeprefix("Value error, ")
    where = ".".join(loc)
    for cut in range(len(loc), 0, -1):  # the deepest path with a flag: a list item names its list's flag
        if flag_of and ".".join(loc[:cut]) in flag_of:
            where = flag_of[".".join(loc[:cut])]
            break
    return f"{where}: {message}" if where else message


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return " (required)"
    if info.description and "(default" in info.description:
        return ""
    value = info.get_default(call_default_factory=True)
    if value is None or value == [] or isinstance(value, bool):
        return ""  # booleans show both spellings; None and [] mean "not set"
    return f" (default: {value})"


@dataclass(frozen=True)
class Flags(Generic[M]):
    """The command line of one config model: spellings, environment fallbacks and metavars by field path."""

    model: type[M]
    names: Mapping[str, Sequence[str]] = field(default_factory=dict)
    metavars: Mapping[str, str] = field(default_factory=dict)
    switches: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # path -> {flag: value}

    def fields(self) -> Iterator[tuple[str, FieldInfo, str | None]]:
        """(path, field, group) of every leaf field; group is the nested model's path, None at the top."""

        def walk(model: type[BaseModel], prefix: str, group: str | None) -> Iterator[tuple[str, FieldInfo, str | None]]:
            for name, info in model.model_fields.items():
                path = f"{prefix}{name}"
                nested = _nested_model(info.annotation)
                if nested is not None:
                    yield from walk(nested, f"{path}.", path)
                else:
                    yield path, info, group

        return walk(self.model, "", None)

    def spellings(self, path: str) -> list[str]:
        if path in self.names:
            return list(self.names[path])
        return ["--" + path.replace("_", "-")]

    def env_var(self, path: str) -> str | None:
        """The environment variable a field falls back to: its model is a `BaseSettings` with an env_prefix."""
        parent, _, leaf = path.rpartition(".")
        model = self._model_at(parent) if parent else self.model
        prefix = model.model_config.get("env_prefix") if hasattr(model, "settings_customise_sources") else None
        return f"{prefix}{leaf}".upper() if prefix else None

    @property
    def env(self) -> dict[str, str]:
        """Field path -> its environment variable, for every field that has one."""
        return {path: var for path, _, _ in self.fields() if (var := self.env_var(path))}

    def flag_of(self) -> dict[str, str]:
        """Field path -> the flag that error messages name."""
        return {path: self.spellings(path)[0] for path, _, _ in self.fields()}

    def add_to(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Register one flag per leaf field; nested models become argument groups."""
        groups: dict[str | None, Any] = {None: parser}
        for path, info, group in self.fields():
            if group not in groups:
                doc = (self._model_at(group).__doc__ or "").strip().splitlines()
                groups[group] = parser.add_argument_group(f"{group}: {doc[0]}" if doc else group)
            names = self.spellings(path)
            help_text = (info.description or "").rstrip(".") + _default_text(info)
            if env := self.env_var(path):
                help_text += f" [${env}]"
            options: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS,
                                       "help": help_text.replace("%", "%%")}
            if info.annotation is bool:
                options["action"] = argparse.BooleanOptionalAction
            else:
                if typing.get_origin(info.annotation) is list:
                    options["action"] = "append"
                options["metavar"] = self.metavars.get(path) or names[0].lstrip("-").split(".")[-1].upper().replace("-", "_")
            groups[group].add_argument(*names, **options)
            for flag, const in self.switches.get(path, {}).items():
                groups[group].add_argument(flag, dest=path, action="store_const", const=const,
                                           default=argparse.SUPPRESS, help=f"same as {names[0]} {const}")
        return parser

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The nested dict of the flags given (environment fallbacks are the settings models' own)."""
        out: dict[str, Any] = {}
        given = vars(args)
        for path, _, _ in self.fields():
            *parents, leaf = path.split(".")
            node = out
            for part in parents:  # nested models always present, so their own required fields are reported
                node = node.setdefault(part, {})
            if path in given:
                node[leaf] = given[path]
        return out

    def parse(self, args: argparse.Namespace) -> M:
        """The validated model; FlagError with one line naming the flag otherwise."""
        try:
            return self.model.model_validate(self.values(args))
        except ValidationError as exc:
            raise FlagError(config_error(exc, self.flag_of())) from None

    def argv(self, config: M) -> list[str]:
        """A command line that parses back to `config`: defaults, None and secrets (SecretStr) left out,
        so a caller passes those through the environment instead."""
        out: list[str] = []
        for path, info, _ in self.fields():
            value: Any = config
            for part in path.split("."):
                value = getattr(value, part)
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            if value is None or isinstance(value, SecretStr) or (not info.is_required() and value == default):
                continue
            flag = self.spellings(path)[0]
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + flag.removeprefix("--"))
            elif isinstance(value, list):
                out += [f"{flag}={item}" for item in value]
            else:
                out += [flag, str(value)]
        return out

    def _model_at(self, path: str) -> type[BaseModel]:
        model: type[BaseModel] = self.model
        for part in path.split("."):
            nested = _nested_model(model.model_fields[part].annotation)
            assert nested is not None, path
            model = nested
        return model
