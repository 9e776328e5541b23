"""Choosing ``hirm-r``'s ``default`` preset on the dev concepts only: the search behind docs/hirm.md.

Every candidate is ``hirm-r`` with the ``paper`` preset plus overrides (per concept type where they differ),
erased for one dev concept at a time and measured with the MiniCanvas protocol (UA / IRA / CRA, no generality
images). Two stages, as docs/hirm.md ("Choosing `default` on dev") describes:

- ``screen``: every candidate on 2 dev styles + 2 dev objects, 1 seed per grid cell;
- ``confirm``: the named candidates on all 8 dev concepts, 2 seeds per grid cell.

The base model is evaluated once, without a patch, at 2 seeds; its UA / IRA / CRA for each concept are scored
from that one run's images (a run's images do not depend on the target; only the scoring does). The
operating-point rule is the leaderboard's (:func:`erasekit.bench.protocol.operating_point`): per concept type,
the highest dev UA with dev IRA and CRA each within 5 points of the base; else the highest UA + (IRA + CRA) / 2.
Test concepts (``split_concepts(0).test``) are never touched.

Run (each evaluation is 144 images per seed: about 20 CPU-seconds per seed on an idle core, 3x more on a busy
machine)::

    .venv/bin/python benchmarks/hirm_default_search.py --out runs/hirm-default --stage screen
    .venv/bin/python benchmarks/hirm_default_search.py --out runs/hirm-default --stage confirm \\
        --configs "paper,uncond+generic w10 s100"

It resumes: every finished (candidate, concept, seeds) cell is kept in ``OUT/cells/`` and skipped next time.
``OUT/<stage>.md`` is the table, ``OUT/<stage>.json`` every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from erasekit.bench.protocol import TOLERANCE, split_concepts
from erasekit.io import atomic_write_json, atomic_write_text
from erasekit.methods.hirm.config import GENERIC_RETAIN
from erasekit.minicanvas import OBJECT_NAMES, STYLE_NAMES, concept_kind, prompt

DEV = split_concepts(0).dev
SCREEN = ("mosaic", "sketch", "arrow", "house")  # the first 2 dev styles and the first 2 dev objects
KINDS = ("style", "object")

# Generic prompts that name no MiniCanvas concept: they hold the shared tokens (BOS, end-of-text padding,
# the template words) in place. None of them is a grid caption.
GENERIC = GENERIC_RETAIN
HOLD = {"preserve_unconditional": True, "retain_prompts": GENERIC}
MATES = {**HOLD, "world_retain": "kind"}
NAMES = {**HOLD, "world_retain": "all"}
OUT = "last_hidden_state"  # the encoder output the denoiser reads
TEMPLATES = {"style": ("in the style of {}", "{} style"), "object": ("a {}", "the {}")}


def world_retain(concept: str) -> tuple[str, ...]:
    """Grid captions of the other concepts of the world: every other style (or object) in the template, each
    paired with a rotating partner of the other kind (23 prompts; none names ``concept``)."""
    styles = [prompt(OBJECT_NAMES[i % 12], s) for i, s in enumerate(STYLE_NAMES) if s != concept]
    objects = [prompt(o, STYLE_NAMES[i % 12]) for i, o in enumerate(OBJECT_NAMES) if o != concept]
    return tuple(dict.fromkeys(styles + objects))


def rel(k: float, **more: Any) -> dict[str, Any]:
    """Scale-free Gaussian random targets: norm = ``k`` x the concept's own activation norm."""
    return {"coefficient_mode": "relative", "coefficient": k, "target_distribution": "gaussian", **more}


def candidates(concept: str) -> dict[str, dict[str, Any]]:
    """``name -> overrides of hirm-r's paper preset`` for one concept (its type picks typed entries)."""
    kind = concept_kind(concept)
    world = {"retain_prompts": world_retain(concept)}
    return {
        "paper": {},
        "paper s100": {"steps": 100},
        "abs s100 world w1000": {"steps": 100, **world, "preserve_weight": 1e3},
        "centered": {"target_distribution": "centered"},
        "rel k30": rel(30),
        "rel k100": rel(100),
        "rel k190": rel(190),
        "rel k100 s100": rel(100, steps=100),
        "last_hidden rel k1 s100 lr1e-4": rel(1, supervision="last_hidden_state", steps=100, lr=1e-4),
        "block-1 rel k1.5 s100 lr1e-4": rel(1.5, supervision="block:-1", steps=100, lr=1e-4),
        "rel k1 s100 lr1e-4 uncond w10": rel(1, steps=100, lr=1e-4, preserve_unconditional=True,
                                              preserve_weight=10.0),
        "rel k1 s100 lr1e-4 hold w10": rel(1, **HOLD, steps=100, lr=1e-4, preserve_weight=10.0),
        "rel k1 s100 lr1e-4 hold w100": rel(1, **HOLD, steps=100, lr=1e-4, preserve_weight=100.0),
        "rel k1 s100 lr1e-4 hold w10 templates": rel(1, **HOLD, steps=100, lr=1e-4, preserve_weight=10.0,
                                                      templates=TEMPLATES[kind]),
        "rel k100 s100 hold@out w100": rel(100, **HOLD, steps=100, preserve_weight=100.0, preserve_at=OUT),
        "rel k100 s100 hold@out w300": rel(100, **HOLD, steps=100, preserve_weight=300.0, preserve_at=OUT),
        "rel k100 s100 world@out w100": rel(100, **world, steps=100, preserve_weight=100.0, preserve_at=OUT),
        "last rel k1 s100 lr1e-4 hold w10": rel(1, **HOLD, supervision=OUT, steps=100, lr=1e-4,
                                                 preserve_weight=10.0),
        "last rel k1 s100 lr1e-4 hold w30": rel(1, **HOLD, supervision=OUT, steps=100, lr=1e-4,
                                                 preserve_weight=30.0),
        "last rel k1 s100 lr1e-4 world w10": rel(1, **world, supervision=OUT, steps=100, lr=1e-4,
                                                  preserve_weight=10.0),
        "last rel k1 s100 lr1e-4 hold w20": rel(1, **HOLD, supervision=OUT, steps=100, lr=1e-4,
                                                 preserve_weight=20.0),
        "last rel k1 s200 lr1e-4 hold w20": rel(1, **HOLD, supervision=OUT, steps=200, lr=1e-4,
                                                 preserve_weight=20.0),
        "last rel k1 s100 lr2e-4 hold w20": rel(1, **HOLD, supervision=OUT, steps=100, lr=2e-4,
                                                 preserve_weight=20.0),
        "last rel k1.5 s100 lr1e-4 hold w20": rel(1.5, **HOLD, supervision=OUT, steps=100, lr=1e-4,
                                                   preserve_weight=20.0),
        "last rel k2 s100 lr1e-4 hold w20": rel(2, **HOLD, supervision=OUT, steps=100, lr=1e-4,
                                                 preserve_weight=20.0),
        "last rel k1 s100 lr1e-4 hold w20 templates": rel(1, **HOLD, supervision=OUT, steps=100, lr=1e-4,
                                                           preserve_weight=20.0, templates=TEMPLATES[kind]),
        "last rel k1 s100 lr1e-4 hold w30 templates": rel(1, **HOLD, supervision=OUT, steps=100, lr=1e-4,
                                                           preserve_weight=30.0, templates=TEMPLATES[kind]),
        # the held generic prompts plus the other MiniCanvas concepts of the target's kind as bare names
        # (``world_retain``, SPEED's retain set on MiniCanvas), which lets a stronger target keep retention
        "last rel k1 s200 lr1e-4 mates w20": rel(1, **MATES, supervision=OUT, steps=200, lr=1e-4,
                                                  preserve_weight=20.0),
        "last rel k2 s100 lr1e-4 mates w20": rel(2, **MATES, supervision=OUT, steps=100, lr=1e-4,
                                                  preserve_weight=20.0),
        "last rel k2 s200 lr1e-4 mates w20": rel(2, **MATES, supervision=OUT, steps=200, lr=1e-4,
                                                  preserve_weight=20.0),
        "last rel k2 s200 lr1e-4 mates w100": rel(2, **MATES, supervision=OUT, steps=200, lr=1e-4,
                                                   preserve_weight=100.0),
        "last rel k2 s300 lr1e-4 mates w100": rel(2, **MATES, supervision=OUT, steps=300, lr=1e-4,
                                                   preserve_weight=100.0),
        "last rel k4 s200 lr1e-4 mates w100": rel(4, **MATES, supervision=OUT, steps=200, lr=1e-4,
                                                   preserve_weight=100.0),
        # the same with every other concept held (both kinds: CRA reads the other kind), and with the loss on the
        # content positions only (the concept's tokens and end-of-text; the padding rows carry a prompt's
        # summary into every later position the denoiser reads)
        "last rel k2 s100 lr1e-4 mates w20 content": rel(2, **MATES, supervision=OUT, steps=100, lr=1e-4,
                                                          preserve_weight=20.0, loss_positions="content"),
        "last rel k2 s100 lr1e-4 names w20": rel(2, **NAMES, supervision=OUT, steps=100, lr=1e-4,
                                                  preserve_weight=20.0),
        "last rel k2 s100 lr1e-4 names w20 content": rel(2, **NAMES, supervision=OUT, steps=100, lr=1e-4,
                                                          preserve_weight=20.0, loss_positions="content"),
    }  # fmt: skip


# ---- scoring -------------------------------------------------------------------------------------------------


def base_scores(model: Any, out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{seeds: {concept: {UA, IRA, CRA}}}`` of the base model (no patch), for 1 and 2 seeds, from one run."""
    from erasekit.evaluation.protocols import evaluate
    from erasekit.evaluation.protocols.minicanvas import grid_jobs, seed_list
    from erasekit.evaluation.unlearncanvas_metrics import unlearncanvas_metrics

    file = out / "cells" / "base.json"
    if file.is_file():
        return json.loads(file.read_text())
    metrics = evaluate(model, "minicanvas", out / "runs" / "base", target=DEV[0], seeds=2, generality=False,
                       batch_size=32)  # fmt: skip
    seeds = seed_list(2)
    records = [{**j.meta, "seed": j.seed, "pred_object": metrics["predictions"][j.key][0],
                "pred_style": metrics["predictions"][j.key][1]}
               for j in grid_jobs(OBJECT_NAMES, STYLE_NAMES, seeds)]  # fmt: skip
    result: dict[str, dict[str, dict[str, float]]] = {}
    for n in (1, 2):
        mine = [r for r in records if r["seed"] in seeds[:n]]
        result[str(n)] = {}
        for c in DEV:
            m = unlearncanvas_metrics(mine, OBJECT_NAMES, STYLE_NAMES, c, concept_kind(c))
            result[str(n)][c] = {k: m[k] for k in ("UA", "IRA", "CRA")}
    atomic_write_json(file, result)
    return result


def run_cell(model: Any, overrides: dict[str, Any], concept: str, out: Path, seeds: int) -> dict[str, Any]:
    from erasekit.evaluation.protocols import evaluate
    from erasekit.registry import erase

    patch = erase(model, [concept], "hirm-r", "paper", concept_type=concept_kind(concept), **overrides)
    metrics = evaluate(model, "minicanvas", out, target=concept, patches=[patch], seeds=seeds,
                       generality=False, batch_size=32, overwrite=True)  # fmt: skip
    return {"UA": metrics["UA"], "IRA": metrics["IRA"], "CRA": metrics["CRA"],
            "erase_seconds": patch.erase_seconds}  # fmt: skip


def run_ua(
    model: Any, overrides: dict[str, Any], concept: str, out: Path, seeds: int, method: str = "hirm-r"
) -> dict[str, Any]:
    """UA alone, from the target's own row of the grid (12 images per seed): the cheap first filter."""
    from erasekit.evaluation.protocols import evaluate
    from erasekit.registry import erase

    kind = concept_kind(concept)
    patch = erase(model, [concept], method, "paper", concept_type=kind, **overrides)
    row = {"styles": (concept,)} if kind == "style" else {"objects": (concept,)}
    metrics = evaluate(model, "minicanvas", out, patches=[patch], seeds=seeds, generality=False,
                       batch_size=32, overwrite=True, **row)  # fmt: skip
    return {"UA": 100.0 - metrics[f"{kind}_accuracy"], "erase_seconds": patch.erase_seconds}


def cached(path: Path, fn: Any, *args: Any) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    result = fn(*args)
    atomic_write_json(path, result)
    return result


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


# ---- the table -----------------------------------------------------------------------------------------------


def type_means(cells: Mapping[str, Mapping[str, float]], kind: str) -> dict[str, float]:
    """Means over the concepts of ``kind`` of every score the cells have (UA only for the ``ua`` stage)."""
    rows = [v for c, v in cells.items() if concept_kind(c) == kind]
    keys = [k for k in ("UA", "IRA", "CRA") if rows and all(k in r for r in rows)]
    return {k: statistics.mean(r[k] for r in rows) for k in keys}


def verdict(m: Mapping[str, float], base: Mapping[str, float]) -> str:
    """``keeps`` when IRA and CRA are each within the tolerance of the base (the rule's first branch), else the
    rule's fallback score UA + (IRA + CRA) / 2."""
    if "IRA" not in m:
        return "—"
    keeps = min(m["IRA"] - base["IRA"], m["CRA"] - base["CRA"]) >= -TOLERANCE
    return "keeps" if keeps else f"{m['UA'] + (m['IRA'] + m['CRA']) / 2:.1f}"


def table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]], base: Mapping[str, Mapping[str, float]]
) -> str:
    """Per candidate and concept type: the dev means and whether they keep IRA and CRA within the tolerance."""
    head = "| candidate | " + " | ".join(f"{k} UA | {k} IRA | {k} CRA | {k} rule" for k in KINDS) + " |"
    lines = [head, "|---" * (1 + 4 * len(KINDS)) + "|"]
    concepts = sorted({c for cells in results.values() for c in cells})
    base_row = {c: base[c] for c in concepts}
    for name, cells in {"base (no patch)": base_row, **results}.items():
        row = [name]
        for kind in KINDS:
            m, b = type_means(cells, kind), type_means(base_row, kind)
            row += [f"{m[k]:.1f}" if k in m else "—" for k in ("UA", "IRA", "CRA")]
            row.append("—" if name.startswith("base") or not m else verdict(m, b))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, png: Path) -> None:
    """The frontier: dev UA against retention (IRA + CRA) / 2, one panel per concept type, every candidate
    with all three scores (screen: 1 seed, 4 concepts; confirm: 2 seeds, 8 concepts), and the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, kind in zip(axes, KINDS):
        for stage, marker in (("screen", "o"), ("confirm", "s")):
            file = out / f"{stage}.json"
            if not file.is_file():
                continue
            data = json.loads(file.read_text())
            b = type_means({c: data["base"][c] for c in data["concepts"]}, kind)  # the stage's concepts only
            ax.scatter([(b["IRA"] + b["CRA"]) / 2], [b["UA"]], marker=marker, c="k")
            for name, cells in data["candidates"].items():
                m = type_means(cells, kind)
                if "IRA" not in m:
                    continue
                x = (m["IRA"] + m["CRA"]) / 2
                ax.scatter([x], [m["UA"]], marker=marker, c="tab:blue" if stage == "screen" else "tab:red")
                ax.annotate(name, (x, m["UA"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
            ax.axvline(min(b["IRA"], b["CRA"]) - TOLERANCE, ls=":", c="grey")
        ax.set_title(f"{kind}s (blue: screen, 1 seed; red: confirm, 2 seeds; black: base)", fontsize=8)
        ax.set_xlabel("retention (IRA + CRA) / 2, %")
        ax.set_ylabel("UA, %")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder (resumed when it exists)")
    parser.add_argument("--stage", choices=("ua", "screen", "confirm"), default="screen")
    parser.add_argument("--configs", default=None, help="comma-separated candidate names (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--plot", default=None, help="write the frontier PNG here (from OUT's tables) and stop"
    )
    args = parser.parse_args()
    if args.plot:
        plot(Path(args.out), Path(args.plot))
        return 0

    from erasekit.models.loading import load
    from erasekit.progress import set_enabled

    torch.set_num_threads(args.threads)
    set_enabled(False)
    out = Path(args.out)
    model = load("minicanvas")
    concepts, seeds = (DEV, 2) if args.stage == "confirm" else (SCREEN, 1)
    fn = run_ua if args.stage == "ua" else run_cell
    base = base_scores(model, out)[str(seeds)]
    only = None if args.configs is None else [c.strip() for c in args.configs.split(",")]
    start, cpu = time.perf_counter(), time.process_time()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for concept in concepts:
        for name, overrides in candidates(concept).items():
            stage = "ua" if args.stage == "ua" else f"s{seeds}"
            file = out / "cells" / stage / slug(name) / f"{concept}.json"
            if only is not None and name not in only:
                if file.is_file():  # measured by an earlier call: kept in the table
                    results.setdefault(name, {})[concept] = json.loads(file.read_text())
                continue
            cell = cached(
                file, fn, model, overrides, concept, out / "runs" / stage / slug(name) / concept, seeds
            )
            results.setdefault(name, {})[concept] = cell
            scores = " ".join(f"{k} {cell[k]:5.1f}" for k in ("UA", "IRA", "CRA") if k in cell)
            print(f"[{time.perf_counter() - start:6.0f}s {time.process_time() - cpu:6.0f} cpu-s] {name:<40} "
                  f"{concept:<9} {scores}", flush=True)  # fmt: skip
    text = table(results, base)
    atomic_write_json(out / f"{args.stage}.json", {"seeds": seeds, "concepts": list(concepts), "base": base,
                                                   "candidates": results})  # fmt: skip
    atomic_write_text(out / f"{args.stage}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
