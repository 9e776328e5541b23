"""Receler's cost per iteration and ItD's gate on MiniCanvas (the numbers in docs/baselines.md).

Times ``--iters`` iterations of Receler at its three adversary settings (``paper``: 50 adversary passes;
``release``: the inert adversary; ``budget``: 5 passes) against ESD-x's ``paper`` iteration measured in the same
run, on one style; then erases the style with ItD's ``paper`` preset and prints its gate's reconstruction shift on
prompts that name the style and prompts that do not, against the threshold.

Run::

    .venv/bin/python benchmarks/inference_erasers_cost.py --iters 4 --threads 2

Prints Markdown. Times on a shared machine move with its load; the ratio to ESD-x less so.
"""

from __future__ import annotations

import argparse

import torch

PROMPTS = ("{c}", "An image in {c} style.", "A cat image in {c} style.", "a dog drawn in {c} style",
           "{c} style artwork", "A cat image in sketch style.", "A cat image.", "An image in vintage style.")  # fmt: skip


def seconds_per_iteration(
    model, method: str, concept: str, iters: int, preset: str = "paper", **extra
) -> float:
    from erasekit.registry import erase

    art = erase(model, [concept], method, preset, iterations=iters, **extra)
    return art.erase_seconds / iters


def main() -> None:
    import erasekit
    from erasekit.methods.itd import layer_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concept", default="mosaic")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = erasekit.load("minicanvas")
    c = args.concept
    esd = seconds_per_iteration(model, "esd-x", c, args.iters)
    print("| method | s / iteration | ESD-x iterations | 500 iterations |")
    print("|---|---|---|---|")
    for label, preset in (
        ("receler:paper", "paper"),
        ("receler:release", "release"),
        ("receler:budget", "budget"),
    ):
        sec = seconds_per_iteration(model, "receler", c, args.iters, preset)
        print(f"| {label} | {sec:.2f} | {sec / esd:.2f} | {sec * 500 / 60:.1f} min |")
    print(f"| esd-x:paper | {esd:.2f} | 1.00 | |")

    art = erasekit.erase(model, [c], "itd")
    (module,) = art.modules
    sae, layer = module.build(), int(module.attach.rsplit(".", 1)[1])
    prompts = [p.format(c=c) for p in PROMPTS]
    padded, _ = layer_outputs(model.pipeline, layer, prompts)
    with torch.no_grad():
        shifts = sae.shift(padded)
    print(f"\nitd:paper on {c}: {art.erase_seconds:.0f} s, {len(module.config['features'])} features, "
          f"threshold {module.config['threshold']:.2f}")  # fmt: skip
    print("\n| prompt | shift | gated |\n|---|---|---|")
    for p, s in zip(prompts, shifts.tolist()):
        print(f"| {p} | {s:.2f} | {s >= module.config['threshold']} |")


if __name__ == "__main__":
    main()
