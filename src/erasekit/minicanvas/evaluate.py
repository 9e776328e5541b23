"""Generate with the MiniCanvas pipeline and classify what comes out; measure the tiny CLIP's retrieval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from erasekit.minicanvas.data import RenderSet, tokenize
from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES, prompt
from erasekit.progress import track

#: Sampling settings the quality bars are measured with.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


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


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    negative_prompt: str | None = None,
) -> torch.Tensor:
    """Generate one image per (prompt, seed) with the diffusers pipeline itself.

    Each image has its own ``torch.Generator``, so an image depends only on its prompt and seed, never on the
    batch it shares.

    Returns:
        float ``[N, 3, H, W]`` in [-1, 1].
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    device = pipe.unet.device
    out = []
    chunks = range(0, len(prompts), batch_size)
    for i in track(chunks, desc="generate", total=len(chunks)):
        gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        batch = prompts[i : i + batch_size]
        neg = None if negative_prompt is None else [negative_prompt] * len(batch)
        images = pipe(
            prompt=batch,
            negative_prompt=neg,
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pt",
        ).images  # [B, 3, H, W] in [0, 1]
        out.append(images.float().cpu() * 2.0 - 1.0)
    return torch.cat(out)


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
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
) -> GridResult:
    """Generate ``A {object} image in {style} style.`` for every cell and seed, and classify the images."""
    cells, seed_list = grid_cells(objects, styles, seeds)
    prompts = [prompt(OBJECT_NAMES[o], STYLE_NAMES[s]) for o, s in cells.tolist()]
    images = generate(pipe, prompts, seed_list, steps=steps, guidance=guidance, batch_size=batch_size)
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
