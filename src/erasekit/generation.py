"""Deterministic generation through the pipeline's own ``__call__``, one seeded generator per image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from erasekit.errors import ErasekitError
from erasekit.progress import track


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    desc: str = "generating",
) -> list[np.ndarray]:
    """Generate one image per (prompt, seed) pair.

    Args:
        pipe: a diffusers text-to-image pipeline.
        prompts: N prompts.
        seeds: N seeds; image i is drawn from ``torch.Generator(device).manual_seed(seeds[i])``, so it does not
            depend on the batch it falls in.
        steps, guidance, height, width: passed to the pipeline.
        batch_size: images per pipeline call (a runtime setting).

    Returns:
        N uint8 arrays ``[H, W, 3]``.
    """
    if len(prompts) != len(seeds):
        raise ErasekitError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if steps < 1 or batch_size < 1:
        raise ErasekitError("steps and batch size must be at least 1")
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if torch.device(device).type == "mps" else device
    images: list[np.ndarray] = []
    starts = range(0, len(prompts), batch_size)
    for start in track(starts, desc=desc, total=len(starts)):
        chunk = slice(start, start + batch_size)
        gens = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds[chunk]]
        out = pipe(
            prompt=list(prompts[chunk]),
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            output_type="np",
        )
        images += [to_uint8(img) for img in out.images]
    return images


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` floats in [0, 1] to uint8."""
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def save_png(img: np.ndarray, path: Any) -> None:
    """Write a PNG atomically."""
    import io

    from PIL import Image

    from erasekit.io import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
