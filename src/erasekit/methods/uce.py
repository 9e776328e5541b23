"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), a closed-form edit of cross-attention K/V.

For every cross-attention projection W (each ``attn2.to_k`` and ``attn2.to_v`` of the UNet)::

    W* = (λ W + s_e Σ_e v*_e c_eᵀ + s_p Σ_p W c_p c_pᵀ)(λ I + s_e Σ_e c_e c_eᵀ + s_p Σ_p c_p c_pᵀ)⁻¹,   v*_e = W c_guide

The rows c come from two releases of the authors' code (rohitgandikota/unified-concept-editing):

- ``rows="last"`` (preset ``paper``): ``trainscripts/uce_sd_erase.py`` at commit
  28c81ed5a3e41277c1a0dc55f738e7ab188e9718, the current script. c_e, c_guide and c_p are each prompt's
  last-token row (see :mod:`erasekit.methods._closed_form`); nothing is preserved unless given.
- ``rows="sequence"`` (preset ``legacy``): ``train-scripts/train_erase.py`` at commit
  bd5fb515392e986758fa3197e382148227db8f25, the older script behind the paper's tables and RECE's starting
  checkpoints. c_e runs from the concept's last token to the end of the padded prompt, each row paired with
  the guide's row at the same offset from the guide's last token (both are cut to the shorter run); every
  row of each preserved prompt is kept, and ``""`` is always preserved (``preserve_null``).

The guide is ``"art"`` for styles and ``""`` for objects and nudity, as both scripts do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from erasekit.methods._closed_form import (
    check_family,
    check_projections,
    gram,
    kv_layers,
    last_token_embeddings,
    n_tokens,
    ridge_edit,
    sequence_embeddings,
    weight_patch,
    weights64,
    world_kind_mates,
)
from erasekit.methods.common import check_choice, check_positive
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

ROWS = ("last", "sequence")


@dataclass(frozen=True, kw_only=True)
class UCEConfig:
    """UCE's settings; defaults are the current script's (λ = 0.5, both scales 1, last-token rows)."""

    guide: str = field(
        default="",
        metadata={"help": "the concept erased ones are mapped to ('art' for styles, '' for objects)"},
    )
    preserve: tuple[str, ...] = field(default=(), metadata={"help": "concepts whose K/V outputs are kept"})
    lamb: float = field(default=0.5, metadata={"help": "λ: pull toward the original weights"})
    erase_scale: float = field(
        default=1.0,
        metadata={"help": "s_e: weight of the erase terms (the strength knob; 1 in both scripts)"},
    )
    preserve_scale: float = field(default=1.0, metadata={"help": "s_p: weight of the preserve terms"})
    rows: str = field(
        default="last",
        metadata={"help": "'last': last-token rows (current script); 'sequence': last token onward (older)"},
    )
    preserve_null: bool = field(
        default=False, metadata={"help": "also preserve every row of '' (the older script always does)"}
    )
    world_preserve: bool = field(
        default=False,
        metadata={
            "help": "also preserve the other MiniCanvas concepts of the kind (the older script's artists)"
        },
    )
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "which attn2 projections to edit"}
    )

    def __post_init__(self) -> None:
        check_projections(self.projections)
        check_choice("rows", self.rows, ROWS)
        check_positive(lamb=self.lamb, erase_scale=self.erase_scale)
        if self.preserve_scale < 0:
            raise ValueError(f"preserve_scale must be >= 0, got {self.preserve_scale}")


def aligned_rows(pipe: Any, concept: str, guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The older script's rows: the concept's last token onward, paired by offset with the guide's.

    Returns:
        ``(C [m, D], G [m, D])`` with ``m = L − max(n_c, n_g)`` (n the last-token rows).
    """
    seq = sequence_embeddings(pipe, [concept, guide])  # [2, L, D]
    n_c, n_g = n_tokens(pipe, concept), n_tokens(pipe, guide)
    m = seq.shape[1] - max(n_c, n_g)
    return seq[0, n_c : n_c + m], seq[1, n_g : n_g + m]


def erase_rows(pipe: Any, concepts: list[str], guide: str, rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C [n, D], G [n, D])``: the rows to remap and, aligned, the guide rows whose values they take."""
    if rows == "last":
        return last_token_embeddings(pipe, concepts), last_token_embeddings(pipe, [guide] * len(concepts))
    pairs = [aligned_rows(pipe, c, guide) for c in concepts]
    return torch.cat([c for c, _ in pairs]), torch.cat([g for _, g in pairs])


def preserve_prompts(concepts: list[str], preserve: tuple[str, ...], null: bool, world: bool) -> list[str]:
    """``""`` first when ``null``, then ``preserve``, then (``world``) the other MiniCanvas concepts of the kind."""
    erased = {c.lower() for c in concepts}
    extra = [p for p in world_kind_mates(concepts) if p not in preserve] if world else []
    return [""] * null + [p for p in (*preserve, *extra) if p.lower() not in erased]


def preserve_gram(pipe: Any, prompts: list[str], rows: str, scale: float) -> torch.Tensor | None:
    """``scale · Σ c cᵀ`` ``[D, D]`` over each prompt's last-token row (``"last"``) or all its L rows, or ``None``."""
    if not prompts or scale == 0:
        return None
    if rows == "last":
        c = last_token_embeddings(pipe, prompts)
        return scale * c.T @ c
    return scale * gram(pipe, prompts)


def uce_weights(
    weights: dict[str, torch.Tensor],
    erase: torch.Tensor,
    guide: torch.Tensor,
    keep: torch.Tensor | None,
    lamb: float,
    erase_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The UCE edit of every W: ``erase`` rows take the values of the aligned ``guide`` rows, kept rows keep theirs.

    Args:
        weights: ``{name: W [out, D]}`` (float64); they give the values and the weights λ pulls toward (RECE
            passes its current, already edited, weights).
        erase: ``[n, D]`` rows to remap.
        guide: ``[n, D]`` rows whose values (under ``weights``) the erase rows take.
        keep: the preserve scale times Σ c cᵀ ``[D, D]`` of the preserved rows (:func:`preserve_gram`), or
            ``None``: the Gram form of ``s_p Σ_p ‖W* c_p − W c_p‖²``.

    Returns:
        ``{name: W* [out, D]}`` float64.
    """
    return {
        name: ridge_edit(w, lamb, [(erase, guide @ w.T, erase_scale)], keep) for name, w in weights.items()
    }


def erase_uce(model: LoadedModel, concepts: list[str], config: UCEConfig) -> Patch:
    """UCE: closed-form remapping of the concepts' cross-attention keys/values onto the guide's."""
    pipe = check_family(model, "uce")
    layers = kv_layers(pipe.unet, config.projections)
    erase, guide = erase_rows(pipe, concepts, config.guide, config.rows)
    prompts = preserve_prompts(concepts, config.preserve, config.preserve_null, config.world_preserve)
    keep = preserve_gram(pipe, prompts, config.rows, config.preserve_scale)
    new = uce_weights(weights64(layers), erase, guide, keep, config.lamb, config.erase_scale)
    return weight_patch(model, layers, new)


# The older script's preserve scale is max(0.1, 1 / number of preserved prompts): 1.0 when only "" is
# preserved (objects, nudity), 0.1 with the 1733 other artists; on MiniCanvas, "" + 11 styles, also 0.1.
LEGACY = {"rows": "sequence", "preserve_null": True}
register(
    "uce",
    UCEConfig,
    presets={
        "paper": {"style": {"guide": "art"}, "object": {"guide": ""}, "nsfw": {"guide": ""}},
        "legacy": {
            **LEGACY,
            "style": {"guide": "art", "world_preserve": True, "preserve_scale": 0.1},
            "object": {"guide": "", "preserve_scale": 1.0},
            "nsfw": {"guide": "", "preserve_scale": 1.0},
        },
    },
    strength=Strength("erase_scale", (0.001, 0.003, 0.01, 0.03, 0.1, 1.0)),
    summary="UCE: closed-form edit of attn2 to_k/to_v mapping the concept onto a guide, preserving others",
)(erase_uce)
