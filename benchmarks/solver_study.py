"""Fewer but better solver steps: does a sampling move the MiniCanvas verdicts out of the DDIM-25 intervals?

    python benchmarks/solver_study.py --out DIR [--samplings ddim25,dpmpp10,unipc10] [--base-seeds 4]
        [--methods hirm-r:paper,speed:paper] [--concepts mosaic,sketch,arrow,house] [--erase-seeds 2]
        [--threads 1]

For each sampling it evaluates the base model on the full grid (``--base-seeds`` seeds, no target) and each
``method`` erasing each concept alone (``--erase-seeds`` seeds, grid only: UA/IRA/CRA come from the grid), with
the ``minicanvas`` protocol as the leaderboard runs it. Every number gets a 95% bootstrap interval (2000 draws)
over seeds and cells: seeds are drawn with replacement, and so are the objects and the styles (with a target,
only the other kind's axis, so the target's class is always present). The first sampling is the reference; a
``yes`` means the sampling's point estimate lies inside the reference's interval. Per image it also reports how
often the verdict (object and style) equals the reference's on the same prompt and seed.

Runs are kept under ``--out``, so a rerun only scores what is already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

SAMPLINGS = {  # name: (diffusers scheduler class or None for the model's own DDIM, steps)
    "ddim25": (None, 25),
    "ddim10": (None, 10),
    "ddim15": (None, 15),
    "dpmpp10": ("DPMSolverMultistepScheduler", 10),
    "dpmpp12": ("DPMSolverMultistepScheduler", 12),
    "dpmpp15": ("DPMSolverMultistepScheduler", 15),
    "unipc10": ("UniPCMultistepScheduler", 10),
    "unipc12": ("UniPCMultistepScheduler", 12),
}
DRAWS = 2000


def run(model, out: Path, sampling_name: str, seeds: int, target=None, patch=None) -> dict:
    """``evaluate`` once into ``out`` (or read the finished run there); the metrics."""
    from erasekit.evaluation.protocols import evaluate
    from erasekit.generation import Sampling

    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    scheduler, steps = SAMPLINGS[sampling_name]
    sampling = Sampling.for_model(model, steps=steps, scheduler=scheduler)
    start = time.process_time()
    metrics = evaluate(model, "minicanvas", out, target=target, seeds=seeds, generality=False,
                       sampling=sampling, patches=[patch] if patch else [])  # fmt: skip
    print(f"  {out.name}: {time.process_time() - start:.0f} CPU-s", flush=True)
    return metrics


def records(metrics: dict) -> list[dict]:
    """``{object, style, seed, pred_object, pred_style}`` per grid image, from the metrics' predictions."""
    from erasekit.concepts import slug

    objects, styles = metrics["matrix"]["objects"], metrics["matrix"]["styles"]
    by_slug = {(slug(o), slug(s)): (o, s) for o in objects for s in styles}
    out = []
    for key, (po, ps) in metrics["predictions"].items():
        _, rest = key.split("_", 1)
        cell, seed = rest.rsplit("_s", 1)
        o, s = next(v for (so, ss), v in by_slug.items() if f"{so}_{ss}" == cell)
        out.append({"object": o, "style": s, "seed": int(seed), "pred_object": po, "pred_style": ps})
    return out


def scores(recs: list[dict], target: str | None, kind: str | None) -> dict[str, float]:
    from erasekit.evaluation.unlearncanvas_metrics import accuracy, per_class, unlearning_scores

    if target is None:
        return {"object acc": accuracy(recs, "object"), "style acc": accuracy(recs, "style")}
    classes = {k: per_class(recs, k, sorted({r[k] for r in recs})) for k in ("object", "style")}
    got = unlearning_scores(recs, target, kind, classes)
    return {"UA": got["UA"], "IRA": got["IRA"], "CRA": got["CRA"]}


def bootstrap(recs: list[dict], target: str | None, kind: str | None, rng) -> dict[str, tuple[float, float]]:
    """95% intervals: seeds and cells drawn with replacement (see the module docstring)."""
    seeds = sorted({r["seed"] for r in recs})
    axes = {k: sorted({r[k] for r in recs}) for k in ("object", "style")}
    resampled = [k for k in ("object", "style") if target is None or k != kind]
    index = {(r["object"], r["style"], r["seed"]): r for r in recs}
    draws: dict[str, list[float]] = {}
    for _ in range(DRAWS):
        pick = {k: (rng.choice(axes[k], len(axes[k])) if k in resampled else axes[k]) for k in axes}
        pick_seeds = rng.choice(seeds, len(seeds))
        sample = [index[(o, s, int(sd))] for o in pick["object"] for s in pick["style"] for sd in pick_seeds]
        for name, value in scores(sample, target, kind).items():
            draws.setdefault(name, []).append(value)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def agreement(recs: list[dict], ref: list[dict]) -> float:
    """Percent of images whose (object, style) verdicts equal the reference's for the same prompt and seed."""
    by = {(r["object"], r["style"], r["seed"]): (r["pred_object"], r["pred_style"]) for r in ref}
    return 100.0 * np.mean([by[(r["object"], r["style"], r["seed"])] == (r["pred_object"], r["pred_style"])
                            for r in recs])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--samplings", default="ddim25,dpmpp10,unipc10")
    parser.add_argument("--base-seeds", type=int, default=4)
    parser.add_argument("--methods", default="hirm-r:paper,speed:paper")
    parser.add_argument("--concepts", default="mosaic,sketch,arrow,house")
    parser.add_argument("--erase-seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import erasekit
    from erasekit import progress
    from erasekit.concepts import guess_type

    progress.set_enabled(False)
    torch.set_num_threads(args.threads)
    model = erasekit.load("minicanvas")
    samplings = args.samplings.split(",")
    cases = [("base", None, None, args.base_seeds)]
    for method in filter(None, args.methods.split(",")):
        for concept in filter(None, args.concepts.split(",")):
            cases.append((method, concept, guess_type(concept), args.erase_seeds))
    rows = []
    rng = np.random.default_rng(0)
    for label, concept, kind, seeds in cases:
        patch = None
        if concept is not None:
            name, preset = label.split(":")
            patch = erasekit.erase(model, [concept], name, preset, concept_type=kind)
        results = {}
        for s in samplings:
            folder = Path(args.out) / f"{label.replace(':', '-')}_{concept or 'grid'}_{s}"
            results[s] = records(run(model, folder, s, seeds, concept, patch))
        ref = results[samplings[0]]
        ref_ci = bootstrap(ref, concept, kind, rng)
        for s in samplings:
            point = scores(results[s], concept, kind)
            ci = bootstrap(results[s], concept, kind, rng)
            for metric, value in point.items():
                lo, hi = ref_ci[metric]
                rows.append((f"{label} {concept or ''}".strip(), metric, s, value, ci[metric], lo <= value <= hi,
                             agreement(results[s], ref)))  # fmt: skip
    print(f"\n| case | metric | sampling | value | 95% interval | inside {samplings[0]}'s interval | "
          f"verdicts equal to {samplings[0]}'s (%) |\n|---|---|---|---:|---|---|---:|")  # fmt: skip
    for case, metric, s, value, (lo, hi), inside, agree in rows:
        print(f"| {case} | {metric} | {s} | {value:.1f} | {lo:.1f}–{hi:.1f} | {'yes' if inside else 'NO'} "
              f"| {agree:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
