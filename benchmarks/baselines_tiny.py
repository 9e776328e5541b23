"""Erase times of the baseline methods on a tiny seeded SD1.x pipeline, or on MiniCanvas's architecture.

``--arch tiny``: ``erasekit.models.tiny`` (sd15). ``--arch minicanvas``: the MiniCanvas networks
(``erasekit.minicanvas.models``, 128-wide 6-block CLIP, UNet 64/128/128 on 8x8 latents) with seeded random
weights, so that the leaderboard's cost can be planned before the trained weights exist.

Closed-form methods run at their ``paper`` preset. Trained methods run their ``paper`` preset with the
iteration count cut to ``--iters`` (``steps`` / ``epochs`` for HiRM ablations and few-shot TE), and the table
gives seconds per iteration, so the full paper budget can be extrapolated; it is named in the last column.

Run::

    .venv/bin/python benchmarks/baselines_tiny.py --iters 3 --threads 1
    .venv/bin/python benchmarks/baselines_tiny.py --iters 3 --threads 1 --arch minicanvas

Prints a Markdown table: wall seconds (``erase_seconds`` of the patch) and CPU seconds of the process (all
threads), which is less sensitive to other jobs on the machine. Random weights: times only, never quality.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

CONCEPT = "circle"
PAPER_BUDGET = {  # method -> (field cut to --iters, its paper value)
    "esd-x": ("iterations", 200),
    "esd-u": ("iterations", 200),
    "advunlearn": ("iterations", 1000),
    "fewshot-te": ("epochs", 5),
    "hirm-ablate-block0": ("steps", 15),
    "hirm-ablate-all": ("steps", 15),
    "hirm-ablate-last": ("steps", 15),
}
METHODS = ("uce", "rece", "speed", "mace-cfr", *PAPER_BUDGET)


def noise_images(concept: str, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def build(arch: str, tmp: str) -> object:
    """A :class:`~erasekit.LoadedModel` of seeded random weights with the named architecture."""
    import erasekit

    if arch == "tiny":
        from erasekit.models.tiny import write_model

        return erasekit.load(write_model("sd15", f"{tmp}/sd15", "tiny"))
    from erasekit.minicanvas.build import assemble
    from erasekit.minicanvas.models import Sizes, build_text_encoder, build_unet, build_vae
    from erasekit.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    sizes = Sizes()
    pipe = assemble(build_text_encoder(sizes), clip_tokenizer(), build_vae(sizes), build_unet(sizes))
    pipe.save_pretrained(f"{tmp}/minicanvas")
    return erasekit.load(f"{tmp}/minicanvas")


def main() -> None:
    import erasekit
    from erasekit import progress
    from erasekit.methods.fewshot_te import erase_fewshot_te
    from erasekit.registry import make_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=3, help="iterations of the trained methods")
    parser.add_argument("--arch", choices=("tiny", "minicanvas"), default="tiny", help="which architecture")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 resists other jobs best)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(args.arch, tmp)
        print("| method | run | wall s | CPU s | wall s per unit of the cut field | paper budget |")
        print("|---|---|---|---|---|---|")
        for method in METHODS:
            field, paper = PAPER_BUDGET.get(method, (None, None))
            overrides = {field: args.iters} if field else {}
            config = make_config(method, "paper", "object", **overrides)
            cpu, wall = time.process_time(), time.perf_counter()
            if method == "fewshot-te":  # random stand-in images; MiniCanvas renders need the real model size
                erase_fewshot_te(model, [CONCEPT], config, images=noise_images)
            else:
                erasekit.erase(model, [CONCEPT], method, config=config)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            run = f"{field}={args.iters}" if field else "paper preset"
            per = f"{wall / args.iters:.3f}" if field else ""
            print(
                f"| {method} | {run} | {wall:.2f} | {cpu:.2f} | {per} | {f'{field}={paper}' if field else ''} |"
            )


if __name__ == "__main__":
    main()
