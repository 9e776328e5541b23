"""Denoising for training: the one small DDIM sampler over a pipeline's components, and noise predictions.

Images are made by :mod:`erasekit.generation`; this module is for methods and attacks that train through the
UNet on the model's own partial trajectories.

ESD, AdvUnlearn and the attacks need latents x_t drawn part of the way along a DDIM trajectory, and noise
predictions from a UNet whose weights are either the pipeline's own or a set of trainable overrides. This
module does that with the pipeline's ``encode_prompt``, its UNet and a DDIM scheduler built from its scheduler's
config. It never forks the pipeline's ``__call__``.

Only families with ``unet_training`` in the family table are supported (their UNet takes
``(sample, timestep, encoder_hidden_states)`` alone); SDXL's UNet also needs pooled text embeddings and time ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


def check_unet_family(model: LoadedModel, method: str) -> Any:
    """The pipeline of ``model``, or an error when ``method`` cannot run this sampler on it."""
    return model.require_capability("unet_training", method)


def encode_prompts(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Text conditioning exactly as the pipeline computes it (differentiable when the encoder has grads).

    Returns:
        ``[len(prompts), 77, D]`` embeddings (SD1.x: the text encoder's ``last_hidden_state``).
    """
    # Keywords, because SDXL's encode_prompt takes ``prompt_2`` second; element 0 is the prompt embeddings.
    out = pipe.encode_prompt(
        prompt=list(prompts),
        device=pipe.unet.device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
    )
    return out[0]


def ddim(pipe: Any, steps: int) -> Any:
    """A fresh DDIM scheduler from the pipeline scheduler's config, with ``steps`` timesteps set."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def latent_shape(pipe: Any, batch: int) -> tuple[int, int, int, int]:
    """``(batch, C, h, w)`` of the UNet's native latent size."""
    cfg = pipe.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return (batch, cfg.in_channels, size, size)


def predict_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """ε(x_t, c, t) from the UNet, optionally with some parameters replaced (``torch.func.functional_call``).

    Args:
        latents: ``[B, C, h, w]``.
        t: a scalar timestep.
        cond: ``[B, 77, D]`` text conditioning.
        params: ``{qualified param name: tensor}`` used instead of the UNet's own (trainable copies).

    Returns:
        ``[B, C, h, w]`` noise prediction.
    """
    if not params:
        return unet(latents, t, encoder_hidden_states=cond).sample
    out = torch.func.functional_call(unet, dict(params), (latents, t), {"encoder_hidden_states": cond})
    return out.sample


def guided_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Classifier-free guidance ε_u + s (ε_c − ε_u), with one batched UNet call. Shapes as :func:`predict_noise`.

    ``scale == 1`` is ε_c alone (one UNet call); ``params`` as in :func:`predict_noise`.
    """
    if scale == 1.0:
        return predict_noise(unet, latents, t, cond, params)
    both = predict_noise(unet, torch.cat([latents, latents]), t, torch.cat([uncond, cond]), params)
    eps_u, eps_c = both.chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def start_noise(pipe: Any, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, C, h, w]`` standard normal DDIM start latents drawn on the CPU with ``generator``."""
    return torch.randn(latent_shape(pipe, batch), generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample_path(
    pipe: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    steps: int,
    stops: Sequence[int],
    guidance: float,
    noise: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One DDIM trajectory from ``noise``, returning the latents after each of ``stops`` steps.

    Args:
        cond: ``[B, 77, D]`` prompt embeddings.
        uncond: ``[B, 77, D]`` empty-prompt embeddings.
        steps: the DDIM schedule length.
        stops: step counts, each in ``[0, steps]`` (``steps``: the finished sample), any order.
        guidance: classifier-free guidance scale.
        noise: ``[B, C, h, w]`` start latents (see :func:`start_noise`).
        params: trainable copies to sample with instead of the UNet's own tensors (RACE, ANT sample with the
            model being trained).

    Returns:
        ``[B, C, h, w]`` latents per stop, in the order of ``stops``; the latents after ``s`` steps sit at
        ``ddim(pipe, steps).timesteps[s]`` (when ``s < steps``).
    """
    if not stops or not all(0 <= s <= steps for s in stops):
        raise ValueError(f"stops must be in [0, {steps}], got {list(stops)}")
    scheduler = ddim(pipe, steps)
    unet = pipe.unet
    latents = noise.to(unet.device, unet.dtype) * scheduler.init_noise_sigma
    seen = {0: latents}
    for i, t in enumerate(scheduler.timesteps[: max(stops)]):
        eps = guided_noise(unet, latents, t, cond, uncond, guidance, params)
        latents = scheduler.step(eps, t, latents).prev_sample
        if i + 1 in stops:
            seen[i + 1] = latents
    return [seen[s] for s in stops]


@torch.no_grad()
def sample_until(
    pipe: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    steps: int,
    stop: int,
    guidance: float,
    generator: torch.Generator,
    noise: torch.Tensor | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run DDIM from pure noise for ``stop`` of ``steps`` steps (the pipeline's own UNet unless ``params``).

    Args:
        cond: ``[B, 77, D]`` prompt embeddings.
        uncond: ``[B, 77, D]`` empty-prompt embeddings.
        steps: the DDIM schedule length (ESD: 50).
        stop: how many steps to take, ``0 <= stop < steps``; 0 returns the initial noise.
        guidance: classifier-free guidance scale.
        generator: the only source of randomness (a CPU generator); draws the start noise unless ``noise``.
        noise: ``[B, C, h, w]`` start latents to use instead of a draw.
        params: as in :func:`sample_path`.

    Returns:
        ``(x_t [B, C, h, w], t)``: the latents after ``stop`` steps and the timestep they are at.
    """
    if not 0 <= stop < steps:
        raise ValueError(f"stop must be in [0, {steps}), got {stop}")
    if noise is None:
        noise = start_noise(pipe, cond.shape[0], generator)
    (x_t,) = sample_path(
        pipe, cond, uncond, steps=steps, stops=[stop], guidance=guidance, noise=noise, params=params
    )
    return x_t, ddim(pipe, steps).timesteps[stop]


def noised(
    pipe: Any, x0: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward-diffuse clean latents at one random training timestep (the textual-inversion setting).

    Args:
        x0: ``[B, C, h, w]`` clean latents.

    Returns:
        ``(x_t, target, t)``: noised latents and the UNet's regression target (the noise, or the velocity for
        v-prediction models such as SD2-768), both ``[B, C, h, w]``, and the timesteps ``[B]``.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, t), t
    return x_t, noise, t


PLACEHOLDER = "*"  # one CLIP token; its embedding rows are overwritten by :func:`prefix_embeddings`


def with_prefix(prompt: str, k: int) -> str:
    """``prompt`` with ``k`` placeholder tokens in front, whose embeddings :func:`prefix_embeddings` replaces."""
    return " ".join([PLACEHOLDER] * k + [prompt]).strip()


@contextlib.contextmanager
def prefix_embeddings(encoder: torch.nn.Module, delta: torch.Tensor) -> Iterator[None]:
    """Replace the token embeddings at positions 1..k (just after BOS) by ``delta`` inside the block.

    Use with prompts made by :func:`with_prefix`. A removable forward hook on the token embedding, removed in
    ``finally``; gradients flow to ``delta``.

    Args:
        delta: ``[k, D]`` input embeddings (before position embeddings are added).
    """
    from erasekit.models.families import token_embedding_path

    k = delta.shape[0]

    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        rows = delta.to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)  # [B, k, D]
        return torch.cat([out[:, :1], rows, out[:, 1 + k :]], dim=1)

    handle = encoder.get_submodule(token_embedding_path(encoder)).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
