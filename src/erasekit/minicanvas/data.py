"""MiniCanvas training data: rendered image sets and batched caption sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from erasekit.minicanvas.render import render
from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES, CaptionMix, sample_caption
from erasekit.progress import track


@dataclass(frozen=True)
class RenderSet:
    """Rendered images with their grid cells.

    Attributes:
        images: float ``[N, 3, 32, 32]`` in [-1, 1].
        cells: int64 ``[N, 2]``: (object index, style index) of each image.
    """

    images: torch.Tensor
    cells: torch.Tensor

    def __len__(self) -> int:
        return len(self.cells)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 32, 32, 3]`` -> float ``[N, 3, 32, 32]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, 32, 32]`` in [-1, 1] -> uint8 ``[N, 32, 32, 3]``."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def render_set(per_cell: int, rng: np.random.Generator, desc: str = "render") -> RenderSet:
    """``per_cell`` renders of every (object, style) cell, cell-major order.

    Args:
        per_cell: images per cell; the set has ``12 * 12 * per_cell`` images.
        rng: the only source of randomness.
    """
    cells = [
        (o, s) for o in range(len(OBJECT_NAMES)) for s in range(len(STYLE_NAMES)) for _ in range(per_cell)
    ]
    images = np.stack(
        [render(OBJECT_NAMES[o], STYLE_NAMES[s], rng) for o, s in track(cells, desc=desc, total=len(cells))]
    )
    return RenderSet(to_tensor(images), torch.tensor(cells, dtype=torch.int64))


def sample_captions(
    cells: torch.Tensor, rng: np.random.Generator, mix: CaptionMix | None = None, dropout: float = 0.0
) -> tuple[list[str], torch.Tensor]:
    """One random caption per image.

    Args:
        cells: int ``[B, 2]`` (object, style) of each image.
        rng: the only source of randomness.
        mix: how captions are drawn.
        dropout: probability of the empty caption (classifier-free guidance's unconditional input).

    Returns:
        ``(captions, named)``: ``named`` is int ``[B, 2]``, the (object, style) a caption names, -1 for none.
    """
    captions, named = [], []
    for o, s in cells.tolist():
        if dropout and rng.random() < dropout:
            captions.append("")
            named.append((-1, -1))
            continue
        caption, no, ns = sample_caption(o, s, rng, mix or CaptionMix())
        captions.append(caption)
        named.append((no, ns))
    return captions, torch.tensor(named, dtype=torch.int64)


def tokenize(tokenizer: object, captions: list[str], max_length: int = 77) -> torch.Tensor:
    """Token ids ``[B, max_length]``, padded with eos as SD1.x does."""
    out = tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return out.input_ids
