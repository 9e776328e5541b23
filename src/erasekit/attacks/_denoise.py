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
