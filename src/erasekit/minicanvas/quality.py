"""The MiniCanvas model's quality bars: the base grid classified, the classifier on held-out renders, and the tiny
CLIP's caption->image retrieval (docs/minicanvas.md, "Measured"). Images come from the one generation path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from erasekit.generation import Request, Sampling, render
from erasekit.minicanvas.data import RenderSet, tokenize
from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES, prompt


def default_sampling() -> Sampling:
    """The sampling the quality bars are measured with: the ``minicanvas`` family's steps and guidance."""
    from erasekit.models.families import FAMILIES

    family = FAMILIES["minicanvas"]
    return Sampling(steps=family.steps, guidance=family.guidance)


@dataclass(frozen=True)
class GridResult:
    """Classified generations over (a part of) the grid.

    Attributes:
        cells: int ``[N, 2]`` (object, style) each image was prompted with.
        seeds: int ``[N]`` generator seed of each image.
        object_pred: int ``[N]`` predicted object index.
        style_pred: int ``[N]`` predicted style index.
        images: float ``[N, 3, 32, 32]`` in [-1, 1].
    """

    cells: torch.Tensor
    seeds: torch.Tensor
    object_pred: torch.Tensor
    style_pred: torch.Tensor
    images: torch.Tensor

    @property
    def object_accuracy(self) -> float:
        """Percentage of images whose object is classified as prompted."""
        return 100.0 * (self.object_pred == self.cells[:, 0]).float().mean().item()

    @property
    def style_accuracy(self) -> float:
        """Percentage of images whose style is classified as prompted."""
        return 100.0 * (self.style_pred == self.cells[:, 1]).float().mean().item()


def generate(
    pipe: Any, prompts: list[str], seeds: list[int], sampling: Sampling, batch_size: int = 64
) -> torch.Tensor:
    """One image per (prompt, seed) through :func:`erasekit.generation.render`: float ``[N, 3, H, W]`` in [-1, 1]."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    requests = [Request(seed=int(s), prompt=p) for p, s in zip(prompts, seeds)]
    images = render(pipe, requests, sampling, batch_size=batch_size, desc="generate")  # [H, W, 3] in [0, 1]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0


def grid_cells(
    objects: list[str] | None = None, styles: list[str] | None = None, seeds: int = 2, seed_base: int = 0
) -> tuple[torch.Tensor, list[int]]:
    """Every (object, style, seed) to generate: cells int ``[N, 2]`` and seeds ``[N]``, cell-major order."""
    objs = [OBJECT_NAMES.index(o) for o in (objects or OBJECT_NAMES)]
    stys = [STYLE_NAMES.index(s) for s in (styles or STYLE_NAMES)]
    rows = [(o, s, seed_base + k) for o in objs for s in stys for k in range(seeds)]
    return torch.tensor([r[:2] for r in rows], dtype=torch.int64), [r[2] for r in rows]


def classify(classifier: Any, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted (object index ``[N]``, style index ``[N]``) of images ``[N, 3, 32, 32]`` in [-1, 1]."""
    objs, stys = [], []
    for i in range(0, len(images), batch):
        o, s = classifier.predict(images[i : i + batch])
        objs.append(o.argmax(-1).cpu())
        stys.append(s.argmax(-1).cpu())
    return torch.cat(objs), torch.cat(stys)


def evaluate_grid(
    pipe: Any,
    classifier: Any,
    *,
    objects: list[str] | None = None,
    styles: list[str] | None = None,
    seeds: int = 2,
    sampling: Sampling | None = None,
    batch_size: int = 64,
) -> GridResult:
    """Generate ``A {object} image in {style} style.`` for every cell and seed, and classify the images.

    ``sampling``: :func:`default_sampling` when ``None``.
    """
    cells, seed_list = grid_cells(objects, styles, seeds)
    prompts = [prompt(OBJECT_NAMES[o], STYLE_NAMES[s]) for o, s in cells.tolist()]
    images = generate(pipe, prompts, seed_list, sampling or default_sampling(), batch_size)
    obj_pred, sty_pred = classify(classifier, images)
    return GridResult(cells, torch.tensor(seed_list), obj_pred, sty_pred, images)


def heldout_accuracy(classifier: Any, data: RenderSet) -> dict[str, float]:
    """The classifier's object and style accuracy (percent) on held-out renders."""
    obj_pred, sty_pred = classify(classifier, data.images)
    return {
        "object": 100.0 * (obj_pred == data.cells[:, 0]).float().mean().item(),
        "style": 100.0 * (sty_pred == data.cells[:, 1]).float().mean().item(),
    }


@torch.no_grad()
def retrieval_accuracy(clip: dict[str, Any], tokenizer: Any, data: RenderSet) -> float:
    """Caption->image top-1 retrieval of the tiny CLIP, in percent.

    For each template caption of the 144 cells, pick among a gallery holding one held-out render per cell;
    gallery k holds the k-th render of every cell, and the score is averaged over all galleries.

    Args:
        clip: ``{"text_encoder", "tower", "head"}`` from contrastive pretraining.
        data: held-out renders, cell-major with the same count per cell.
    """
    n_cells = len(OBJECT_NAMES) * len(STYLE_NAMES)
    per_cell = len(data) // n_cells
    captions = [prompt(o, s) for o in OBJECT_NAMES for s in STYLE_NAMES]
    text = clip["head"](clip["text_encoder"](tokenize(tokenizer, captions)).pooler_output)
    text = torch.nn.functional.normalize(text, dim=-1)  # [144, E]
    hits = []
    for k in range(per_cell):
        pick = torch.arange(n_cells) * per_cell + k
        image = torch.nn.functional.normalize(clip["tower"](data.images[pick]), dim=-1)  # [144, E]
        hits.append((text @ image.T).argmax(-1) == torch.arange(n_cells))
    return 100.0 * torch.cat(hits).float().mean().item()
