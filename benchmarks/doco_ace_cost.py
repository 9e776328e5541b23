"""Erase time and peak memory of `doco` and `ace` on MiniCanvas at their `paper` presets, from cut runs.

- doco: the anchor images (cost per image, from ``--images`` of them) and the two kinds of training step, solved
  from two cut runs of 11 steps: 10 discriminator-only steps + 1 UNet update, and 1 + 10.
  ``paper`` = 1000 images + 1001 discriminator-only steps + 999 updates.
- ace: the relevance weights (the base model's images of the concept and its 11 anchors, classified; this does
  not scale with the budget) and the training iteration, from ``--iters`` iterations.
  ``paper`` = relevance + 1500 iterations.
- esd-x, for scale: the unit E of the seed-methods notes.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/doco_ace_cost.py --threads 1

Prints Markdown. CPU seconds of the process (one torch thread: the compute, whatever else shares the machine);
peak memory is resident memory above the level before a cut erase (:class:`erasekit.bench.memory.PeakMemory`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

CONCEPTS = (("watercolor", "style"), ("fish", "object"))


def cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """``(CPU seconds, wall seconds, result)`` of ``fn()``."""
    start, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - start, time.perf_counter() - wall, out


def doco_row(model: Any, concept: str, kind: str, images: int) -> dict[str, float]:
    from erasekit.bench.memory import PeakMemory
    from erasekit.methods import doco
    from erasekit.methods.common import frozen, generator, trainable_copies
    from erasekit.methods.esd import parameter_names
    from erasekit.registry import erase, make_config

    pipe = model.pipeline
    config = make_config("doco", "paper", kind, anchor_images=images)
    with frozen(pipe.unet, pipe.text_encoder):
        t_img, _, data = cpu(lambda: doco.anchor_set(pipe, [concept], config, generator(0)))
        runs = []
        for warmup in (9, 0):  # 10 D-only steps + 1 update, then 1 + 10
            cut = make_config("doco", "paper", kind, iterations=11, warmup=warmup)
            params = trainable_copies(pipe.unet, parameter_names(pipe.unet, cut.parameters))
            runs.append(cpu(lambda c=cut, p=params: doco.train(pipe, p, data, c, generator(1)))[0])
    d_only, update = (10 * runs[0] - runs[1]) / 99, (10 * runs[1] - runs[0]) / 99
    with PeakMemory() as mem:
        erase(
            model, [concept], "doco", "paper", concept_type=kind, anchor_images=images, iterations=3, warmup=1
        )
    per_image = t_img / images
    return {"image": per_image, "d_only": d_only, "update": update, "mb": mem.extra_mb or 0.0,
            "paper": 1000 * per_image + 1001 * d_only + 999 * update}  # fmt: skip


def ace_row(model: Any, concept: str, kind: str, iters: int) -> dict[str, float]:
    from erasekit.bench.memory import PeakMemory
    from erasekit.methods import ace
    from erasekit.registry import erase, make_config

    config = make_config("ace", "paper", kind)
    t_rel, _, _ = cpu(
        lambda: ace.relevance_weights(model, [concept], ace.anchor_list([concept], config), config)
    )
    with PeakMemory() as mem:
        t_run, _, _ = cpu(
            lambda: erase(
                model, [concept], "ace", "paper", concept_type=kind, iterations=iters, relevance="uniform"
            )
        )
    per_it = t_run / iters
    return {
        "relevance": t_rel,
        "iteration": per_it,
        "mb": mem.extra_mb or 0.0,
        "paper": t_rel + 1500 * per_it,
    }


def esd_iteration(model: Any, concept: str, kind: str, iters: int) -> float:
    from erasekit.registry import erase

    return (
        cpu(lambda: erase(model, [concept], "esd-x", "paper", concept_type=kind, iterations=iters))[0] / iters
    )


def main() -> None:
    import erasekit
    from erasekit import progress

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    model = erasekit.load("minicanvas")
    print("| method | concept | unit costs (CPU s) | E | peak MiB | `paper`, CPU s (min) |")
    print("|---|---|---|---|---|---|")
    for concept, kind in CONCEPTS:
        e = esd_iteration(model, concept, kind, max(2, args.iters // 2))
        d = doco_row(model, concept, kind, args.images)
        units = f"image {d['image']:.3f}, D-only step {d['d_only']:.2f}, update {d['update']:.2f}"
        print(f"| doco | {concept} | {units} | {d['update'] / e:.2f} | {d['mb']:.0f} | "
              f"{d['paper']:.0f} ({d['paper'] / 60:.1f}) |")  # fmt: skip
        a = ace_row(model, concept, kind, args.iters)
        units = f"relevance {a['relevance']:.1f}, iteration {a['iteration']:.2f}"
        print(f"| ace | {concept} | {units} | {a['iteration'] / e:.2f} | {a['mb']:.0f} | "
              f"{a['paper']:.0f} ({a['paper'] / 60:.1f}) |")  # fmt: skip
        print(f"| esd-x | {concept} | iteration {e:.2f} | 1.00 | | {200 * e:.0f} ({200 * e / 60:.1f}) |")


if __name__ == "__main__":
    main()
