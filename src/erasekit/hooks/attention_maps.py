"""Cross-attention maps of a concept's tokens and the binary concept mask built from them (Receler, IRECE)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from erasekit.errors import ErasekitError


def attention_probs(attn: nn.Module, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ · scale) of a diffusers Attention: ``x`` ``[B, HW, C]``, ``ctx`` ``[B, L, D]`` ->
    ``[B, heads, HW, L]`` (the default processor's probabilities: no mask, no cross norm)."""
    b, n, _ = x.shape
    q = attn.to_q(x).view(b, n, attn.heads, -1).transpose(1, 2)  # [B, h, HW, d]
    k = attn.to_k(ctx).view(b, ctx.shape[1], attn.heads, -1).transpose(1, 2)  # [B, h, L, d]
    return (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(-1)  # fp32, as upcast attention


def concept_mask(
    maps: Sequence[torch.Tensor],
    tokens: Sequence[int],
    latent_hw: tuple[int, int],
    threshold: float,
    side: int,
) -> torch.Tensor:
    """The binary concept mask ``[B, 1, h, w]`` at the mask resolution (concept_reg.py's ``get_mask``).

    Args:
        maps: per cross-attention ``[B, heads, HW, L]``.
        tokens: the concept's token positions in the prompt (1..n).
        latent_hw: the latent's ``(H, W)``, to find each map's shape.
        side: the maps' side to keep (0: the coarsest above the smallest).
    """
    grids = [_grid(m[..., list(tokens)].mean(-1).mean(1), latent_hw) for m in maps]  # [B, h, w] each
    sides = sorted({g.shape[-2] for g in grids})
    keep = side or (sides[1] if len(sides) > 1 else sides[0])
    chosen = [g for g in grids if g.shape[-2] == keep]
    if not chosen:
        raise ErasekitError(f"no cross-attention map is {keep} wide (the UNet's are {sides})")
    avg = torch.stack(chosen).mean(0)  # [B, h, w]
    lo = avg.flatten(1).min(1).values.view(-1, 1, 1)
    hi = avg.flatten(1).max(1).values.view(-1, 1, 1)
    norm = (avg - lo) / (hi - lo).clamp_min(1e-12)
    return (norm >= threshold).to(avg.dtype).unsqueeze(1)


def grid_shape(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` of a layer over ``n`` positions of a latent ``(H, W)`` (each side divided alike)."""
    h0, w0 = latent_hw
    f = math.isqrt(h0 * w0 // n) if n else 0
    if not f or f * f * n != h0 * w0:
        raise ErasekitError(f"a cross-attention over {n} positions does not tile a {h0}x{w0} latent")
    return h0 // f, w0 // f


def _grid(flat: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``[B, HW]`` -> ``[B, h, w]``."""
    return flat.view(flat.shape[0], *grid_shape(flat.shape[1], latent_hw))
