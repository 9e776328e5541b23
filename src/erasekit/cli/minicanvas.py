"""``erasekit minicanvas``: list the MiniCanvas concepts, or retrain the whole model from scratch."""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("minicanvas", help="the built-in MiniCanvas world: list concepts, retrain")
    mc = p.add_subparsers(dest="minicanvas_command", metavar="SUBCOMMAND")
    concepts = mc.add_parser("concepts", help="list objects and styles with synonyms and super-categories")
    concepts.add_argument("--json", action="store_true", help="machine-readable output")
    concepts.set_defaults(func=run_concepts)
    train = mc.add_parser("train", help="rebuild data, CLIP, VAE, UNet and classifier from scratch")
    train.add_argument("--out", required=True, help="output folder (pipeline/, classifier, training.json)")
    train.add_argument("--seed", type=int, default=0, help="seeds every random number generator")
    train.add_argument("--quick", action="store_true", help="tiny networks and steps: seconds, for tests")
    train.add_argument(
        "--eval-seeds", type=int, default=2, help="seeds per cell for the final check (0: skip)"
    )
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    train.add_argument(
        "--device",
        default="cpu",
        help="where to train: cpu (the shipped weights) or cuda (faster; other numerics)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    train.add_argument(
        "--classifier-only",
        action="store_true",
        help="--out already holds a trained model: re-run only its classifier stage (as the full run would)",
    )
    train.set_defaults(func=run_train)
    check = mc.add_parser("check", help="measure the shipped model's quality bars (classifier, base grid)")
    check.add_argument("--seeds", type=int, default=2, help="seeds per grid cell")
    check.add_argument("--steps", type=int, default=None, help="sampling steps (default: the documented one)")
    check.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the documented one)")
    check.add_argument("--heldout-per-cell", type=int, default=10, help="fresh renders per cell (seed 12345)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=run_check)
    p.set_defaults(func=lambda _: p.print_help() or 2)


def run_concepts(args: argparse.Namespace) -> int:
    from erasekit.minicanvas import concept_table

    table = concept_table()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"template: {table['template']}")
    for kind in ("objects", "styles"):
        print(f"\n{kind}:")
        for row in table[kind]:
            print(f"  {row['name']:<11} {row['category']:<16} synonyms: {', '.join(row['synonyms'])}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import torch

    from erasekit.errors import ErasekitError
    from erasekit.io import output_dir
    from erasekit.minicanvas.build import train_minicanvas
    from erasekit.minicanvas.train import TrainConfig

    if args.eval_seeds < 0 or args.threads < 1:
        raise ErasekitError("--eval-seeds must be >= 0 and --threads >= 1")
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise ErasekitError(
            f"--device {args.device!r} is not available here (cpu, or cuda with a visible GPU)"
        )
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = TrainConfig.quick(args.seed) if args.quick else TrainConfig(seed=args.seed)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {line}", file=sys.stderr, flush=True)

    if args.classifier_only:
        from erasekit.minicanvas.build import rebuild_classifier

        accuracy = rebuild_classifier(args.out, cfg, log=log)
        print(json.dumps({"out": args.out, "classifier_heldout": accuracy}, indent=2))
        return 0

    with output_dir(args.out, overwrite=args.overwrite) as staging:
        record = train_minicanvas(staging, cfg, log=log, eval_seeds=args.eval_seeds, device=args.device)
    print(json.dumps({"out": args.out, "seconds": record["seconds"], "quality": record["quality"]}, indent=2))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import numpy as np
    import torch

    from erasekit.errors import ErasekitError
    from erasekit.minicanvas import load_classifier, load_pipeline
    from erasekit.minicanvas.data import render_set
    from erasekit.minicanvas.quality import default_sampling, evaluate_grid, heldout_accuracy

    if args.seeds < 1 or args.heldout_per_cell < 1:
        raise ErasekitError("--seeds and --heldout-per-cell must be >= 1")
    torch.set_num_threads(2)
    sampling = replace(default_sampling(), **{k: v for k, v in (("steps", args.steps), ("guidance", args.guidance))
                                              if v is not None})  # fmt: skip
    steps, guidance = sampling.steps, sampling.guidance
    classifier = load_classifier()
    heldout = heldout_accuracy(classifier, render_set(args.heldout_per_cell, np.random.default_rng(12345)))
    grid = evaluate_grid(load_pipeline(), classifier, seeds=args.seeds, sampling=sampling)
    report = {
        "classifier_heldout": heldout,
        "base_grid": {"object_accuracy": grid.object_accuracy, "style_accuracy": grid.style_accuracy},
        "images": len(grid.cells),
        "seeds": args.seeds,
        "steps": steps,
        "guidance": guidance,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"classifier on held-out renders: object {heldout['object']:.1f}%, style {heldout['style']:.1f}%")
    print(
        f"base grid ({len(grid.cells)} images, {args.seeds} seeds/cell, {steps} steps, CFG {guidance}): "
        f"object {grid.object_accuracy:.1f}%, style {grid.style_accuracy:.1f}%"
    )
    return 0
