"""Few-shot text-encoder unlearning (Fuchi & Takagi, BMVC 2024): gradient ascent on the textual-inversion loss.

With a few real images x₀ of the concept (about 4), each step encodes one image with the VAE, noises it at a
random timestep, and *ascends* ‖ε − ε(x_t, t, E_θ(template(concept)))‖², with ImageNet-style templates. Only
the text encoder trains: every block's MLP ``fc1``/``fc2`` plus the last block's self-attention
(q/k/v/out), chosen with :mod:`erasekit.models.families`. The encoder is restored exactly before returning.

Images come from ``config.images``: ``"minicanvas"`` renders ground truth with
:func:`erasekit.minicanvas.render.render` (an object in random styles, or a style on random objects), any
other value is a folder (``folder/<concept>/`` when it exists, else ``folder/`` itself). Code calling
:func:`erase_fewshot_te` directly may pass ``images=`` a callable ``(concept, n, seed) -> list of HxWx3 uint8
arrays`` instead.
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
from erasekit.methods.common import check_positive, frozen, generator, trained_in_place
from erasekit.models.families import block_linear_names, num_blocks
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import register

ImageSource = Callable[[str, int, int], Sequence[np.ndarray]]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a bright photo of the {}",
    "a close-up photo of a {}",
    "a good photo of the {}",
    "a photo of the large {}",
)


@dataclass(frozen=True, kw_only=True)
class FewShotTEConfig:
    """Settings of few-shot unlearning; defaults are the authors' (4 images, Adam 1e-5, 5 epochs)."""

    images: str = field(
        default="minicanvas", metadata={"help": "'minicanvas' (ground-truth renders) or a folder"}
    )
    n_images: int = field(default=4, metadata={"help": "real images of each concept"})
    epochs: int = field(default=5, metadata={"help": "passes over the images (one step per image)"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate"})
    templates: tuple[str, ...] = field(default=TEMPLATES, metadata={"help": "prompt templates with one '{}'"})
    seed: int = field(default=0, metadata={"help": "seed of renders, templates, timesteps and noise"})

    def __post_init__(self) -> None:
        check_positive(n_images=self.n_images, epochs=self.epochs, lr=self.lr)
        if not self.images.strip():
            raise ValueError("images must be 'minicanvas' or a folder")
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
def encode_images(pipe: Any, images: Sequence[np.ndarray]) -> torch.Tensor:
    """VAE latents (posterior mean × scaling factor) of uint8 images resized to the pipeline's resolution.

    Returns:
        ``[n, C, h, w]``.
    """
    from PIL import Image

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    arrays = [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
    x = (
        torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    )  # [n, 3, H, W] in [-1, 1]
    x = x.to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def train(
    pipe: Any, data: list[tuple[str, torch.Tensor]], config: FewShotTEConfig, params: dict[str, torch.Tensor]
) -> list[float]:
    """Gradient ascent over ``(concept, latents [n, C, h, w])`` pairs; returns each step's (positive) TI loss."""
    g, losses = generator(config.seed), []
    opt = torch.optim.Adam(params.values(), lr=config.lr)
    steps = [
        (c, lat[j : j + 1]) for _ in range(config.epochs) for c, lat in data for j in range(lat.shape[0])
    ]
    for concept, x0 in track(steps, desc="fewshot-te", total=len(steps)):
        template = config.templates[int(torch.randint(len(config.templates), (), generator=g))]
        x_t, target, t = noised(pipe, x0, g)
        pred = pipe.unet(
            x_t, t, encoder_hidden_states=encode_prompts(pipe, [template.format(concept)])
        ).sample
        loss = F.mse_loss(pred, target)
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
    data = [
        (c, encode_images(pipe, images(c, config.n_images, config.seed + i))) for i, c in enumerate(concepts)
    ]
    with (
        frozen(pipe.unet, pipe.vae),
        trained_in_place(pipe.text_encoder, trainable_names(pipe.text_encoder)) as params,
    ):
        train(pipe, data, config, params)
        new = {n: p.detach().clone() for n, p in params.items()}
    return Patch.from_tensors(model, "text_encoder", new, method="fewshot-te", concepts=tuple(concepts))


register(
    "fewshot-te",
    FewShotTEConfig,
    presets={"paper": {}},
    summary="Few-shot TE unlearning: gradient ascent on the textual-inversion loss of a few real images",
)(erase_fewshot_te)
