"""Fewer but better solver steps: does a sampling move the MiniCanvas verdicts out of the DDIM-25 intervals?

    python benchmarks/solver_study.py --out DIR [--samplings ddim25,dpmpp10,unipc10] [--base-seeds 4]
        [--methods hirm-r:paper,speed:paper] [--concepts mosaic,sketch,arrow,house] [--erase-seeds 2]
        [--threads 1]

For each sampling it evaluates the base model on the full grid (``--base-seeds`` seeds, no target) and each
``method`` erasing each concept alone (``--erase-seeds`` seeds, grid only: UA/IRA/CRA come from the grid), with
the ``minicanvas`` protocol as the leaderboard runs it. Every number gets a 95% bootstrap interval (2000 draws)
over seeds and cells: seeds are drawn with replacement, and so are the objects and the styles (with a target,
only the other kind's axis, so the target's class is always present). The first sampling is the reference; a
``yes`` means the sampling's point estimate lies inside the reference's interval. The same draws, applied to both
samplings (same prompts, same seeds, so the same starting noise), give a paired interval of the difference, which
is far tighter. Per image it also reports how often the verdicts (object and style) equal the reference's.

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


def hits(recs: list[dict]) -> tuple[dict[str, list[str]], np.ndarray, np.ndarray]:
    """The grid as arrays: axes, and ``[O, S, K]`` booleans (object verdict right, style verdict right)."""
    axes = {k: sorted({r[k] for r in recs}) for k in ("object", "style", "seed")}
    pos = {k: {v: i for i, v in enumerate(vals)} for k, vals in axes.items()}
    shape = tuple(len(v) for v in axes.values())
    ok = {k: np.zeros(shape, dtype=bool) for k in ("object", "style")}
    for r in recs:
        at = (pos["object"][r["object"]], pos["style"][r["style"]], pos["seed"][r["seed"]])
        for k in ok:
            ok[k][at] = r[f"pred_{k}"] == r[k]
    return axes, ok["object"], ok["style"]


def scores(axes, obj_ok, sty_ok, pick, target: str | None, kind: str | None) -> dict[str, float]:
    """The protocol's numbers on the grid restricted to ``pick`` (index arrays per axis, repeats allowed)."""
    o, s, k = np.ix_(pick["object"], pick["style"], pick["seed"])
    obj, sty = 100.0 * obj_ok[o, s, k], 100.0 * sty_ok[o, s, k]  # [o, s, k]
    if target is None:
        return {"object acc": obj.mean(), "style acc": sty.mean()}
    mine, other, axis = (sty, obj, 1) if kind == "style" else (obj, sty, 0)
    per_class = np.moveaxis(mine, axis, 0).reshape(mine.shape[axis], -1).mean(1)  # each class's accuracy
    t = axes[kind].index(target)
    return {"UA": 100.0 - per_class[t], "IRA": np.delete(per_class, t).mean(), "CRA": other.mean()}


def bootstrap(grids: dict, target: str | None, kind: str | None, rng, ref: str) -> dict:
    """Point values, 95% intervals and, paired with the reference (the same draws), intervals of the difference.

    Seeds and cells are drawn with replacement (see the module docstring); every sampling sees the same draws.
    """
    axes = next(iter(grids.values()))[0]
    full = {k: np.arange(len(v)) for k, v in axes.items()}
    resampled = [k for k in ("object", "style") if target is None or k != kind] + ["seed"]
    point = {name: scores(*g, full, target, kind) for name, g in grids.items()}
    draws: dict[str, dict[str, list[float]]] = {name: {} for name in grids}
    for _ in range(DRAWS):
        pick = {k: (rng.integers(0, len(v), len(v)) if k in resampled else v) for k, v in full.items()}
        for name, g in grids.items():
            for metric, value in scores(*g, pick, target, kind).items():
                draws[name].setdefault(metric, []).append(value)
    out = {}
    for name in grids:
        for metric, values in draws[name].items():
            diff = np.array(values) - np.array(draws[ref][metric])
            out[(name, metric)] = (point[name][metric], np.percentile(values, [2.5, 97.5]),
                                   np.percentile(diff, [2.5, 97.5]))  # fmt: skip
    return out


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
    ref = samplings[0]
    for label, concept, kind, seeds in cases:
        patch = None
        if concept is not None:
            name, preset = label.split(":")
            patch = erasekit.erase(model, [concept], name, preset, concept_type=kind)
        results = {}
        for s in samplings:
            folder = Path(args.out) / f"{label.replace(':', '-')}_{concept or 'grid'}_{s}"
            results[s] = records(run(model, folder, s, seeds, concept, patch))
        stats = bootstrap({s: hits(r) for s, r in results.items()}, concept, kind, rng, ref)
        for (s, metric), (value, ci, diff) in stats.items():
            inside = stats[(ref, metric)][1][0] <= value <= stats[(ref, metric)][1][1]
            rows.append((f"{label} {concept or ''}".strip(), metric, s, value, ci, inside, diff,
                         agreement(results[s], results[ref])))  # fmt: skip
    print(
        f"\n| case | metric | sampling | value | 95% interval | inside {ref}'s interval | "
        f"difference to {ref}, 95% (paired) | verdicts equal to {ref}'s (%) |\n|---|---|---|---:|---|---|---|---:|"
    )
    for case, metric, s, value, (lo, hi), inside, (dlo, dhi), agree in rows:
        print(f"| {case} | {metric} | {s} | {value:.1f} | {lo:.1f}–{hi:.1f} | {'yes' if inside else 'NO'} | "
              f"{dlo:+.1f} to {dhi:+.1f} | {agree:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
