"""Command-line flags generated from config dataclasses, and the flags several subcommands share.

Method configs (``erasekit erase``), protocol configs (``erasekit eval``) and :class:`~erasekit.generation.Sampling`
all become ``--field-name VALUE`` flags the same way; values are converted to the field's type when used.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.overrides import convert, type_hints

CONFIG_PREFIX = "cfg_"
SAMPLING_PREFIX = "sampling_"


def field_flags(config_classes: list[type], skip: set[str]) -> dict[str, dataclasses.Field]:
    """The first field of each name across ``config_classes`` (flags are shared between entries)."""
    fields: dict[str, dataclasses.Field] = {}
    for cls in config_classes:
        for f in dataclasses.fields(cls):
            if f.name not in skip and f.init:
                fields.setdefault(f.name, f)
    return fields


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_classes: list[type],
    skip: set[str] = frozenset(),
    title: str = "method options (see `erasekit methods NAME`)",
    prefix: str = CONFIG_PREFIX,
) -> None:
    """Add ``--field-name VALUE`` for every config field (default ``None``: the config's own default)."""
    group = parser.add_argument_group(title)
    for name, f in sorted(field_flags(config_classes, set(skip)).items()):
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"{prefix}{name}",
            default=None,
            metavar="V",
            help=f.metadata.get("help", ""),
        )


def config_overrides(
    args: argparse.Namespace, config_cls: type, what: str = "this method", prefix: str = CONFIG_PREFIX
) -> dict[str, Any]:
    """The config fields the user set on the command line, converted to ``config_cls``'s field types."""
    hints = type_hints(config_cls)
    out: dict[str, Any] = {}
    for key, raw in vars(args).items():
        if not key.startswith(prefix) or raw is None:
            continue
        name = key.removeprefix(prefix)
        if name not in hints:
            raise ErasekitError(f"option --{name.replace('_', '-')} does not apply to {what}")
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


def add_patch_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--patch P`` (repeatable) and ``--merge``."""
    parser.add_argument(
        "--patch", action="append", required=required, default=None if required else [],
        help="patch or hooked-artifact directory (repeat to compose)",
    )  # fmt: skip
    parser.add_argument(
        "--merge", choices=["mean"], default=None, help="how to combine patches that change one tensor"
    )


def load_patches(args: argparse.Namespace) -> list[Any]:
    """Every ``--patch``, of either artifact kind (a Patch or a hooked artifact)."""
    from erasekit.hooked import load_erasure

    return [load_erasure(p) for p in args.patch or []]


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~erasekit.generation.Sampling` field; the model's defaults fill the rest."""
    from erasekit.generation import Sampling

    add_config_flags(parser, [Sampling], title="sampling (default: the model's own steps and guidance)",
                     prefix=SAMPLING_PREFIX)  # fmt: skip


def sampling_from(args: argparse.Namespace, model: Any) -> Any:
    """The model's default sampling with the flags the user set."""
    from erasekit.generation import Sampling

    return Sampling.for_model(model, **config_overrides(args, Sampling, "sampling", SAMPLING_PREFIX))


def add_classifier_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classifier",
        default=None,
        help="two-head classifier folder for styles/objects (default: MiniCanvas)",
    )


def classifier_from(args: argparse.Namespace) -> Any:
    """The classifier ``--classifier`` names, or ``None`` (the built-in one, loaded where it is used)."""
    if args.classifier is None:
        return None
    from erasekit.evaluation.classifiers import load_classifier

    return load_classifier(args.classifier, device=args.device)


def check_positive_flags(args: argparse.Namespace, *names: str) -> None:
    """A one-line error for the first of ``names`` that the user set below 1."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ErasekitError(f"--{name.replace('_', '-')} must be at least 1")
