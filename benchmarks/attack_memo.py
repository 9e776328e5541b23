"""The black-box attack columns of a bench, with and without the base-model memo (docs/benchmarks.md).

    python benchmarks/attack_memo.py [--concept neon] [--train-steps 20] [--threads 1]

A bench attacks every row of a concept with one budget. This times what one shard does for one concept: the
base row and three erasures (``uce:paper``, ``speed:paper``, ``leace:paper``: closed forms, so erasing costs
nothing here), each attacked through ``run_attack`` (the full attack cell: prompts, attack, generation, scoring,
run record) by

- ``latent-inversion-transfer`` (its ``paper`` budget at 2 prompts), and
- ``textual-inversion-transfer`` (``quick`` at 2 prompts, with ``--train-steps`` optimiser steps instead of
  200 so the run stays short; the learning is what the memo saves, so the ratio grows with the steps).

Two variants, interleaved per row: ``memo`` (what ships: the base-model part is made once per process) and
``plain`` (inside ``_memo.disabled()``: every cell makes it afresh, as every cell did before). The rows' learned
embeddings and inverted latents are compared between the variants: they must be equal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import erasekit
from erasekit.attacks import _memo
from erasekit.attacks.run import run_attack

ROWS = ("base", "uce", "speed", "leace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="neon")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = erasekit.load("minicanvas")
    patches = {
        r: None if r == "base" else erasekit.erase(model, [args.concept], r, preset="paper") for r in ROWS
    }
    attacks = {
        "latent-inversion-transfer": ("paper", {"prompts": 2}),
        "textual-inversion-transfer": ("quick", {"prompts": 2, "train_steps": args.train_steps}),
    }
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.threads} thread(s); concept {args.concept}")
    with tempfile.TemporaryDirectory() as tmp:
        for attack, (preset, budget) in attacks.items():
            seconds = {"memo": [], "plain": []}
            saved: dict[str, list[dict[str, torch.Tensor]]] = {"memo": [], "plain": []}
            _memo.clear()
            for row in ROWS:
                for variant in ("memo", "plain"):
                    out = Path(tmp) / f"{attack}-{variant}-{row}"
                    start = time.perf_counter()
                    with _memo.disabled() if variant == "plain" else contextlib.nullcontext():
                        run_attack(model, args.concept, attack, out, preset=preset, budget=budget, seeds=2,
                                   patches=[] if patches[row] is None else [patches[row]])  # fmt: skip
                    seconds[variant].append(time.perf_counter() - start)
                    saved[variant].append(load_file(str(out / "embeddings.safetensors")))
            same = all(
                torch.equal(a[k], b[k]) for a, b in zip(saved["memo"], saved["plain"], strict=True) for k in a
            )
            memo, plain = sum(seconds["memo"]), sum(seconds["plain"])
            print(f"{attack} ({preset}, {budget}): {len(ROWS)} rows, plain {plain:.1f} s "
                  f"({', '.join(f'{s:.1f}' for s in seconds['plain'])}), memo {memo:.1f} s "
                  f"({', '.join(f'{s:.1f}' for s in seconds['memo'])}), {plain / memo:.2f}x; "
                  f"outputs equal: {same}")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
