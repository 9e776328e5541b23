"""Typed values from text: ``KEY=VALUE`` overrides of a config dataclass's fields (command line, budgets)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from erasekit.errors import ErasekitError


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


def parse_overrides(items: list[str], config_cls: type, flag: str = "--budget") -> dict[str, Any]:
    """``["key=value", ...]`` -> overrides of ``config_cls``'s fields, each converted to the field's type.

    ``flag`` names the option in error messages. A dash in a key is read as an underscore.
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, (_, sep, raw) = override_key(item), item.partition("=")
        if not sep or not key:
            raise ErasekitError(f"{flag} takes KEY=VALUE, not {item!r}")
        if key not in fields:
            raise ErasekitError(f"unknown budget key {key!r}; known: {', '.join(sorted(fields))}")
        out[key] = convert(raw.strip(), type_hints(config_cls)[key], key)
    return out


def override_key(item: str) -> str:
    """The field a ``KEY=VALUE`` item names (a dash read as an underscore)."""
    return item.partition("=")[0].strip().replace("-", "_")
