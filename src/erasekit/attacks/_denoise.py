"""The denoising loss white-box attacks optimise, and the base model's latents they learn from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.denoising import noised, predict_noise
from erasekit.generation import Request, Sampling, render


def model_latents(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling, batch_size: int = 1
) -> torch.Tensor:
    """Clean latents ``[N, C, h, w]`` the pipeline (as it currently is) generates for each (prompt, seed).

    The same images ``erasekit generate`` makes for those prompts and seeds, before the VAE decodes them. One image
    per call by default, as the attacks' recorded numbers were made (a batch moves values by float rounding).
    """
    requests = [Request(seed=int(s), prompt=p) for p, s in zip(prompts, seeds)]
    return torch.stack(render(pipe, requests, sampling, batch_size=batch_size, output="latent", desc=None))


def draws(
    pipe: Any, x0: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noised latents of ``x0`` ``[B, C, h, w]`` at random timesteps: ``(x_t, target, t [B])``."""
    return noised(pipe, x0, generator)


def denoise_loss(
    pipe: Any, x_t: torch.Tensor, want: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """‖target − ε_θ(x_t, t, c)‖² (mean), with ``cond`` ``[B, 77, D]`` (batch 1 is broadcast)."""
    if cond.shape[0] != x_t.shape[0]:
        cond = cond.expand(x_t.shape[0], -1, -1)
    return F.mse_loss(predict_noise(pipe.unet, x_t, t, cond).float(), want.float())


def fixed_draws(pipe: Any, x0: torch.Tensor, count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` deterministic draws of :func:`draws`, to compare a loss before and after optimising."""
    g = torch.Generator().manual_seed(seed)
    return [draws(pipe, x0, g) for _ in range(count)]


class FixedTimestepNoise:
    """Forward diffusion at a timestep the caller chooses (UnlearnDiffAtk's sequential schedule).

    ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` with the pipeline's training betas, and the UNet's regression target (ε, or
    the velocity for v-prediction models).
    """

    def __init__(self, pipe: Any) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def __call__(
        self, x0: torch.Tensor, t: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, t [B])`` for clean latents ``x0`` ``[B, C, h, w]`` at timestep ``t``, fresh noise."""
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        steps = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        x_t = self.scheduler.add_noise(x0, noise, steps)
        if self.scheduler.config.prediction_type == "v_prediction":
            return x_t, self.scheduler.get_velocity(x0, noise, steps), steps
        return x_t, noise, steps


@torch.no_grad()
def vae_posteriors(pipe: Any, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's posterior for the images the latents decode to, unflipped and mirrored left to right.

    Textual inversion trains on images: the released script flips each image at random and encodes it with
    ``latent_dist.sample()``. Decoding once here and re-encoding both orientations lets a training step draw
    ``mean + std · ε`` for either orientation without touching the VAE again.

    Args:
        latents: ``[N, C, h, w]`` clean latents in the UNet's (scaled) latent space.

    Returns:
        ``(mean, std)``, each ``[N, 2, C, h, w]`` in the UNet's latent space; index 1 on dim 1 is the mirror.
    """
    vae = pipe.vae
    scale = float(vae.config.scaling_factor)
    images = vae.decode(latents.to(vae.dtype) / scale).sample.clamp(-1, 1)  # [N, 3, H, W], as a PNG holds it
    both = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)  # [2N, 3, H, W]
    dist = vae.encode(both).latent_dist
    shape = (latents.shape[0], 2, *dist.mean.shape[1:])
    return (dist.mean.float() * scale).reshape(shape), (dist.std.float() * scale).reshape(shape)


@torch.no_grad()
def ddim_invert(pipe: Any, x0: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM inversion: the start latents from which ``steps`` DDIM steps at guidance 1 with ``cond`` come back to
    ``x0`` (up to the inversion's approximation: each step reads ε at the current latents and the next timestep).

    diffusers' ``DDIMInverseScheduler``, built from the pipeline's scheduler config, so its timesteps mirror the
    ``DDIMScheduler`` the model samples with (same spacing, offset and final alpha).

    Args:
        x0: ``[N, C, h, w]`` clean latents in the UNet's (scaled) latent space.
        cond: ``[N, 77, D]`` text conditioning (batch 1 is broadcast).
        steps: the sampling schedule's length.

    Returns:
        ``[N, C, h, w]`` latents at the schedule's first (noisiest) timestep.
    """
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    unet = pipe.unet
    x = x0.to(unet.device, unet.dtype)
    cond = cond.to(unet.device, unet.dtype).expand(x.shape[0], -1, -1)
    for t in scheduler.timesteps:  # ascending: from the cleanest timestep to the noisiest
        x = scheduler.step(predict_noise(unet, x, t, cond), t, x).prev_sample
    return x
