"""``erasekit erase`` and ``erasekit methods``: run a registered method, list methods and their options."""

from __future__ import annotations

import argparse
import dataclasses
import json

from erasekit.cli.options import add_config_flags, add_model_arg, add_out_arg, config_overrides
from erasekit.registry import CONCEPT_TYPES, get_method, list_methods

# Flags the erase command defines itself; never generated from a config.
_OWN = {"concept_type"}


def register(sub: argparse._SubParsersAction) -> None:
    specs = [get_method(name) for name in list_methods()]
    p = sub.add_parser("erase", help="erase concepts with a method; writes a patch directory")
    add_model_arg(p)
    p.add_argument("--concept", action="append", required=True, help="concept to erase (repeat for several)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(s.name for s in specs)}")
    p.add_argument("--preset", default=None, help="named preset of the method (default: the method's own)")
    p.add_argument("--type", dest="concept_type", default="style", choices=CONCEPT_TYPES, help="concept type")
    add_out_arg(p, "patch")
    add_config_flags(p, [s.config_cls for s in specs], skip=_OWN)
    p.set_defaults(func=run_erase)

    m = sub.add_parser("methods", help="list methods, or show one method's options and presets")
    m.add_argument("name", nargs="?", help="a method name")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=run_methods)


def run_erase(args: argparse.Namespace) -> int:
    from erasekit.io import check_output_dir
    from erasekit.models.loading import load
    from erasekit.registry import check_concepts, erase

    check_output_dir(args.out, args.overwrite)
    check_concepts(None, args.concept)
    spec = get_method(args.method)
    overrides = config_overrides(args, spec.config_cls)
    model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
    patch = erase(model, args.concept, args.method, args.preset, args.concept_type, **overrides)
    patch.save(args.out, overwrite=args.overwrite)
    s = patch.summary()
    print(
        f"erased {', '.join(s['concepts'])} with {s['method']} in {s['erase_seconds']:.2f} s: "
        f"{s['tensors']} tensors ({s['parameters']:,} parameters) -> {args.out}"
    )
    return 0


def run_methods(args: argparse.Namespace) -> int:
    if args.name is None:
        rows = [{"name": n, "summary": get_method(n).summary} for n in list_methods()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            width = max(len(r["name"]) for r in rows)
            for r in rows:
                print(f"{r['name']:<{width}}  {r['summary']}")
        return 0
    spec = get_method(args.name)
    fields = [
        {"name": f.name, "default": _default(f), "help": f.metadata.get("help", "")}
        for f in dataclasses.fields(spec.config_cls)
    ]
    info = {
        "name": spec.name,
        "summary": spec.summary,
        "presets": spec.presets,
        "default_preset": spec.default_preset,
        "options": fields,
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{spec.name}: {spec.summary}\npresets: {', '.join(spec.presets)} (default {spec.default_preset})")
    for f in fields:
        print(f"  --{f['name'].replace('_', '-'):<22} {f['help']} [default: {f['default']}]")
    return 0


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
