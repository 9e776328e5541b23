"""Shared by LEACE and R-LACE: the labelled text-encoder rows they are fitted on, and the fold of a linear
eraser into the UNet's cross-attention.

**Rows.** Both methods learn a map of the conditioning rows (the pipeline's ``encode_prompt`` output, SD1.x:
the text encoder's ``last_hidden_state``) that makes the concept linearly unreadable. The concept class is
every row from the concept's first token to the end of the padded prompt (its token rows, the rest of the
caption, EOS and padding) of prompts naming the concept; the other class is the same rows of the same prompts
with the concept replaced by a contrast concept. CLIP's attention is causal, so the rows before the concept
are the same in both prompts of a pair (they carry no label) and every row after it carries the concept: those
are the rows the UNet reads it from. Pairing the prompts leaves the concept as the only difference between
the classes.

On MiniCanvas the prompts are the world's captions (every caption template of the concept's kind, filled with
each concept of the other kind) and the contrast concepts are the other concepts of the kind.

**Fold.** An affine eraser r(c) = c − Q (c − μ) (``Q [D, D]``; μ = 0 for a plain projection) applied to
every row the UNet cross-attends to is the same as replacing each attn2 ``to_k``/``to_v`` weight W by
W (I − Q) and adding the constant W Q μ to its outputs. SD1.x projections have no bias, so the constant goes
where it has the same effect: a shift shared by every key adds the same number to all of a query's logits,
which softmax ignores (so it is dropped, exactly); a value shift passes unchanged through attention weights
that sum to one and is folded into ``attn2.to_out.0.bias`` as W_out W_v Q μ. A projection that has a bias
takes W Q μ into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.methods._closed_form import CHUNK, check_projections, n_tokens, sequence_embeddings
from erasekit.methods.common import attn2_linears
from erasekit.patch import Patch

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

SLOT = "{}"


@dataclass(frozen=True, kw_only=True)
class RowsConfig:
    """Which rows the eraser is fitted on and which projections it is folded into (LEACE and R-LACE)."""

    contrast: tuple[str, ...] = field(
        default=(),
        metadata={"help": "concepts of the other class; () = the other MiniCanvas concepts of the kind"},
    )
    templates: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "prompt templates with {} for the concept; () = MiniCanvas's captions, else just {}"
        },
    )
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "which attn2 projections the eraser is folded into"}
    )

    def __post_init__(self) -> None:
        check_projections(self.projections)
        for t in self.templates:
            if t.count(SLOT) != 1:
                raise ValueError(f"a template needs exactly one {SLOT}, got {t!r}")


@dataclass(frozen=True)
class Rows:
    """Labelled conditioning rows.

    Attributes:
        x: ``[n, D]`` float64 rows on the CPU.
        z: ``[n, K]`` one-hot of the erased concept a row belongs to (all zeros for contrast rows).
    """

    x: torch.Tensor
    z: torch.Tensor


def world_frames(concept: str) -> list[tuple[str, str]]:
    """``(prefix, suffix)`` around a MiniCanvas concept in every caption the world has for its kind."""
    from erasekit.minicanvas.world import (
        FULL_TEMPLATES,
        OBJECT_NAMES,
        OBJECT_TEMPLATES,
        STYLE_NAMES,
        STYLE_TEMPLATES,
        concept_kind,
    )

    if concept_kind(concept) == "object":
        full = [t.format(object=SLOT, style=s) for t in FULL_TEMPLATES for s in STYLE_NAMES]
        own = [t.format(object=SLOT) for t in OBJECT_TEMPLATES]
    else:
        full = [t.format(object=o, style=SLOT) for t in FULL_TEMPLATES for o in OBJECT_NAMES]
        own = [t.format(style=SLOT) for t in STYLE_TEMPLATES]
    return [split_template(t) for t in full + own]


def split_template(template: str) -> tuple[str, str]:
    prefix, _, suffix = template.partition(SLOT)
    return prefix, suffix


def contrast_and_frames(
    concepts: Sequence[str], config: RowsConfig, method: str
) -> tuple[list[str], list[tuple[str, str]]]:
    """The contrast concepts and the prompt frames: the config's, else MiniCanvas's, else an error."""
    from erasekit.methods._closed_form import world_kind_mates

    mates = world_kind_mates(concepts)
    contrast = [c for c in config.contrast if c.lower() not in {e.lower() for e in concepts}] or list(mates)
    if not contrast:
        raise ErasekitError(
            f"{method} needs contrast concepts: give contrast=... (or erase MiniCanvas concepts)"
        )
    if config.templates:
        frames = [split_template(t) for t in config.templates]
    elif mates:
        frames = world_frames(concepts[0])
    else:
        frames = [("", "")]
    return contrast, frames


def concept_rows(pipe: Any, concept: str, frames: Sequence[tuple[str, str]]) -> torch.Tensor:
    """``[m, D]``: in each framed prompt, the rows from the concept's first token to the end (L rows in all).

    Args:
        frames: ``(prefix, suffix)`` pairs; the prompt is ``prefix + concept + suffix``.
    """
    prompts = [p + concept + s for p, s in frames]
    starts = [1 + n_tokens(pipe, p) for p, _ in frames]  # row 0 is BOS
    out = []
    for i in range(0, len(prompts), CHUNK):
        seq = sequence_embeddings(pipe, prompts[i : i + CHUNK])  # [B, L, D]
        out += [seq[j, a:] for j, a in enumerate(starts[i : i + CHUNK])]
    return torch.cat(out)


def labelled_rows(pipe: Any, concepts: Sequence[str], config: RowsConfig, method: str) -> Rows:
    """The concept rows of each erased concept (label k) and the contrast rows (no label): see module doc."""
    contrast, frames = contrast_and_frames(concepts, config, method)
    xs, zs = [], []
    for k, concept in enumerate(concepts):
        rows = concept_rows(pipe, concept, frames)
        xs.append(rows)
        zs.append(nn.functional.one_hot(torch.full((len(rows),), k), len(concepts)))
    for concept in contrast:
        rows = concept_rows(pipe, concept, frames)
        xs.append(rows)
        zs.append(torch.zeros(len(rows), len(concepts), dtype=torch.int64))
    return Rows(torch.cat(xs), torch.cat(zs).to(torch.float64))


def check_foldable(unet: nn.Module, names: Sequence[str]) -> None:
    """Refuse attention whose keys and values are not linear in the conditioning (a norm before them)."""
    for name in names:
        attn = unet.get_submodule(name.rsplit(".", 1)[0])
        if getattr(attn, "norm_cross", None) is not None:
            raise ErasekitError(
                f"{name}: the conditioning is normalised before to_k/to_v; the fold is not exact"
            )


def fold(model: LoadedModel, q: torch.Tensor, mean: torch.Tensor | None, projections: Sequence[str]) -> Patch:
    """The UNet patch replacing every attn2 projection W by W (I − Q), with the constant W Q μ folded as the
    module doc says.

    Args:
        q: ``[D, D]`` what the eraser takes away, r(c) = c − Q (c − μ) (float64).
        mean: μ ``[D]``, or ``None`` for a linear eraser r(c) = (I − Q) c.
    """
    unet = model.components["unet"]
    names = attn2_linears(unet, tuple(projections))
    check_foldable(unet, names)
    q = q.to(torch.float64)
    values: dict[str, torch.Tensor] = {}
    for name in names:
        lin = unet.get_submodule(name)
        w = lin.weight.detach().to("cpu", torch.float64)  # [out, D]
        values[f"{name}.weight"] = (w - w @ q).to(lin.weight.dtype)
        if mean is not None:
            fold_shift_(unet, name, w @ (q @ mean.to(torch.float64)), values)
    return Patch.from_tensors(model, "unet", values)


def fold_shift_(unet: nn.Module, name: str, shift: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    """Add the constant ``shift`` [out] of projection ``name``'s outputs to a bias with the same effect."""
    lin = unet.get_submodule(name)
    if lin.bias is not None:
        values[f"{name}.bias"] = (lin.bias.detach().to("cpu", torch.float64) + shift).to(lin.bias.dtype)
        return
    if name.endswith("to_k"):  # softmax ignores a logit shift shared by every key
        return
    out = unet.get_submodule(name.rsplit(".", 1)[0] + ".to_out.0")
    if out.bias is None:
        raise ErasekitError(f"{name}: no bias to fold the eraser's mean shift into (set affine=False)")
    key = f"{name.rsplit('.', 1)[0]}.to_out.0.bias"
    bias = values.get(key, out.bias.detach().to("cpu", torch.float64)).to(torch.float64)
    w_out = out.weight.detach().to("cpu", torch.float64)
    values[key] = (bias + w_out @ shift).to(out.bias.dtype)
