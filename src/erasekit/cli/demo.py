"""``erasekit demo``: the main job. Erase one MiniCanvas concept, evaluate before and after, write a report."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="erase a MiniCanvas style with HiRM, evaluate before/after, write a report"
    )
    p.add_argument(
        "--model", default="minicanvas", help="a MiniCanvas-format model (default: the embedded one)"
    )
    p.add_argument("--concept", default="sketch", help="the MiniCanvas style or object to erase")
    p.add_argument("--method", default="hirm-r", help="the erasure method (see `erasekit methods`)")
    p.add_argument("--preset", default=None, help="the method's preset (default: the method's default)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid cell (the quality bars use 2)")
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps (MiniCanvas default when omitted)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (runtime only)")
    p.add_argument("--out", default="erasekit-demo", help="output directory (default ./erasekit-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from erasekit.demo import run

    result = run(
        model=args.model, concept=args.concept, method=args.method, preset=args.preset, seeds=args.seeds,
        steps=args.steps, batch_size=args.batch_size, out=args.out, overwrite=args.overwrite,
    )  # fmt: skip
    print(result.summary())
    return 0
