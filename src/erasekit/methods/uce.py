"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), a closed-form edit of cross-attention K/V.

For every cross-attention projection W (each ``attn2.to_k`` and ``attn2.to_v`` of the UNet)::

    W* = (λ W + s_e Σ_e v*_e c_eᵀ + s_p Σ_p W c_p c_pᵀ)(λ I + s_e Σ_e c_e c_eᵀ + s_p Σ_p c_p c_pᵀ)⁻¹,   v*_e = W c_guide

c_e, c_p and c_guide are the last-token embeddings (see :mod:`erasekit.methods._closed_form`) of the erased
concepts, the preserved concepts and the guide concept. The guide is ``"art"`` for styles and ``""`` for
objects and nudity, as the authors do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.methods._closed_form import (
    check_family,
    check_projections,
    kv_layers,
    last_token_embeddings,
    ridge_edit,
    weight_patch,
    weights64,
)
from erasekit.methods.common import check_positive
from erasekit.patch import Patch
from erasekit.registry import register


@dataclass(frozen=True, kw_only=True)
class UCEConfig:
    """UCE's settings; defaults are the authors' (λ = 0.5, both scales 1)."""

    guide: str = field(
        default="",
        metadata={"help": "the concept erased ones are mapped to ('art' for styles, '' for objects)"},
    )
    preserve: tuple[str, ...] = field(default=(), metadata={"help": "concepts whose K/V outputs are kept"})
    lamb: float = field(default=0.5, metadata={"help": "λ: pull toward the original weights"})
    erase_scale: float = field(default=1.0, metadata={"help": "s_e: weight of the erase terms"})
    preserve_scale: float = field(default=1.0, metadata={"help": "s_p: weight of the preserve terms"})
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "which attn2 projections to edit"}
    )

    def __post_init__(self) -> None:
        check_projections(self.projections)
        check_positive(lamb=self.lamb, erase_scale=self.erase_scale)
        if self.preserve_scale < 0:
            raise ValueError(f"preserve_scale must be >= 0, got {self.preserve_scale}")


def uce_weights(
    weights: dict[str, torch.Tensor],
    erase: torch.Tensor,
    guide: torch.Tensor,
    preserve: torch.Tensor,
    config: UCEConfig,
    base: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The UCE edit of every W.

    Args:
        weights: ``{name: W [out, D]}`` that define the wanted values (float64).
        erase: ``[n, D]`` embeddings to remap.
        guide: ``[n, D]`` or ``[1, D]`` embeddings whose values (under ``weights``) they are mapped to.
        preserve: ``[m, D]`` embeddings whose values (under ``weights``) are kept.
        base: the weights λ pulls toward (default ``weights``); RECE passes the already-edited ones.

    Returns:
        ``{name: W* [out, D]}`` float64.
    """
    base = weights if base is None else base
    out = {}
    for name, w in weights.items():
        targets = (guide @ w.T).expand(erase.shape[0], -1)  # [n, out]
        pairs = [(erase, targets, config.erase_scale), (preserve, preserve @ w.T, config.preserve_scale)]
        out[name] = ridge_edit(base[name], config.lamb, pairs)
    return out


def erase_uce(model: Any, concepts: list[str], config: UCEConfig) -> Patch:
    """UCE: closed-form remapping of the concepts' cross-attention keys/values onto the guide's."""
    pipe = check_family(model, "uce")
    layers = kv_layers(pipe.unet, config.projections)
    erase = last_token_embeddings(pipe, concepts)
    guide = last_token_embeddings(pipe, [config.guide])
    preserve = last_token_embeddings(pipe, list(config.preserve)) if config.preserve else erase[:0]
    new = uce_weights(weights64(layers), erase, guide, preserve, config)
    return weight_patch(model, layers, new)


register(
    "uce",
    UCEConfig,
    presets={"paper": {"style": {"guide": "art"}, "object": {"guide": ""}, "nsfw": {"guide": ""}}},
    summary="UCE: closed-form edit of attn2 to_k/to_v mapping the concept onto a guide, preserving others",
)(erase_uce)
