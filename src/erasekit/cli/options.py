"""Command-line flags generated from method config dataclasses, and shared argument helpers."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.typed import convert, type_hints

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
