"""HiRM's options measured on MiniCanvas against the ``paper`` preset: the table in ``docs/hirm.md``.

Every variant is ``hirm-r`` with the ``paper`` preset plus a few overrides (``hirm-s`` for the semantic row),
erased for each target concept and evaluated with the MiniCanvas protocol (UA / IRA / CRA and generality on
synonyms and paraphrases). The multi-concept part erases K styles at once, jointly or by averaging K
single-concept patches (the paper's way), and reports UA over the erased styles and IRA over the others.

Run (about 25 minutes on 2 idle cores)::

    .venv/bin/python benchmarks/hirm_ablation.py --out runs/hirm-ablation

It resumes: every finished (variant, concept) cell is kept in ``OUT/cells/`` and skipped on the next run.
``OUT/table.md`` is the Markdown table, ``OUT/results.json`` every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from erasekit.io import atomic_write_json, atomic_write_text
from erasekit.minicanvas import OBJECT_NAMES, STYLE_NAMES, concept_info, concept_kind, prompt

STYLES = ("mosaic", "sketch", "vintage")
OBJECTS = ("arrow", "house", "key")
# Generic templates, none of them a MiniCanvas training or evaluation caption.
TEMPLATES = {"style": ("in the style of {}", "{} style"), "object": ("a {}", "the {}")}


def retain_prompts(concept: str) -> tuple[str, ...]:
    """The template prompt of every other concept of the same kind (paired with a rotating partner)."""
    kind = concept_kind(concept)
    if kind == "style":
        others = [s for s in STYLE_NAMES if s != concept]
        return tuple(prompt(OBJECT_NAMES[i % len(OBJECT_NAMES)], s) for i, s in enumerate(others))
    others = [o for o in OBJECT_NAMES if o != concept]
    return tuple(prompt(o, STYLE_NAMES[i % len(STYLE_NAMES)]) for i, o in enumerate(others))


def variants(concept: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """``name -> (method, overrides of the paper preset)`` for one target concept."""
    info, kind = concept_info(concept), concept_kind(concept)
    return {
        "hirm-r paper": ("hirm-r", {}),
        "hirm-s paper (anchor: category)": ("hirm-s", {"anchor": info.category}),
        "no BOS": ("hirm-r", {"loss_positions": "no_bos"}),
        "content positions": ("hirm-r", {"loss_positions": "content"}),
        "preservation (other concepts)": ("hirm-r", {"retain_prompts": retain_prompts(concept)}),
        "templates": ("hirm-r", {"templates": TEMPLATES[kind]}),
        "templates + synonyms": ("hirm-r", {"templates": TEMPLATES[kind], "synonyms": info.synonyms}),
        "5x steps": ("hirm-r", {"steps": 5 * (20 if kind == "style" else 15)}),
    }


def run_cell(model: Any, method: str, overrides: dict[str, Any], concept: str, out: Path, seeds: int) -> dict:
    from erasekit.evaluation.protocols import evaluate
    from erasekit.registry import erase

    kind = concept_kind(concept)
    patch = erase(model, [concept], method, "paper", concept_type=kind, **overrides)
    metrics = evaluate(model, "minicanvas", out, target=concept, patches=[patch], seeds=seeds, overwrite=True)
    gen = metrics.get("generality", {})
    return {
        "UA": metrics["UA"],
        "IRA": metrics["IRA"],
        "CRA": metrics["CRA"],
        "UA_synonyms": gen.get("UA_synonyms"),
        "UA_paraphrases": gen.get("UA_paraphrases"),
        "erase_seconds": patch.erase_seconds,
    }


def run_multi(model: Any, k: int, mode: str, out: Path, seeds: int) -> dict:
    """Erase the first ``k`` styles of a seeded shuffle; UA over them, IRA over the other styles."""
    from erasekit.evaluation.protocols import evaluate
    from erasekit.registry import erase

    order = torch.randperm(len(STYLE_NAMES), generator=torch.Generator().manual_seed(0)).tolist()
    erased = [STYLE_NAMES[i] for i in order[:k]]
    patch = erase(model, erased, "hirm-r", "paper", concept_type="style", multi=mode)
    metrics = evaluate(model, "minicanvas", out, target=None, patches=[patch], seeds=seeds, overwrite=True)
    per_style = metrics["per_class"]["style"]
    kept = [s for s in STYLE_NAMES if s not in erased]
    return {
        "erased": erased,
        "UA": statistics.mean(100.0 - per_style[s] for s in erased),
        "IRA": statistics.mean(per_style[s] for s in kept),
        "object_accuracy": metrics["object_accuracy"],
        "erase_seconds": patch.erase_seconds,
    }


def cached(path: Path, fn: Any, *args: Any) -> dict:
    """``fn(*args)``, computed once: the result is kept in ``path`` and read back on later runs."""
    if path.is_file():
        return json.loads(path.read_text())
    result = fn(*args)
    atomic_write_json(path, result)
    return result


def fmt(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def table(results: dict[str, dict[str, dict]], multi: dict[str, dict]) -> str:
    lines = [
        "| variant | style UA | style IRA | style CRA | style UA syn. | object UA | object IRA | object CRA "
        "| object UA syn. | erase s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cells in results.items():
        row = [name]
        for group in (STYLES, OBJECTS):
            for key in ("UA", "IRA", "CRA", "UA_synonyms"):
                row.append(fmt([cells[c][key] for c in group if c in cells]))
        row.append(f"{statistics.mean(c['erase_seconds'] for c in cells.values()):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| K styles | mode | UA (erased) | IRA (other styles) | object acc. | erase s |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in multi.items():
        k, mode = key.split("-", 1)
        lines.append(
            f"| {k} | {mode} | {r['UA']:.1f} | {r['IRA']:.1f} | {r['object_accuracy']:.1f} | {r['erase_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder (resumed when it exists)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per grid cell")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--multi", default="2,5,10", help="K values for the multi-concept part ('' skips it)")
    args = parser.parse_args()

    from erasekit.models.loading import load
    from erasekit.progress import set_enabled

    torch.set_num_threads(args.threads)
    set_enabled(False)
    out = Path(args.out)
    model = load("minicanvas")
    start = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    only = None if args.only is None else {v.strip() for v in args.only.split(",")}
    for concept in STYLES + OBJECTS:
        for name, (method, overrides) in variants(concept).items():
            if only is not None and name not in only:
                continue
            slug = (
                name.replace(" ", "_").replace("(", "").replace(")", "").replace(":", "").replace("+", "and")
            )
            cell = cached(
                out / "cells" / slug / f"{concept}.json",
                run_cell,
                *(model, method, overrides, concept, out / "runs" / slug / concept, args.seeds),
            )
            results.setdefault(name, {})[concept] = cell
            print(
                f"[{time.perf_counter() - start:6.0f}s] {name:<34} {concept:<8} UA {cell['UA']:5.1f} "
                f"IRA {cell['IRA']:5.1f} CRA {cell['CRA']:5.1f}",
                flush=True,
            )
    multi: dict[str, dict] = {}
    for k in [int(x) for x in args.multi.split(",") if x.strip()]:
        for mode in ("joint", "average"):
            key = f"{k}-{mode}"
            multi[key] = cached(
                out / "cells" / "multi" / f"{key}.json",
                run_multi,
                *(model, k, mode, out / "runs" / "multi" / key, args.seeds),
            )
            r = multi[key]
            print(
                f"[{time.perf_counter() - start:6.0f}s] K={k} {mode:<8} UA {r['UA']:5.1f} IRA {r['IRA']:5.1f}"
            )
    atomic_write_json(out / "results.json", {"variants": results, "multi": multi, "seeds": args.seeds})
    atomic_write_text(out / "table.md", table(results, multi))
    print(table(results, multi))
    return 0


if __name__ == "__main__":
    sys.exit(main())
