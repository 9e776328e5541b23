"""HiRM-S on MiniCanvas beyond its paper settings, on the dev concepts only: the numbers behind docs/hirm.md and
docs/leaderboard.md ("What the HiRM-S rows say").

- ``anchors``: which concept the base model draws for HiRM-S's default anchors ("painting" in place of every
  style, "object" in place of every object; every grid cell, 2 seeds), as the MiniCanvas classifier reads it.
- ``ua``: dev UA (the target's own 12 grid images, 1 seed; retention not measured) of ``hirm-s:paper`` with the
  overrides of each candidate below, as ``benchmarks/hirm_default_search.py --stage ua`` does for HiRM-R.

Run::

    .venv/bin/python benchmarks/hirm_s_explore.py anchors
    .venv/bin/python benchmarks/hirm_s_explore.py ua --out runs/hirm-s-explore [--configs "last s320"]

``ua`` resumes from ``OUT/cells``.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from hirm_default_search import DEV, cached, run_ua, slug  # noqa: E402

from erasekit.methods.hirm.config import GENERIC_RETAIN  # noqa: E402

LAST = {"supervision": "last_hidden_state"}
HOLD = {"preserve_unconditional": True, "retain_prompts": GENERIC_RETAIN, "world_retain": "all",
        "preserve_weight": 20.0}  # fmt: skip
CANDIDATES: dict[str, dict[str, Any]] = {
    "s320": {"steps": 320},
    "last s80": {**LAST, "steps": 80},
    "last s320": {**LAST, "steps": 320},
    "last s320 lr1e-4": {**LAST, "steps": 320, "lr": 1e-4},
    "last hold s320 lr1e-4": {**LAST, **HOLD, "steps": 320, "lr": 1e-4},
}


def anchors(model: Any) -> None:
    from erasekit.minicanvas import OBJECT_NAMES, STYLE_NAMES, load_classifier, prompt
    from erasekit.minicanvas.quality import classify, default_sampling, generate

    clf, sampling = load_classifier(), default_sampling()
    for what, prompts, head, names in (
        (
            "style of 'A X image in painting style.'",
            [prompt(o, "painting") for o in OBJECT_NAMES],
            1,
            STYLE_NAMES,
        ),
        (
            "object of 'A object image in Y style.'",
            [prompt("object", s) for s in STYLE_NAMES],
            0,
            OBJECT_NAMES,
        ),
    ):
        doubled = [p for p in prompts for _ in range(2)]
        seeds = [k for _ in prompts for k in range(2)]
        found = classify(clf, generate(model.pipeline, doubled, seeds, sampling))[head].tolist()
        print(what, collections.Counter(names[i] for i in found).most_common(5), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("anchors", "ua"))
    parser.add_argument("--out", default="runs/hirm-s-explore", help="results folder for ua (resumed)")
    parser.add_argument("--configs", default=None, help="comma-separated candidate names (default: all)")
    args = parser.parse_args()

    from erasekit.models.loading import load
    from erasekit.progress import set_enabled

    torch.set_num_threads(1)
    set_enabled(False)
    model = load("minicanvas")
    if args.stage == "anchors":
        anchors(model)
        return 0
    out = Path(args.out)
    names = list(CANDIDATES) if args.configs is None else [c.strip() for c in args.configs.split(",")]
    for name in names:
        for concept in DEV:
            file = out / "cells" / slug(name) / f"{concept}.json"
            run = out / "runs" / slug(name) / concept
            cell = cached(file, run_ua, model, CANDIDATES[name], concept, run, 1, "hirm-s")
            print(name, concept, {k: round(v, 1) for k, v in cell.items()}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
