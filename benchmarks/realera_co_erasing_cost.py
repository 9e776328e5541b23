"""RealEra and Co-Erasing on MiniCanvas: erase time (wall and CPU) and peak memory at the ``paper`` presets.

RealEra runs in full (its closed form and 50 LoRA steps). Co-Erasing is timed by part: stage 1 and stage 2 for
``--iters`` iterations each (extrapolated to the paper's 1000 + 1000), and the fixed part in full (the adapter's
64 base-model images and 300 steps, the concept's 100 images). ESD-x iterations are timed alongside (the unit E of
the seed-methods notes). One style and one object of the shipped model.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/realera_co_erasing_cost.py --iters 10 --threads 1

Prints Markdown. Wall time on a shared machine moves with its load; CPU time and the ratio to ESD-x less so.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch


def timed(fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
    """``(wall s, CPU s, peak MiB above the start, result)`` of ``fn()``."""
    from erasekit.bench.memory import PeakMemory

    wall, cpu = time.perf_counter(), time.process_time()
    with PeakMemory() as mem:
        out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, mem.extra_mb, out


def co_erasing_parts(
    model: Any, concept: str, kind: str, iters: int
) -> dict[str, tuple[float, float, float]]:
    from erasekit.methods import co_erasing as co
    from erasekit.methods.common import frozen
    from erasekit.registry import make_config

    pipe = model.pipeline
    config = make_config("co-erasing", "paper", kind, text_iterations=iters, iterations=iters)
    out = {}
    with frozen(pipe.unet, pipe.text_encoder):
        *cost, stage1 = timed(lambda: co.text_stage(pipe, [concept], config))
        out["stage 1"] = tuple(cost)
        *cost, tokens = timed(lambda: co.image_tokens(model, pipe, [concept], config))
        out["adapter + images"] = tuple(cost)
        *cost, _ = timed(lambda: co.image_stage(pipe, [concept], config, stage1, tokens))
        out["stage 2"] = tuple(cost)
    return out


def main() -> None:
    import erasekit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = erasekit.load("minicanvas")
    print("| method | concept | part | wall s | CPU s | peak MiB | at `paper` (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for concept, kind in (("watercolor", "style"), ("fish", "object")):
        wall, cpu, mb, _ = timed(
            partial(erasekit.erase, model, [concept], "esd-x", concept_type=kind, iterations=5)
        )
        esd = cpu / 5
        print(
            f"| esd-x | {concept} | 5 iterations | {wall:.1f} | {cpu:.1f} | {mb:.0f} | {esd:.2f} s/it (E) |"
        )
        for preset in ("closed-form", "paper"):
            wall, cpu, mb, _ = timed(partial(erasekit.erase, model, [concept], "realera", preset, kind))
            print(
                f"| realera | {concept} | `{preset}` preset, in full | {wall:.1f} | {cpu:.1f} | {mb:.0f} | {cpu:.0f} s |"
            )
        for part, (wall, cpu, mb) in co_erasing_parts(model, concept, kind, args.iters).items():
            full = cpu if part == "adapter + images" else cpu * 1000 / args.iters
            unit = "" if part == "adapter + images" else f", {cpu / args.iters / esd:.2f} E per iteration"
            label = part if part == "adapter + images" else f"{part}, {args.iters} iterations"
            print(
                f"| co-erasing | {concept} | {label} | {wall:.1f} | {cpu:.1f} | {mb:.0f} | {full:.0f} s{unit} |"
            )


if __name__ == "__main__":
    main()
