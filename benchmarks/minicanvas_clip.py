"""The tiny CLIP stage of MiniCanvas alone: caption->image retrieval and how far apart object words end up.

Trains only ``train_clip`` (seed 0 data and generators, as ``erasekit minicanvas train`` does) for each variant
and prints its retrieval top-1 and the highest cosine similarity between the last hidden states (first 8
positions) of two object captions ``A {object} image.``. A value near 1 means the UNet cannot tell those two
objects apart. This is the measurement behind "Why LiT" in ``docs/minicanvas.md``.

Run (about 8 minutes on 2 idle cores)::

    .venv/bin/python benchmarks/minicanvas_clip.py                      # joint towers vs LiT
    .venv/bin/python benchmarks/minicanvas_clip.py --variant lit --clip-steps 1000
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

VARIANTS = {"joint": {"clip_tower_steps": 0}, "lit": {}}


def closest_pair(
    text_encoder: torch.nn.Module, tokenizer: object, captions: list[str]
) -> tuple[float, int, int]:
    """The highest cosine between two captions' flattened first-8-position states, and which two."""
    from erasekit.minicanvas.data import tokenize

    with torch.no_grad():
        states = text_encoder(tokenize(tokenizer, captions)).last_hidden_state[:, :8].flatten(1)
    unit = torch.nn.functional.normalize(states, dim=-1)
    cos = unit @ unit.T - 2 * torch.eye(len(captions))
    i = int(cos.argmax())
    return float(cos.max()), i // len(captions), i % len(captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), action="append", help="default: all")
    parser.add_argument(
        "--clip-steps", type=int, default=None, help="contrastive steps (default: TrainConfig's)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from erasekit.minicanvas.build import _seeds
    from erasekit.minicanvas.data import render_set
    from erasekit.minicanvas.quality import retrieval_accuracy
    from erasekit.minicanvas.train import TrainConfig, train_clip
    from erasekit.minicanvas.world import OBJECT_NAMES
    from erasekit.models.tokenizer import clip_tokenizer
    from erasekit.progress import set_enabled

    torch.set_num_threads(args.threads)
    set_enabled(False)
    tokenizer = clip_tokenizer()
    for name in args.variant or sorted(VARIANTS):
        overrides = dict(VARIANTS[name])
        if args.clip_steps is not None:
            overrides["clip_steps"] = args.clip_steps
        cfg = replace(TrainConfig(), **overrides)
        rngs = _seeds(cfg.seed)
        torch.manual_seed(cfg.seed)
        data = render_set(cfg.per_cell, rngs["render_train"])
        heldout = render_set(cfg.heldout_per_cell, rngs["render_heldout"])
        start = time.perf_counter()
        clip = train_clip(data, cfg, tokenizer, rngs["clip"], lambda _: None)
        seconds = time.perf_counter() - start
        cos, a, b = closest_pair(clip["text_encoder"], tokenizer, [f"A {o} image." for o in OBJECT_NAMES])
        row = {"variant": name, "clip_steps": cfg.clip_steps, "tower_steps": cfg.clip_tower_steps,
               "seconds": round(seconds), "retrieval_top1": round(retrieval_accuracy(clip, tokenizer, heldout), 1),
               "closest_objects": [OBJECT_NAMES[a], OBJECT_NAMES[b]], "cosine": round(cos, 3)}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
