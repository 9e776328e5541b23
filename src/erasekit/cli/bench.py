"""``erasekit bench``: run methods over sampled MiniCanvas concepts; write the leaderboard and an HTML report."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

from erasekit.cli.options import add_classifier_arg, add_model_arg, classifier_from
from erasekit.errors import ErasekitError

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="the MiniCanvas leaderboard: methods x concepts, means and spreads")
    add_model_arg(p)
    p.add_argument("--methods", required=True,
                   help="comma-separated entries: method, method:preset, or a stack a+b (e.g. hirm-r+uce); with "
                        "--sweep, method names: each gets a paper and a tuned row")  # fmt: skip
    p.add_argument("--sweep", action="store_true",
                   help="the protocol: split the 24 concepts into dev and test, sweep each method's strength knob on "
                        "dev, choose its tuned setting by the rule, report paper and tuned rows on test")  # fmt: skip
    p.add_argument("--split-seed", type=int, default=0, help="seed of the dev/test split (with --sweep)")
    p.add_argument("--stacks", default=None,
                   help="with --sweep: comma-separated stacks a+b, their parts at tuned unless a preset is named")  # fmt: skip
    p.add_argument("--presets", default=None,
                   help="comma-separated presets: one row per preset a method has (for methods named alone)")  # fmt: skip
    p.add_argument(
        "--concepts", default=None, help="comma-separated styles and objects (default: sample them)"
    )
    p.add_argument("--n-styles", type=int, default=3, help="styles to sample when --concepts is not given")
    p.add_argument("--n-objects", type=int, default=3, help="objects to sample when --concepts is not given")
    p.add_argument("--seed", type=int, default=0, help="seed of the concept sampling")
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid cell in every evaluation")
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps (MiniCanvas default when omitted)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per pipeline call (runtime only)")
    add_classifier_arg(p)
    p.add_argument("--attacks", default=None,
                   help="comma-separated attacks (name or name:preset) run on every cell's patch: ASR columns")  # fmt: skip
    p.add_argument("--attack-budget", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                   help="budget override for every listed attack that has the field, or only for attack NAME "
                        "(repeatable)")  # fmt: skip
    p.add_argument("--attack-seeds", type=int, default=2, help="images per adversarial candidate")
    p.add_argument("--eraseeval", action="store_true",
                   help="add the EraseEval column: the eraseeval protocol (its default options) on every cell's "
                        "patch, its combined score x 100")  # fmt: skip
    p.add_argument("--not-run", action="append", default=[], metavar="ENTRY=REASON",
                   help="show ENTRY as 'not run: REASON' instead of running it (repeatable)")  # fmt: skip
    p.add_argument("--shard", default="1/1", metavar="K/N",
                   help="run only every N-th concept from the K-th (runtime only: N processes fill one --out)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (runtime only; 1 is fastest for MiniCanvas on a busy machine)")  # fmt: skip
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: rewrite leaderboard.md and report.html from the finished cells")  # fmt: skip
    p.add_argument("--out", required=True, help="leaderboard directory (an unfinished one is resumed)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="a results copy (cells, costs and tables; no images or patches): its finished cells are "
                        "taken first, and --out's are written back at the end (small enough to commit)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="delete an existing leaderboard at --out first")
    p.set_defaults(func=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    if args.sweep:
        return run_protocol_command(args)
    from erasekit.bench import BenchSettings, parse_entries, run_bench

    not_run = {parse_entries([k])[0].label: v for k, v in _not_run(args.not_run).items()}
    entries = parse_entries(_split(args.methods), _split(args.presets))
    entries += [e for e in parse_entries(list(not_run)) if e not in entries]
    concepts, seed = _concepts(args)
    attacks = _columns(args)
    shard = _shard(args.shard)
    model = _bench_model(args)
    board = run_bench(
        model, args.out, entries, concepts, settings=BenchSettings(seeds=args.seeds, steps=args.steps),
        classifier=classifier_from(args), batch_size=args.batch_size, not_run=not_run, concept_seed=seed,
        command=_command(args), overwrite=args.overwrite, shard=shard, run=not args.table_only, log=_log,
        attacks=attacks, results=args.results,
    )  # fmt: skip
    missing = board.missing()
    print(f"leaderboard: {args.out}/leaderboard.md, report: {args.out}/report.html"
          + (f" (partial: {len(missing)} cell(s) missing)" if missing else ""))  # fmt: skip
    return 1 if missing else 0


def _bench_model(args: argparse.Namespace) -> LoadedModel:
    """Check the flags both bench forms share, set the thread count and load the model (a full pipeline)."""
    from erasekit.bench.layout import check_overwrite
    from erasekit.models.loading import load

    if args.table_only and args.overwrite:
        raise ErasekitError("--table-only reads the finished cells; --overwrite would delete them")
    check_overwrite(args.overwrite, args.results)  # before the model loads, which takes a while
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
    if model.pipeline is None:
        raise ErasekitError(f"bench needs a full pipeline; {args.model} has only text encoders")
    return model


def run_protocol_command(args: argparse.Namespace) -> int:
    from erasekit.bench import BenchSettings
    from erasekit.bench.leaderboard import run_leaderboard
    from erasekit.bench.protocol import split_concepts
    from erasekit.registry import METHODS

    methods = [METHODS.get(m).name for m in _split(args.methods)]
    if any(":" in m or "+" in m for m in _split(args.methods)):
        raise ErasekitError("with --sweep, --methods takes method names; put stacks in --stacks")
    if args.concepts or args.presets:
        raise ErasekitError("--sweep chooses the concepts (the split) and the presets (paper, tuned) itself")
    attacks = _columns(args)
    shard = _shard(args.shard)
    model = _bench_model(args)
    result = run_leaderboard(
        model, args.out, methods, split_concepts(args.split_seed),
        settings=BenchSettings(seeds=args.seeds, steps=args.steps), stacks=_split(args.stacks), attacks=attacks,
        classifier=classifier_from(args), batch_size=args.batch_size, not_run=_not_run(args.not_run),
        command=_command(args), overwrite=args.overwrite, shard=shard, run=not args.table_only, log=_log,
        results=args.results,
    )  # fmt: skip
    missing = result.test.missing() + result.sweep.missing()
    print(f"leaderboard: {args.out}/leaderboard.md, report: {args.out}/report.html"
          + (f" (partial: {len(missing)} cell(s) missing)" if missing else ""))  # fmt: skip
    return 1 if missing else 0


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def _not_run(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        entry, sep, reason = item.partition("=")
        if not sep or not entry.strip() or not reason.strip():
            raise ErasekitError(f"--not-run takes ENTRY=REASON, not {item!r}")
        out[entry.strip()] = reason.strip()
    return out


def _shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit() or not 1 <= int(k) <= int(n):
        raise ErasekitError(f"--shard takes K/N with 1 <= K <= N, not {text!r}")
    return int(k) - 1, int(n)


def _concepts(args: argparse.Namespace) -> tuple[list[str], int | None]:
    from erasekit.bench import sample_concepts
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

    if args.concepts:
        return _split(args.concepts), None
    return sample_concepts(args.seed, args.n_styles, args.n_objects, STYLE_NAMES, OBJECT_NAMES), args.seed


def _command(args: argparse.Namespace) -> str:
    """The canonical command line that reproduces this leaderboard (every result-deciding flag spelled out)."""
    parts = ["erasekit", "bench", "--model", args.model, "--methods", args.methods]
    if args.presets:
        parts += ["--presets", args.presets]
    if args.sweep:
        parts += ["--sweep", "--split-seed", str(args.split_seed)]
        parts += ["--stacks", args.stacks] if args.stacks else []
    elif args.concepts:
        parts += ["--concepts", args.concepts]
    else:
        parts += [
            "--n-styles",
            str(args.n_styles),
            "--n-objects",
            str(args.n_objects),
            "--seed",
            str(args.seed),
        ]
    parts += ["--seeds", str(args.seeds)]
    parts += ["--steps", str(args.steps)] if args.steps is not None else []
    parts += ["--classifier", args.classifier] if args.classifier else []
    if args.attacks:
        parts += ["--attacks", args.attacks, "--attack-seeds", str(args.attack_seeds)]
        for item in args.attack_budget:
            parts += ["--attack-budget", item]
    for item in args.not_run:
        parts += ["--not-run", item]
    parts += ["--batch-size", str(args.batch_size), "--out", args.out]
    return shlex.join(parts)


def _log(line: str) -> None:
    import time

    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _columns(args: argparse.Namespace) -> list:
    """The attack columns, then the EraseEval column when asked for."""
    from erasekit.bench.attacks import eraseeval_column, parse_attacks

    columns = parse_attacks(_split(args.attacks), args.attack_budget, args.attack_seeds)
    return columns + ([eraseeval_column()] if args.eraseeval else [])
