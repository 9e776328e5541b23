"""SPM on MiniCanvas: seconds per training iteration, peak memory, and what Facilitated Transport costs at generation.

Trains ``--iters`` iterations of SPM's ``paper`` preset (and ESD-x's, the unit E of the seed-methods notes) on one
style and one object of the shipped MiniCanvas model, and extrapolates to the paper's 3000 iterations; then times
``--images`` images with the FT-on artifact applied against the same images from the base model (a merged
FT-off patch samples at the base model's speed).

Run::

    .venv/bin/python benchmarks/spm_cost.py --iters 10 --threads 1

Prints Markdown. Times on a shared machine move with its load; the ratio to ESD-x (measured alongside) less so.
"""

from __future__ import annotations

import argparse
import time

import torch


def per_iteration(
    model, method: str, concept: str, kind: str, iters: int, **extra
) -> tuple[float, float, object]:
    from erasekit.bench.memory import PeakMemory
    from erasekit.registry import erase

    with PeakMemory() as mem:
        art = erase(model, [concept], method, "paper", concept_type=kind, iterations=iters, **extra)
    return art.erase_seconds / iters, mem.extra_mb, art


def generation_seconds(model, artifact, images: int) -> tuple[float, float]:
    """(seconds per image with ``artifact`` applied, the same without anything applied)."""
    from erasekit.generation import Request, Sampling, render

    sampling = Sampling.for_model(model)
    requests = [Request(seed=i, prompt=f"A circle image in neon style. {i}") for i in range(images)]
    out = []
    for applied in (True, False):
        start = time.perf_counter()
        if applied:
            with artifact.applied(model):
                render(model.pipeline, requests, sampling, batch_size=8, desc=None)
        else:
            render(model.pipeline, requests, sampling, batch_size=8, desc=None)
        out.append((time.perf_counter() - start) / images)
    return out[0], out[1]


def main() -> None:
    import erasekit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = erasekit.load("minicanvas")
    print(
        "| method | concept | s / iteration | E (ESD-x iterations) | paper budget | extrapolated | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    artifact = None
    for concept, kind in (("neon", "style"), ("circle", "object")):
        esd, _, _ = per_iteration(model, "esd-x", concept, kind, max(2, args.iters // 2))
        for preset_extra, label in (({}, "spm"), ({"anchor_rows": "release"}, "spm (release rows)")):
            sec, mb, art = per_iteration(model, "spm", concept, kind, args.iters, **preset_extra)
            artifact = artifact or art
            print(
                f"| {label} | {concept} | {sec:.2f} | {sec / esd:.2f} | 3000 | {sec * 3000 / 60:.0f} min | {mb:.0f} |"
            )
        print(f"| esd-x | {concept} | {esd:.2f} | 1.00 | 200 | {esd * 200 / 60:.1f} min | |")
    with_ft, without = generation_seconds(model, artifact, args.images)
    print(
        f"\ngeneration: {with_ft:.3f} s/image with the FT-on artifact, {without:.3f} without ({with_ft / without:.2f}x)"
    )


if __name__ == "__main__":
    main()
