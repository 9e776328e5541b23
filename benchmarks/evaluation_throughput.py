"""MiniCanvas generation throughput by batch size, and the wall time of a full MiniCanvas evaluation.

    python benchmarks/evaluation_throughput.py [--batch-sizes 1,8,32,64] [--images 64] [--threads N]
        [--full] [--invariance] [--model DIR --classifier DIR | --tiny]

Prints one line per measurement and a Markdown table for docs/benchmarks.md. ``--tiny`` measures the test suite's
tiny pipeline instead of the shipped MiniCanvas weights (for machines without them). Throughput counts images
through the generation runner (pipeline call, PNG encoding, atomic writes, manifest), 25 DDIM steps, guidance 5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def _model(tiny: bool, source: str):
    if tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.fixtures.evaluation_tiny import tiny_model

        return tiny_model()
    from erasekit.models.loading import load

    return load(source)


def throughput(model, batch_sizes: list[int], images: int, steps: int) -> list[tuple[int, float]]:
    """Images per second of the runner at each batch size (a fresh output folder each time)."""
    from erasekit.evaluation.protocols.minicanvas import grid_jobs, seed_list
    from erasekit.evaluation.runner import generate
    from erasekit.generation import Sampling
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

    jobs = grid_jobs(OBJECT_NAMES, STYLE_NAMES, seed_list(2))[:images]
    sampling = Sampling(steps=steps, guidance=5.0)
    generate(model.pipeline, jobs[:2], tempfile.mkdtemp(), sampling, batch_size=2)  # warm-up
    rows = []
    for bs in batch_sizes:
        start = time.perf_counter()
        generate(model.pipeline, jobs, tempfile.mkdtemp(), sampling, batch_size=bs)
        rate = len(jobs) / (time.perf_counter() - start)
        print(f"batch {bs:4d}: {rate:7.2f} images/s ({len(jobs)} images, {steps} steps)", flush=True)
        rows.append((bs, rate))
    return rows


def batch_invariance(model, sizes: tuple[int, int], steps: int) -> None:
    """Generate the full grid (1 seed) at two batch sizes and count the PNGs that differ, and by how much."""
    import numpy as np
    from PIL import Image

    from erasekit.evaluation.protocols.minicanvas import grid_jobs, seed_list
    from erasekit.evaluation.runner import generate
    from erasekit.generation import Sampling
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

    jobs = grid_jobs(OBJECT_NAMES, STYLE_NAMES, seed_list(1))
    outs = [Path(tempfile.mkdtemp()) for _ in sizes]
    for out, bs in zip(outs, sizes):
        generate(model.pipeline, jobs, out, Sampling(steps=steps, guidance=5.0), batch_size=bs)
    diffs = []
    for job in jobs:
        a, b = (np.asarray(Image.open(o / "images" / f"{job.key}.png"), dtype=np.int16) for o in outs)
        diffs.append((int(np.abs(a - b).max()), int((a != b).sum()), a.size))
    changed = [d for d in diffs if d[0] > 0]
    worst = max((d[0] for d in diffs), default=0)
    most = max((d[1] for d in diffs), default=0)
    print(f"batch {sizes[0]} vs {sizes[1]}: {len(changed)} of {len(jobs)} images differ; largest difference "
          f"{worst} (8-bit levels), at most {most} of {diffs[0][2]} values in one image")  # fmt: skip


def full_evaluation(model, batch_size: int, classifier) -> tuple[float, dict]:
    """Wall time of ``evaluate(model, "minicanvas", ...)`` over the full 12 x 12 grid, 2 seeds, target ``neon`` + generality."""
    from erasekit.evaluation.protocols import evaluate

    start = time.perf_counter()
    metrics = evaluate(model, "minicanvas", Path(tempfile.mkdtemp()) / "run", target="neon", seeds=2,
                                  batch_size=batch_size, classifier=classifier)  # fmt: skip
    return time.perf_counter() - start, metrics


def _classifier(tiny: bool, folder: str | None):
    """The tests' seeded stand-in (timing only) for --tiny, a classifier folder, or the built-in one (None)."""
    if tiny:
        from tests.fixtures.evaluation_tiny import fake_classifier

        from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

        return fake_classifier(OBJECT_NAMES, STYLE_NAMES)
    if folder:
        from erasekit.evaluation.classifiers import load_classifier_folder

        return load_classifier_folder(folder)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--images", type=int, default=64, help="images per throughput measurement")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--full", action="store_true", help="also time a full MiniCanvas evaluation")
    parser.add_argument("--full-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--invariance", action="store_true", help="compare PNGs generated at batch 8 and 64")
    parser.add_argument("--model", default="minicanvas", help="a MiniCanvas-like diffusers folder")
    parser.add_argument("--classifier", default=None, help="classifier folder (default: the built-in one)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny pipeline instead of MiniCanvas")
    args = parser.parse_args()
    from erasekit import progress

    progress.set_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    model = _model(args.tiny, args.model)
    rows = throughput(model, [int(b) for b in args.batch_sizes.split(",")], args.images, args.steps)
    print("\n| batch size | images/s |\n|---:|---:|")
    for bs, rate in rows:
        print(f"| {bs} | {rate:.1f} |")
    if args.invariance:
        batch_invariance(model, (8, 64), args.steps)
    if args.full:
        seconds, metrics = full_evaluation(
            model, args.full_batch_size, _classifier(args.tiny, args.classifier)
        )
        print(f"\nfull MiniCanvas evaluation: {seconds:.1f} s, {metrics['images']} grid images, "
              f"UA={metrics['UA']:.1f} IRA={metrics['IRA']:.1f} CRA={metrics['CRA']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
