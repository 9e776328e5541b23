"""Command-line flags generated from method config dataclasses, and shared argument helpers."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from typing import Any

from erasekit.errors import ErasekitError

CONFIG_PREFIX = "cfg_"


def field_flags(config_classes: list[type], skip: set[str]) -> dict[str, dataclasses.Field]:
    """The first field of each name across ``config_classes`` (flags are shared between methods)."""
    fields: dict[str, dataclasses.Field] = {}
    for cls in config_classes:
        for f in dataclasses.fields(cls):
            if f.name not in skip and f.init:
                fields.setdefault(f.name, f)
    return fields


def add_config_flags(parser: argparse.ArgumentParser, config_classes: list[type], skip: set[str]) -> None:
    """Add ``--field-name VALUE`` for every config field; values are converted per method when used."""
    group = parser.add_argument_group("method options (see `erasekit methods NAME`)")
    for name, f in sorted(field_flags(config_classes, skip).items()):
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"{CONFIG_PREFIX}{name}",
            default=None,
            metavar="V",
            help=f.metadata.get("help", ""),
        )


def config_overrides(args: argparse.Namespace, config_cls: type) -> dict[str, Any]:
    """The config fields the user set on the command line, converted to ``config_cls``'s field types."""
    hints = type_hints(config_cls)
    out: dict[str, Any] = {}
    for key, raw in vars(args).items():
        if not key.startswith(CONFIG_PREFIX) or raw is None:
            continue
        name = key.removeprefix(CONFIG_PREFIX)
        if name not in hints:
            raise ErasekitError(f"option --{name.replace('_', '-')} does not apply to this method")
        out[name] = convert(raw, hints[name], name)
    return out


@functools.cache
def type_hints(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def convert(raw: str, hint: Any, name: str) -> Any:
    """Parse a command-line string as ``hint`` (int, float, bool, str, tuples, ``X | None``)."""
    origin, targs = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin in (types.UnionType, typing.Union):
            if raw.lower() == "none" and type(None) in targs:
                return None
            return convert(raw, next(a for a in targs if a is not type(None)), name)
        if origin is tuple:
            inner = targs[0] if targs else str
            return tuple(convert(p.strip(), inner, name) for p in raw.split(",") if p.strip())
        if origin is typing.Literal:
            if raw not in targs:
                raise ValueError(f"choose one of {', '.join(map(str, targs))}")
            return raw
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(raw)
    except ValueError as e:
        raise ErasekitError(f"bad value {raw!r} for --{name.replace('_', '-')}: {e}") from None
    return raw


def add_model_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model",
        required=required,
        help="a diffusers folder, a Hub id, or 'minicanvas' (the embedded model)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device for the work (runtime only; default cpu)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickled .bin/.ckpt weights (unsafe: they can run code)",
    )


def add_out_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", required=True, help=f"output directory for the {what}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
