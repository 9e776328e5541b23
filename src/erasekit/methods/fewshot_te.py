"""Few-shot text-encoder unlearning (Fuchi & Takagi, BMVC 2024): gradient ascent on the textual-inversion loss.

With a few real images x₀ of the concept (about 4), each step takes a batch of them, noises each at its own random
timestep, and *ascends* ‖ε − ε(x_t, t, E_θ(template(concept)))‖², with one textual-inversion template per image.
Only the text encoder trains: every block's MLP ``fc1``/``fc2`` plus the last block's self-attention (q/k/v/out),
chosen with :mod:`erasekit.models.families`. The encoder is restored exactly before returning.

The ``paper`` preset follows ``train.py``, ``data.py`` and ``utils.py`` of fmp453/few-shot-erasing at
c0e53da54103c5d99f495f6f4cc1eba47adcba3d (last change to them: 8296aab7): batch 2 over 4 images for 5 epochs
(10 steps), reshuffled every epoch; Adam (not AdamW) with lr 1e-5, betas (0.9, 0.98), eps 1e-6 and weight decay
1e-8; the textual-inversion templates of diffusers' example, the style ones for styles; each image flipped
horizontally with probability 0.5 and encoded once with a *sampled* VAE latent (``latent_dist.sample()``).

Images come from ``config.images``: ``"minicanvas"`` renders ground truth with
:func:`erasekit.minicanvas.render.render` (an object in random styles, or a style on random objects: MiniCanvas's
stand-in for the authors' real photographs), any other value is a folder (``folder/<concept>/`` when it exists,
else ``folder/`` itself). Code calling :func:`erase_fewshot_te` directly may pass ``images=`` a callable
``(concept, n, seed) -> list of HxWx3 uint8 arrays`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.denoising import check_unet_family, encode_prompts, noised
from erasekit.errors import ErasekitError
from erasekit.methods.common import (
    check_choice,
    check_positive,
    frozen,
    generator,
    trained_in_place,
)
from erasekit.models.families import block_linear_names, num_blocks
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import Strength, register

ImageSource = Callable[[str, int, int], Sequence[np.ndarray]]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONCEPT_TYPES = ("style", "object", "nsfw")
#: Textual inversion's ``imagenet_templates_small`` (diffusers' example; the release's ``data.py``), for objects.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)  # fmt: skip
#: Textual inversion's ``imagenet_style_templates_small`` (the release uses them for ``--concept_type style``).
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}",
    "a dirty painting in the style of {}", "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class FewShotTEConfig:
    """Settings of few-shot unlearning; defaults are the release's (4 images, batch 2, 5 epochs, Adam 1e-5)."""

    concept_type: str = field(
        default="object", metadata={"help": "style, object or nsfw: picks the default templates"}
    )
    images: str = field(
        default="minicanvas", metadata={"help": "'minicanvas' (ground-truth renders) or a folder"}
    )
    n_images: int = field(default=4, metadata={"help": "real images of each concept"})
    epochs: int = field(default=5, metadata={"help": "passes over the images (the strength knob)"})
    batch_size: int = field(default=2, metadata={"help": "images per step (the last batch may be smaller)"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.98), metadata={"help": "Adam betas"})
    eps: float = field(default=1e-6, metadata={"help": "Adam eps"})
    weight_decay: float = field(default=1e-8, metadata={"help": "Adam's (L2) weight decay"})
    flip_p: float = field(
        default=0.5, metadata={"help": "chance of flipping each image once, before encoding"}
    )
    templates: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "prompt templates with one '{}'; None = textual inversion's, per concept type"},
    )
    seed: int = field(
        default=0, metadata={"help": "seed of renders, flips, latents, batches, templates and noise"}
    )

    def __post_init__(self) -> None:
        check_choice("concept_type", self.concept_type, CONCEPT_TYPES)
        check_positive(n_images=self.n_images, epochs=self.epochs, lr=self.lr, eps=self.eps)
        check_positive(batch_size=self.batch_size)
        if not self.images.strip():
            raise ValueError("images must be 'minicanvas' or a folder")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0 or not 0 <= self.flip_p <= 1:
            raise ValueError("weight_decay must be >= 0 and flip_p in [0, 1]")
        if self.templates is None:  # frozen: fill the derived default once, so a saved config states it
            default = STYLE_TEMPLATES if self.concept_type == "style" else OBJECT_TEMPLATES
            object.__setattr__(self, "templates", default)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("every template must contain exactly one '{}'")


def trainable_names(encoder: torch.nn.Module) -> list[str]:
    """fc1/fc2 of every block and the last block's q/k/v/out projections (weights and biases)."""
    modules = [m for b in range(num_blocks(encoder)) for m in block_linear_names(encoder, b, ("mlp",))]
    modules += block_linear_names(encoder, -1, ("attn",))
    return [f"{m}.{p}" for m in modules for p, _ in encoder.get_submodule(m).named_parameters(recurse=False)]


def minicanvas_images(concept: str, n: int, seed: int) -> list[np.ndarray]:
    """``n`` ground-truth MiniCanvas renders of ``concept`` (uint8 ``[32, 32, 3]`` each)."""
    from erasekit.minicanvas.render import render
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES, concept_info

    try:
        info = concept_info(concept)
    except ErasekitError as e:
        raise ErasekitError(
            f"fewshot-te renders only MiniCanvas concepts; pass --images FOLDER for others ({e})"
        ) from None
    rng = np.random.default_rng(seed)
    if info.kind == "object":
        return [render(info.name, STYLE_NAMES[rng.integers(len(STYLE_NAMES))], rng) for _ in range(n)]
    return [render(OBJECT_NAMES[rng.integers(len(OBJECT_NAMES))], info.name, rng) for _ in range(n)]


def folder_images(folder: str, concept: str, n: int) -> list[np.ndarray]:
    """The first ``n`` images (sorted by name) of ``folder/<concept>/``, or of ``folder/`` without one."""
    from PIL import Image

    root = Path(folder).expanduser()
    root = root / concept if (root / concept).is_dir() else root
    files = sorted(p for p in root.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if not files:
        raise ErasekitError(f"fewshot-te: no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in files[:n]]


@torch.no_grad()
def encode_images(
    pipe: Any, images: Sequence[np.ndarray], generator: torch.Generator | None = None
) -> torch.Tensor:
    """VAE latents × scaling factor of uint8 images resized (bicubic) to the pipeline's resolution.

    Args:
        generator: draw each latent from the VAE posterior, as the release does (``latent_dist.sample()``);
            ``None`` takes the posterior mean.

    Returns:
        ``[n, C, h, w]``.
    """
    from PIL import Image

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    arrays = [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images]
    x = (
        torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    )  # [n, 3, H, W] in [-1, 1]
    posterior = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    latents = posterior.mean if generator is None else posterior.sample(generator=generator)
    return latents * pipe.vae.config.scaling_factor


def flipped(images: Sequence[np.ndarray], p: float, g: torch.Generator) -> list[np.ndarray]:
    """Each image mirrored left-right with probability ``p`` (the release's one random flip per image)."""
    return [
        np.ascontiguousarray(im[:, ::-1]) if float(torch.rand((), generator=g)) < p else im for im in images
    ]


def batches(n: int, size: int, epochs: int, g: torch.Generator) -> list[list[int]]:
    """Indices of every step: each epoch a fresh permutation of ``range(n)`` cut into batches of ``size``."""
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).tolist()
        out += [order[i : i + size] for i in range(0, n, size)]
    return out


def train(
    pipe: Any,
    data: list[tuple[str, torch.Tensor]],
    config: FewShotTEConfig,
    params: dict[str, torch.Tensor],
    g: torch.Generator | None = None,
) -> list[float]:
    """Gradient ascent over ``(concept, latents [n, C, h, w])`` pairs; returns each step's (positive) TI loss.

    Args:
        g: the run's generator (batches, templates, timesteps, noise); a fresh one from ``config.seed`` if None.
    """
    g, losses = (g if g is not None else generator(config.seed)), []
    opt = torch.optim.Adam(
        params.values(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    items = [(c, lat[j]) for c, lat in data for j in range(lat.shape[0])]
    steps = batches(len(items), config.batch_size, config.epochs, g)
    templates = config.templates or ()
    for step in track(steps, desc="fewshot-te", total=len(steps)):
        picks = torch.randint(len(templates), (len(step),), generator=g).tolist()
        prompts = [templates[p].format(items[j][0]) for p, j in zip(picks, step)]
        x_t, target, t = noised(pipe, torch.stack([items[j][1] for j in step]), g)
        pred = pipe.unet(x_t, t, encoder_hidden_states=encode_prompts(pipe, prompts)).sample
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        (-loss).backward()
        opt.step()
        losses.append(loss.item())
    return losses


def erase_fewshot_te(
    model: Any, concepts: list[str], config: FewShotTEConfig, images: ImageSource | None = None
) -> Patch:
    """Few-shot unlearning: ascend the textual-inversion loss of a few real images in the text encoder.

    Args:
        images: optional ``(concept, n, seed) -> images`` overriding ``config.images``.
    """
    pipe = check_unet_family(model, "fewshot-te")
    if images is None and config.images == "minicanvas":
        images = minicanvas_images
    elif images is None:
        images = lambda concept, n, seed: folder_images(config.images, concept, n)  # noqa: E731
    g = generator(config.seed)
    data = []
    for i, c in enumerate(concepts):
        shots = flipped(images(c, config.n_images, config.seed + i), config.flip_p, g)
        data.append((c, encode_images(pipe, shots, g)))
    with (
        frozen(pipe.unet, pipe.vae),
        trained_in_place(pipe.text_encoder, trainable_names(pipe.text_encoder)) as params,
    ):
        train(pipe, data, config, params, g)
        new = {n: p.detach().clone() for n, p in params.items()}
    return Patch.from_tensors(model, "text_encoder", new, method="fewshot-te", concepts=tuple(concepts))


register(
    "fewshot-te",
    FewShotTEConfig,
    presets={"paper": {}},
    strength=Strength("epochs", (5, 10, 20, 40, 80)),
    summary="Few-shot TE unlearning: gradient ascent on the textual-inversion loss of a few real images",
)(erase_fewshot_te)
