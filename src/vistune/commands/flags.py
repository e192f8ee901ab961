"""Command-line flags made from the config dataclasses, so a setting is declared once.

Each field becomes `--field-name`: its type comes from the annotation, its `--help` from
the attribute docstring under it (read by docstring-parser, the library jsonargparse uses
for the same purpose), and a `bool` becomes `--name/--no-name`. jsonargparse and tyro were
weighed and not taken: jsonargparse spells flags `--field_name` and booleans `--name true`,
tyro cannot tell a flag left out from one given its default, and our YAML-then-flags merge
(`vistune.train.config.load_config`) needs exactly that.

The shared endpoint settings of a teacher or judge (`ClientConfig`) get the same flags in
`vistune datagen` and `vistune eval`.

Renamed flags follow one rule: a flag is its field's name, and where one command holds two
models the second one's flags all carry its role as a prefix (`eval scienceqa`'s judge:
`--judge-base-url`, `--judge-temperature`, ...; its answering model's are `--temperature`,
`--max-new-tokens` as in `chat`). A name that users may have in scripts stays as an alias
(`aliases`), shown beside the new one in `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Collection
from typing import Any

import docstring_parser

from vistune.commands.flag_types import count, delay, positive_int, seconds, temperature
from vistune.config import ClientConfig
from vistune.errors import VistuneError

CLIENT_FLAGS: dict[str, Callable[[str], Any]] = {
    "temperature": temperature,
    "max_tokens": positive_int,
    "timeout": seconds,
    "http_retries": count,
    "backoff": delay,
}
"""The ClientConfig fields every endpoint command shares, with the check of each value
(argparse's one-line error naming the flag, before any request). The endpoint and the
model name are the command's own flags: their names and defaults depend on the role."""


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring, for every documented field of `cls`."""
    parsed = docstring_parser.parse_from_object(cls)
    return {
        p.arg_name: " ".join(p.description.split())
        for p in parsed.params
        if p.args[0] == "attribute" and p.description
    }


def flag_name(field: str, prefix: str = "") -> str:
    """The flag of a field: `max_new_tokens` -> `--max-new-tokens` (`--judge-...` with a prefix)."""
    return "--" + prefix + field.replace("_", "-")


def _scalar(annotation: Any) -> Any:
    """int, float, str or bool from an annotation such as `int | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return annotation


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    only: Collection[str] | None = None,
    checks: dict[str, Callable[[str], Any]] | None = None,
    given_only: bool = False,
    default_text: dict[str, object] | None = None,
    prefix: str = "",
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """A flag per field of the dataclass `cls` (or per field in `only`).

    A field that is itself a dataclass (TrainConfig's `model`) gives a flag per field of
    its own, named flat (`--projector`, one name per setting), in a group of the `--help`
    described by that field's docstring. `checks` replaces a field's plain type with a checking one. With `given_only` every flag
    defaults to None, so a caller can tell the flags given from those left out (the field's
    own default is shown in the help; `default_text` overrides that text per field).
    `prefix` (`judge-`) goes before every flag and, as `judge_`, before its name in the
    parsed arguments; `aliases` gives a field's old spellings (`--answer-temperature`)."""
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    checks = checks or {}
    for f in dataclasses.fields(cls):
        kind = _scalar(hints[f.name])
        if only is not None and f.name not in only and not dataclasses.is_dataclass(kind):
            continue
        if dataclasses.is_dataclass(kind):
            group = parser
            if isinstance(parser, argparse.ArgumentParser):
                group = parser.add_argument_group(f"{f.name} settings", docs.get(f.name))
            add_dataclass_flags(group, kind, only, checks, given_only, default_text, prefix,
                                aliases)  # fmt: skip
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = (default_text or {}).get(f.name, default)
        text = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%")
        value = None if given_only else default
        flags = (flag_name(f.name, prefix), *(aliases or {}).get(f.name, ()))
        dest = prefix.replace("-", "_") + f.name
        if kind is bool:
            parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction,
                                default=value, help=text)  # fmt: skip
            continue
        if typing.get_origin(kind) is tuple and f.name not in checks:
            # a tuple of values: repeat the flag; None when left out (the field's default)
            item = typing.get_args(kind)[0]
            parser.add_argument(*flags, dest=dest, type=item, action="append", default=None,
                                metavar=f.name.upper(), help=text)  # fmt: skip
            continue
        convert = checks.get(f.name, kind if kind in (int, float) else str)
        parser.add_argument(*flags, dest=dest, type=convert, default=value,
                            metavar=f.name.upper(), help=text)  # fmt: skip


def flag_values(
    args: argparse.Namespace, cls: type, only: Collection[str] | None = None, prefix: str = ""
) -> dict:
    """The values of `cls`'s flags in `args` (those `add_dataclass_flags` made, with the same
    `prefix`), ready for `cls(**values)`: a repeated flag's list as a tuple, one left out
    omitted (the field's default then holds)."""
    values = {}
    dest = prefix.replace("-", "_")
    for f in dataclasses.fields(cls):
        if (only is None or f.name in only) and hasattr(args, dest + f.name):
            value = getattr(args, dest + f.name)
            if isinstance(value, list):
                value = tuple(value)
            if value is not None or f.default is None:
                values[f.name] = value
    return values


def config_from_flags(
    args: argparse.Namespace, cls: type, only: Collection[str] | None = None, prefix: str = ""
) -> Any:
    """`cls` made from its flags in `args` (see `flag_values`). A value its `__post_init__`
    refuses is the user's to fix: a VistuneError (one line, exit 2) whose message names the
    flag instead of the field (`--top-p must be above 0 and at most 1, got 0.0`); the check itself
    stays the dataclass's, its one copy."""
    try:
        return cls(**flag_values(args, cls, only, prefix))
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        if field in {f.name for f in dataclasses.fields(cls)}:
            raise VistuneError(f"{flag_name(field, prefix)} {rest}") from exc
        raise VistuneError(str(exc)) from exc


def add_client_flags(
    parser: argparse.ArgumentParser,
    prefix: str = "",
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """The endpoint settings shared by every teacher and judge (see CLIENT_FLAGS), their
    flags named with `prefix` (`judge-` where the judge is a command's second model)."""
    add_dataclass_flags(parser, ClientConfig, only=CLIENT_FLAGS, checks=CLIENT_FLAGS,
                        prefix=prefix, aliases=aliases)  # fmt: skip


def client_config(
    args: argparse.Namespace, base_url: str, model: str, prefix: str = ""
) -> ClientConfig:
    """The ClientConfig of an endpoint at `base_url` serving `model`, with the shared flags
    (those `add_client_flags` made with the same `prefix`)."""
    return ClientConfig(base_url, model, **flag_values(args, ClientConfig, CLIENT_FLAGS, prefix))
