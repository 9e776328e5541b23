"""Co-Erasing's image prompts on MiniCanvas: a small image adapter in place of IP-Adapter, used only in training.

The release (Ferry-Li/Co-Erasing) turns each reference image into 4 extra conditioning tokens with IP-Adapter
(CLIP ViT-H image embedding → ``ImageProjModel``: Linear → 4 × D → LayerNorm) read through decoupled
cross-attention (``to_k_ip`` / ``to_v_ip``). MiniCanvas has no CLIP image encoder and no IP-Adapter checkpoint, so:

- **Image features** are the image's clean VAE latents ``[C, h, w]`` (the base model's own generation, before
  decoding), flattened; no image encoder.
- **The adapter** is IP-Adapter's projection on them: ``Linear(C·h·w → k·D)`` reshaped to ``[k, D]``, then
  ``LayerNorm(D)``; k = 4 tokens.
- **Reading it**: the k rows are *appended* to the text conditioning (``[L + k, D]``) and go through the UNet's
  own attn2 to_k / to_v, not through separate image projections.
- **Training** (IP-Adapter's objective, frozen base UNet, only the adapter trains): base-model images of
  captions (the MiniCanvas grid's cells for MiniCanvas concepts), ``‖ε(x_t, t, [caption; adapter(z0)]) − ε‖²`` at
  random DDPM timesteps, the caption replaced by the empty prompt 5% of the time (IP-Adapter's text drop).

The adapter lives only inside the erase call; the patch holds UNet tensors alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.denoising import encode_prompts, noised, predict_noise
from erasekit.progress import track

TEXT_DROP = 0.05  # IP-Adapter's probability of training with the empty caption


class ImageAdapter(nn.Module):
    """Clean latents ``[B, C, h, w]`` → ``k`` conditioning rows ``[B, k, D]`` (IP-Adapter's ``ImageProjModel``)."""

    def __init__(
        self, latent_shape: Sequence[int], tokens: int, dim: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.tokens, self.dim = tokens, dim
        fan_in = math.prod(latent_shape)
        with torch.device("meta"):  # nothing drawn from torch's global generator: every weight is set below
            self.proj = nn.Linear(fan_in, tokens * dim)
            self.norm = nn.LayerNorm(dim)
        self.to_empty(device="cpu")
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's own init, drawn from the method's generator
        with torch.no_grad():
            self.proj.weight.copy_(
                torch.empty(self.proj.weight.shape).uniform_(-bound, bound, generator=generator)
            )
            self.proj.bias.copy_(
                torch.empty(self.proj.bias.shape).uniform_(-bound, bound, generator=generator)
            )
            self.norm.weight.fill_(1.0)
            self.norm.bias.zero_()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        rows = self.proj(latents.flatten(1)).view(-1, self.tokens, self.dim)  # [B, k, D]
        return self.norm(rows)


def refine(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Co-Erasing's text-guided refinement: each image token becomes an attention average of the text rows.

    ``softmax(Q Kᵀ / √D) V`` with Q the image tokens ``[B, k, D]`` and K = V the prompt's conditioning
    ``[B, L, D]``; returns ``[B, k, D]``.
    """
    weights = torch.softmax(tokens @ text.transpose(1, 2) / math.sqrt(text.shape[-1]), dim=-1)  # [B, k, L]
    return weights @ text


def with_image(text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The text conditioning ``[B, L, D]`` with the image tokens ``[B, k, D]`` appended: ``[B, L + k, D]``."""
    return torch.cat([text, tokens.to(text.dtype)], dim=1)


@torch.no_grad()
def base_latents(model: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int = 0) -> torch.Tensor:
    """Clean latents ``[N, C, h, w]`` the model generates (nothing applied) through the one generation path.

    Args:
        steps: denoising steps (``0``: the model's default sampling).
    """
    from erasekit.generation import Request, Sampling, render

    sampling = Sampling.for_model(model, steps=steps or None)
    requests = [Request(seed=int(s), prompt=p) for p, s in zip(prompts, seeds)]
    return torch.stack(render(model.pipeline, requests, sampling, output="latent", desc=None))


def train_adapter(
    pipe: Any,
    latents: torch.Tensor,
    captions: Sequence[str],
    adapter: ImageAdapter,
    *,
    steps: int,
    lr: float,
    batch: int,
    generator: torch.Generator,
) -> list[float]:
    """Train ``adapter`` in place on ``(latents [N, C, h, w], captions)`` with the frozen UNet; returns the losses."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    with torch.no_grad():
        conds = encode_prompts(pipe, list(captions)).to(dtype)  # [N, L, D]
        null = encode_prompts(pipe, [""]).to(dtype)  # [1, L, D]
    adapter.to(device)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr)
    losses = []
    for _ in track(range(steps), desc="co-erasing adapter", total=steps):
        idx = torch.randint(0, latents.shape[0], (min(batch, latents.shape[0]),), generator=generator)
        x0 = latents[idx].to(device, dtype)  # [B, C, h, w]
        x_t, target, t = noised(pipe, x0, generator)
        drop = (torch.rand(idx.shape[0], generator=generator) < TEXT_DROP).to(device)
        text = torch.where(drop[:, None, None], null.expand(idx.shape[0], -1, -1), conds[idx])
        pred = predict_noise(pipe.unet, x_t, t, with_image(text, adapter(x0.float())))
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def adapter_captions(concepts: Sequence[str], count: int, generator: torch.Generator) -> list[str]:
    """Captions the adapter trains on: ``count`` MiniCanvas grid cells at random (every concept of the world, the
    erased ones too, as IP-Adapter's web data would hold them), or the concepts' release prompts elsewhere."""
    from erasekit.concepts import is_minicanvas
    from erasekit.minicanvas import world

    if all(is_minicanvas(c) for c in concepts):
        cells = [world.prompt(o, s) for o in world.OBJECT_NAMES for s in world.STYLE_NAMES]
    else:
        cells = [f"a photo of {c}" for c in concepts] + ["a photo", "a painting", "a drawing of a house"]
    picks = torch.randint(0, len(cells), (count,), generator=generator)
    return [cells[int(i)] for i in picks]


def concept_prompts(concept: str, count: int) -> list[str]:
    """The prompts of a concept's reference images (``generate_data.py``: "a photo of {label}"); a MiniCanvas
    concept cycles through the world's caption of it with every concept of the other kind."""
    from erasekit.concepts import is_minicanvas
    from erasekit.minicanvas import world

    if not is_minicanvas(concept):
        return [f"a photo of {concept}"] * count
    info = world.concept_info(concept)
    others = world.OBJECT_NAMES if info.kind == "style" else world.STYLE_NAMES
    cells = [
        world.prompt(o, info.name) if info.kind == "style" else world.prompt(info.name, o) for o in others
    ]
    return [cells[i % len(cells)] for i in range(count)]
