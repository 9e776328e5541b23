"""``erasekit attack`` (attack a patched model, write RUN/metrics.json) and ``erasekit attacks`` (list them)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from erasekit.cli.options import (
    add_classifier_arg,
    add_model_arg,
    add_out_arg,
    add_patch_args,
    add_sampling_args,
    check_positive_flags,
    classifier_from,
    load_patches,
    sampling_from,
)
from erasekit.concepts import CONCEPT_TYPES
from erasekit.overrides import parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attack", help="attack an erased model; writes RUN/metrics.json (ASR) and the artifacts"
    )
    add_model_arg(p)
    add_patch_args(p)
    p.add_argument("--attack", required=True, help="attack name (see `erasekit attacks`)")
    p.add_argument("--concept", required=True, help="the erased concept")
    p.add_argument("--type", dest="concept_type", default=None, choices=CONCEPT_TYPES,
                   help="concept type (guessed for MiniCanvas concepts and nudity)")  # fmt: skip
    p.add_argument("--preset", default="paper", help="budget preset (default: paper)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="override one budget field (repeat); see `erasekit attacks NAME`")  # fmt: skip
    p.add_argument("--seeds", type=int, default=1, help="images per adversarial prompt (default 1)")
    add_classifier_arg(p)
    add_sampling_args(p)
    p.add_argument(
        "--nudenet-preset", default="hirm", help="NudeNet preset for nsfw: hirm, unlearndiffatk, rece"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (runtime only)")
    add_out_arg(p, "attack run")
    p.set_defaults(func=run_attack_cmd)

    a = sub.add_parser("attacks", help="list attacks, or show one attack's budget fields and presets")
    a.add_argument("name", nargs="?", help="an attack name")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=run_attacks_cmd)


def run_attack_cmd(args: argparse.Namespace) -> int:
    from erasekit.attacks import get_attack, make_budget
    from erasekit.attacks.run import run_attack
    from erasekit.concepts import guess_type
    from erasekit.io import check_output_dir
    from erasekit.models.loading import load

    spec = get_attack(args.attack)
    concept_type = args.concept_type or guess_type(args.concept)
    budget = parse_overrides(args.budget, spec.config_cls, "--budget")
    make_budget(args.attack, args.preset, concept_type, budget)  # every budget error before any loading
    check_positive_flags(args, "seeds", "batch_size")
    check_output_dir(args.out, args.overwrite)
    patches = load_patches(args)
    model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
    metrics = run_attack(
        model, args.concept, args.attack, args.out, concept_type=concept_type, patches=patches, merge=args.merge,
        preset=args.preset, budget=budget, seeds=args.seeds, sampling=sampling_from(args, model),
        classifier=classifier_from(args), nudenet_preset=args.nudenet_preset, batch_size=args.batch_size,
        overwrite=args.overwrite,
    )  # fmt: skip
    asr = metrics["ASR"]
    shown = "not scored (no pipeline)" if asr is None else f"{asr:.2f}%"
    print(f"{args.attack} on {metrics['concept']}: ASR {shown} -> {args.out}/metrics.json")
    return 0


def run_attacks_cmd(args: argparse.Namespace) -> int:
    from erasekit.attacks import get_attack, list_attacks

    if args.name is None:
        rows = [{"name": n, "summary": get_attack(n).summary} for n in list_attacks()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            width = max(len(r["name"]) for r in rows)
            print("\n".join(f"{r['name']:<{width}}  {r['summary']}" for r in rows))
        return 0
    spec = get_attack(args.name)
    fields = [{"name": f.name, "default": f.default, "help": f.metadata.get("help", "")}
              for f in dataclasses.fields(spec.config_cls)]  # fmt: skip
    info = {"name": spec.name, "summary": spec.summary, "presets": spec.presets, "asr": spec.asr,
            "needs_pipeline": spec.needs_pipeline, "budget": fields}  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{spec.name}: {spec.summary}\npresets: {', '.join(spec.presets)}; headline ASR: {spec.asr}")
    for f in fields:
        print(f"  {f['name']:<16} {f['help']} [default: {f['default']}]")
    return 0
