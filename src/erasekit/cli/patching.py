"""``erasekit apply``, ``export`` and ``import``: use patches with whole pipelines and published formats."""

from __future__ import annotations

import argparse

from erasekit.cli.options import add_model_arg, add_out_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="write a patched pipeline as a diffusers folder (fingerprints checked)")
    add_model_arg(p)
    p.add_argument("--patch", action="append", required=True, help="patch directory (repeat to compose)")
    p.add_argument(
        "--merge", choices=["mean"], default=None, help="how to combine patches that change one tensor"
    )
    add_out_arg(p, "patched model")
    p.set_defaults(func=run_apply)

    e = sub.add_parser("export", help="write one patched component as a full Hugging Face folder")
    add_model_arg(e)
    e.add_argument("--patch", action="append", required=True, help="patch directory (repeat to compose)")
    e.add_argument(
        "--merge", choices=["mean"], default=None, help="how to combine patches that change one tensor"
    )
    e.add_argument("--component", default="text_encoder", help="component to export (default text_encoder)")
    add_out_arg(e, "component folder")
    e.set_defaults(func=run_export)

    i = sub.add_parser("import", help="turn a full component folder into a patch by diffing it with the base")
    add_model_arg(i)
    i.add_argument("--component", default="text_encoder", help="component the folder replaces")
    i.add_argument("--from", dest="source", required=True, help="the edited component folder")
    add_out_arg(i, "patch")
    i.set_defaults(func=run_import)


def _patches(paths: list[str], command: str) -> list:
    """The plain patches at ``paths``; a hooked artifact is refused: a folder of weights cannot hold its hook."""
    from erasekit.errors import ErasekitError
    from erasekit.hooked import HookedPatch, load_erasure

    loaded = [load_erasure(p) for p in paths]
    for path, item in zip(paths, loaded):
        if isinstance(item, HookedPatch):
            raise ErasekitError(
                f"erasekit {command} writes plain weights, and {path} is a hooked artifact (added modules and a "
                "hook that a folder of weights cannot hold): use it with --patch in generate, eval or attack"
            )
    return loaded


def run_apply(args: argparse.Namespace) -> int:
    from erasekit.export import save_patched_model
    from erasekit.io import check_output_dir
    from erasekit.models.loading import load

    check_output_dir(args.out, args.overwrite)
    patches = _patches(args.patch, "apply")
    model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
    save_patched_model(model, patches, args.out, args.merge, args.overwrite)
    print(f"applied {len(patches)} patch(es) to {args.model} -> {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from erasekit.export import export_component
    from erasekit.io import check_output_dir
    from erasekit.models.loading import load
    from erasekit.patch import Patch

    check_output_dir(args.out, args.overwrite)
    patch = Patch.compose(_patches(args.patch, "export"), args.merge)
    model = load(args.model, device=args.device, components=(args.component,), allow_pickle=args.allow_pickle)
    export_component(model, patch, args.component, args.out, args.overwrite)
    print(f"exported patched {args.component} -> {args.out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from erasekit.export import import_component
    from erasekit.io import check_output_dir
    from erasekit.models.loading import load

    check_output_dir(args.out, args.overwrite)
    model = load(args.model, device=args.device, components=(args.component,), allow_pickle=args.allow_pickle)
    patch = import_component(model, args.component, args.source, args.allow_pickle)
    patch.save(args.out, overwrite=args.overwrite)
    print(f"imported {len(patch.tensors)} changed tensor(s) of {args.component} -> {args.out}")
    return 0
