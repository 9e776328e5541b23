"""Co-Erasing: text-image collaborative erasing (Li et al., ICML 2025), on the UNet with ESD's loop.

Followed: Ferry-Li/Co-Erasing at commit f9b06b0bcceb9c2532576d7cdf994d43df3795e0 (``main.py``,
``train/text_trainer.py``, ``train/image_trainer.py``, ``utils/{helpers,model_utils,diffusion_utils,
training_utils}.py``, ``generate_data.py``, ``train.sh``, ``readme.md``).

**Stage 1, text** (``--modality text``): ESD with the unconditional target, on the ``noxattn`` parameters,
x_t ``[1, C, h, w]`` sampled with the model being trained and without guidance (the release's
``denoise_to_text_timestep`` calls the UNet with the prompt alone)::

    L₁ = ‖ε_θ(x_t, c, t) − [ε*(x_t, ∅, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))]‖²

**Stage 2, image** (``--modality image --text_uncond --text_guide``): the frozen model is now the stage-1
model ε₁ (the release loads ``--unet_ckpt_path`` into both UNets). Each iteration takes a base-model image of the
concept (``generate_data.py``), turns it into k = 4 image tokens, refines them by attention over the concept's
text rows (``softmax(Q Kᵀ/√D) V``, K = V = c) and appends them to the conditioning, ``[c; img]`` ``[1, L + k, D]``;
x_t is Gaussian-blurred (kernel ``blur``, σ = 0.3((k−1)/2 − 1) + 0.8, torchvision's default) before every
prediction::

    L₂ = ‖ε_θ(x̃_t, [c; img], t) − [ε₁(x̃_t, ∅, t) − η (ε₁(x̃_t, [c; img], t) − ε₁(x̃_t, ∅, t))]‖²

**The image tokens** come from a small image adapter standing in for IP-Adapter (:mod:`._image_adapter`): a
Linear + LayerNorm on the image's clean VAE latents, trained here with the frozen base UNet on base-model images
of MiniCanvas captions, its rows read through the UNet's own attn2 (appended to the text rows), used only during
training. The result is a plain Patch of the ``noxattn`` UNet tensors.

Presets: ``paper`` is ``train.sh`` (stage 2 ``noxattn``, 100 images, blur 3, 1000 iterations; stage 1 1000
iterations, both lr 1e-5, η 1); ``readme`` the README's command (stage 2 ``full``, 200 images, blur 5, 1500
iterations); ``budget`` cuts both stages to 100 iterations and 32 images (docs/baselines.md, "Co-Erasing").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.denoising import check_unet_family, encode_prompts, predict_noise
from erasekit.methods import _image_adapter as ia
from erasekit.methods.common import check_choice, check_positive, frozen, generator, in_path, trainable_copies
from erasekit.methods.esd import detached, diffusion_loop, esd_loss
from erasekit.patch import Patch
from erasekit.registry import Strength, register

PARAMETER_SETS = ("noxattn", "full")


@dataclass(frozen=True, kw_only=True)
class CoErasingConfig:
    """Co-Erasing's settings; defaults are ``train.sh`` and ``utils/helpers.py`` of Ferry-Li/Co-Erasing."""

    parameters: str = field(
        default="noxattn",
        metadata={"help": "stage-2 UNet tensors: noxattn (all but attn2 and time_embedding) or full"},
    )
    text_parameters: str = field(
        default="noxattn", metadata={"help": "stage-1 UNet tensors (train.sh: noxattn)"}
    )
    text_iterations: int = field(default=1000, metadata={"help": "stage-1 (text ESD) steps; 0 skips it"})
    iterations: int = field(
        default=1000, metadata={"help": "stage-2 (image) steps, one x_t and one image each"}
    )
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of both stages"})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of both stages"})
    images: int = field(default=100, metadata={"help": "base-model images of the concept (train.sh: 100)"})
    blur: int = field(default=3, metadata={"help": "Gaussian kernel size on x_t in stage 2 (odd; 0: off)"})
    image_tokens: int = field(default=4, metadata={"help": "k, image tokens per image (IP-Adapter: 4)"})
    text_refine: bool = field(default=True, metadata={"help": "text-guided refinement of the image tokens"})
    text_uncond: bool = field(
        default=True, metadata={"help": "the unconditional target has no image tokens (--text_uncond)"}
    )
    ddim_steps: int = field(default=50, metadata={"help": "DDIM schedule x_t is sampled along"})
    start_guidance: float = field(
        default=1.0, metadata={"help": "CFG scale of the partial sampling (the release: none, i.e. 1)"}
    )
    adapter_steps: int = field(default=300, metadata={"help": "training steps of the image adapter"})
    adapter_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the image adapter"})
    adapter_images: int = field(default=64, metadata={"help": "base-model images the adapter trains on"})
    adapter_batch: int = field(default=8, metadata={"help": "images per adapter step"})
    image_steps: int = field(
        default=0, metadata={"help": "denoising steps of the base-model images (0: the model's default)"}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the images, the adapter, the noise and the steps"}
    )

    def __post_init__(self) -> None:
        check_choice("parameters", self.parameters, PARAMETER_SETS)
        check_choice("text_parameters", self.text_parameters, PARAMETER_SETS)
        check_positive(iterations=self.iterations, lr=self.lr, images=self.images, image_tokens=self.image_tokens,
                       ddim_steps=self.ddim_steps, adapter_lr=self.adapter_lr,
                       adapter_images=self.adapter_images, adapter_batch=self.adapter_batch)  # fmt: skip
        if min(self.text_iterations, self.adapter_steps, self.image_steps) < 0:
            raise ValueError("text_iterations, adapter_steps and image_steps must be >= 0")
        if self.negative_guidance < 0 or self.start_guidance < 0:
            raise ValueError("negative_guidance and start_guidance must be >= 0")
        if self.text_parameters == "full" and self.parameters == "noxattn":
            raise ValueError("stage 2 trains from the stage-1 model: its parameters must hold stage 1's")
        if self.blur < 0 or (self.blur and self.blur % 2 == 0):
            raise ValueError(f"blur must be 0 or an odd kernel size, got {self.blur}")


def parameter_names(unet: torch.nn.Module, parameters: str) -> list[str]:
    """``noxattn``: every UNet parameter outside attn2 and the time embedding (the release's ``noxattn``:
    ``'attn2' in name or 'time_embed' in name`` excluded); ``full``: every parameter."""
    names = [n for n, _ in unet.named_parameters()]
    if parameters == "full":
        return names
    return [n for n in names if not in_path(n, "attn2") and not n.startswith("time_embedding.")]


def gaussian_blur(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` of ``x`` ``[B, C, h, w]``: σ = 0.3((k−1)/2 − 1) + 0.8, reflect padding."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    r = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel, dtype=x.dtype, device=x.device)
    w = torch.exp(-0.5 * (r / sigma) ** 2)
    w = w / w.sum()
    weight = (w[:, None] * w[None, :]).expand(x.shape[1], 1, kernel, kernel)  # [C, 1, k, k]
    padded = F.pad(x, [kernel // 2] * 4, mode="reflect")
    return F.conv2d(padded, weight, groups=x.shape[1])


def text_stage(pipe: Any, concepts: Sequence[str], config: CoErasingConfig) -> dict[str, torch.Tensor]:
    """Stage 1: the text ESD of ``train/text_trainer.py``; returns the trained tensors (detached)."""
    names = parameter_names(pipe.unet, config.text_parameters)
    params = trainable_copies(pipe.unet, names)
    with torch.no_grad():
        conds, null = encode_prompts(pipe, list(concepts)), encode_prompts(pipe, [""])  # [K, L, D], [1, L, D]

    def loss(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = {"c": conds[k : k + 1], "from": null, "null": null}
        return esd_loss(pipe.unet, params, x_t, t, emb, config.negative_guidance)

    if config.text_iterations:
        diffusion_loop(pipe, params, conds, loss, config, "co-erasing text", iterations=config.text_iterations,
                       sample_trained=True)  # fmt: skip
    return detached(params)


def image_tokens(model: Any, pipe: Any, concepts: Sequence[str], config: CoErasingConfig) -> torch.Tensor:
    """The image tokens of every reference image, ``[N, k, D]``: the adapter trained, then run on the images
    (refined by the text of each image's concept when ``text_refine``)."""
    g = generator(config.seed + 1)
    captions = ia.adapter_captions(concepts, config.adapter_images, g)
    data = ia.base_latents(model, captions, range(config.adapter_images), config.image_steps)  # [M, C, h, w]
    dim = encode_prompts(pipe, [""]).shape[-1]
    adapter = ia.ImageAdapter(data.shape[1:], config.image_tokens, dim, g)
    ia.train_adapter(pipe, data, captions, adapter, steps=config.adapter_steps, lr=config.adapter_lr,
                     batch=config.adapter_batch, generator=g)  # fmt: skip
    tokens = []
    for k, concept in enumerate(concepts):
        prompts = ia.concept_prompts(concept, config.images)
        seeds = [1_000_000 * (k + 1) + i for i in range(config.images)]  # apart from the adapter's images
        shown = ia.base_latents(model, prompts, seeds, config.image_steps)  # [n, C, h, w]
        with torch.no_grad():
            rows = adapter(shown.float().to(pipe.unet.device))  # [n, k, D]
            if config.text_refine:
                rows = ia.refine(rows, encode_prompts(pipe, [concept]).float().expand(len(prompts), -1, -1))
        tokens.append(rows)
    return torch.cat(tokens)


def image_loss(
    unet: torch.nn.Module, params: dict[str, torch.Tensor], stage1: dict[str, torch.Tensor], x_t: torch.Tensor,
    t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, config: CoErasingConfig,
) -> torch.Tensor:  # fmt: skip
    """L₂ (module docstring) on one x_t ``[1, C, h, w]``: blurred, then ε_θ (``params``) regressed on the stage-1
    model's (``stage1``) negative guidance. ``cond`` ``[1, L + k, D]`` holds the image tokens; ``uncond`` is
    ``[1, L, D]`` (text only) or ``[1, L + k, D]``."""
    z = gaussian_blur(x_t, config.blur) if config.blur else x_t
    with torch.no_grad():
        e_c = predict_noise(unet, z, t, cond, stage1)
        e_u = predict_noise(unet, z, t, uncond, stage1)
        target = e_u - config.negative_guidance * (e_c - e_u)
    return F.mse_loss(predict_noise(unet, z, t, cond, params), target)


def image_stage(
    pipe: Any, concepts: Sequence[str], config: CoErasingConfig, stage1: dict[str, torch.Tensor],
    tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Stage 2: ESD-like negative guidance from the image tokens ``[N, k, D]``, targets from the stage-1 model."""
    names = set(parameter_names(pipe.unet, config.parameters))  # holds stage 1's (checked by the config)
    params = {n: (stage1[n] if n in stage1 else p.detach()).clone().requires_grad_(True)
              for n, p in pipe.unet.named_parameters() if n in names}  # fmt: skip
    dtype = pipe.unet.dtype
    with torch.no_grad():
        texts = encode_prompts(pipe, list(concepts)).to(dtype)  # [K, L, D]
        null = encode_prompts(pipe, [""]).to(dtype)
    conds = texts.repeat_interleave(config.images, dim=0)  # [N, L, D]: image j is of concept j // images
    tokens = tokens.to(pipe.unet.device, dtype)

    def loss(j: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = ia.with_image(conds[j : j + 1], tokens[j : j + 1])  # [1, L + k, D]
        uncond = null if config.text_uncond else ia.with_image(null, tokens[j : j + 1])
        return image_loss(pipe.unet, params, stage1, x_t, t, cond, uncond, config)

    # x_t is sampled with the model being trained (it starts as the stage-1 model), as the release does
    diffusion_loop(pipe, params, conds, loss, config, "co-erasing image", sample_trained=True,
                   generator_=generator(config.seed + 2))  # fmt: skip
    return detached(params)


def erase_co_erasing(model: Any, concepts: list[str], config: CoErasingConfig) -> Patch:
    """Co-Erasing: text ESD, then negative guidance from base-model images through an image adapter."""
    pipe = check_unet_family(model, "co-erasing")
    with frozen(pipe.unet, pipe.text_encoder):
        stage1 = text_stage(pipe, concepts, config)
        tokens = image_tokens(model, pipe, concepts, config)
        final = image_stage(pipe, concepts, config, stage1, tokens)
    return Patch.from_tensors(model, "unet", final)


register(
    "co-erasing",
    CoErasingConfig,
    presets={
        "paper": {},  # train.sh
        "readme": {"parameters": "full", "images": 200, "blur": 5, "iterations": 1500},
        "budget": {"text_iterations": 100, "iterations": 100, "images": 32},
    },
    strength=Strength("negative_guidance", (0.5, 1.0, 2.0, 4.0), preset="budget"),
    summary="Co-Erasing: text ESD, then ESD-like negative guidance from base-model images through an image "
    "adapter (MiniCanvas stand-in for IP-Adapter)",
)(erase_co_erasing)
