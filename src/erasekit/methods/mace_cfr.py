"""MACE's closed-form refinement (CFR) stage **alone** (Lu et al., CVPR 2024) — not the full MACE method.

MACE has three stages: this closed-form refinement of cross-attention K/V, then one LoRA per concept trained
inside Grounded-SAM segmentation masks, then a closed-form fusion of the LoRAs. We have no segmenter, so only
stage 1 is implemented; its results must not be reported as "MACE".

The refinement removes the concept's residue from the words around it: for prompts built from ``templates``
that contain the concept, every row after the concept (the following words and the first EOS), and the
concept's last token, are mapped to the values of the aligned rows of the same prompt with the concept
replaced by ``mapping``. Rows before the concept are identical in both prompts (CLIP's attention is causal), so
they are not constrained. ``preserve`` prompts (all their rows) keep their values. One ridge solve per W
(see :func:`erasekit.methods._closed_form.ridge_edit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.methods._closed_form import (
    check_family,
    check_projections,
    kv_layers,
    n_tokens,
    ridge_edit,
    sequence_embeddings,
    weight_patch,
    weights64,
)
from erasekit.methods.common import check_positive
from erasekit.patch import Patch
from erasekit.registry import register

TEMPLATES = (
    "a photo of {}",
    "an image of {}",
    "a painting of {}",
    "{} in a landscape",
    "a close-up picture of {}, detailed",
    "{}, high quality",
)
PRESERVE = (
    "a photo of a street in the city",
    "a bowl of fruit on a wooden table",
    "a man riding a bicycle",
    "two dogs playing in the grass",
    "a red car parked near a building",
    "a landscape with mountains and a lake",
)


@dataclass(frozen=True, kw_only=True)
class MACECFRConfig:
    """Settings of MACE's closed-form refinement stage (the LoRA and fusion stages are not implemented)."""

    mapping: str = field(
        default="", metadata={"help": "the concept that replaces the target ('art' for styles)"}
    )
    templates: tuple[str, ...] = field(default=TEMPLATES, metadata={"help": "prompt templates with one '{}'"})
    preserve: tuple[str, ...] = field(
        default=PRESERVE, metadata={"help": "prompts whose K/V outputs are kept"}
    )
    lamb: float = field(default=0.1, metadata={"help": "λ: pull toward the original weights"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight of the preserve rows"})
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "which attn2 projections to edit"}
    )

    def __post_init__(self) -> None:
        check_projections(self.projections)
        check_positive(lamb=self.lamb)
        if self.preserve_scale < 0:
            raise ValueError("preserve_scale must be >= 0")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("every template must contain exactly one '{}'")


def aligned_positions(pipe: Any, template: str, concept: str, mapping: str) -> list[tuple[int, int]]:
    """``[(row in the concept prompt, row in the mapped prompt)]``: the concept's last token, then every later row.

    Rows run to the first EOS. Tokenisation is checked to split at the template's ``{}``.
    """
    pre = n_tokens(pipe, template.split("{}")[0].strip())
    n_c, n_m = n_tokens(pipe, concept), n_tokens(pipe, mapping)
    total = n_tokens(pipe, template.format(concept))
    after = total - pre - n_c
    if n_tokens(pipe, template.format(mapping).strip()) != pre + n_m + after or after < 0:
        raise ValueError(f"template {template!r} does not tokenise around its '{{}}'")
    pairs = [(pre + n_c, pre + n_m)]  # the concept's last token (BOS-side row when the mapping is empty)
    pairs += [(pre + n_c + i, pre + n_m + i) for i in range(1, after + 2)]  # later words and the first EOS
    return pairs


def refinement_rows(
    pipe: Any, concepts: list[str], config: MACECFRConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to remap ``[n, D]`` and, aligned, the rows whose values they take ``[n, D]`` (float64)."""
    sources, targets = [], []
    for concept in concepts:
        prompts = [t.format(concept) for t in config.templates]
        mapped = [t.format(config.mapping).strip() for t in config.templates]
        seq_c, seq_m = sequence_embeddings(pipe, prompts), sequence_embeddings(pipe, mapped)
        for i, template in enumerate(config.templates):
            for pc, pm in aligned_positions(pipe, template, concept, config.mapping):
                sources.append(seq_c[i, pc])
                targets.append(seq_m[i, pm])
    return torch.stack(sources), torch.stack(targets)


def preserve_rows(pipe: Any, prompts: tuple[str, ...]) -> torch.Tensor:
    """Rows 1..n+1 of each preserve prompt, ``[m, D]`` float64."""
    if not prompts:
        return torch.zeros(0, 0, dtype=torch.float64)
    seq = sequence_embeddings(pipe, list(prompts))
    return torch.cat([seq[i, 1 : n_tokens(pipe, p) + 2] for i, p in enumerate(prompts)])


def erase_mace_cfr(model: Any, concepts: list[str], config: MACECFRConfig) -> Patch:
    """MACE's closed-form refinement stage alone (no LoRA, no fusion): remap the concept's co-occurring words."""
    pipe = check_family(model, "mace-cfr")
    layers = kv_layers(pipe.unet, config.projections)
    sources, targets = refinement_rows(pipe, concepts, config)
    keep = preserve_rows(pipe, config.preserve)
    new = {}
    for name, w in weights64(layers).items():
        pairs = [(sources, targets @ w.T, 1.0)]
        if keep.numel():
            pairs.append((keep, keep @ w.T, config.preserve_scale))
        new[name] = ridge_edit(w, config.lamb, pairs)
    return weight_patch(model, layers, new)


register(
    "mace-cfr",
    MACECFRConfig,
    presets={"paper": {"style": {"mapping": "art"}, "object": {"mapping": ""}, "nsfw": {"mapping": ""}}},
    summary="MACE's closed-form refinement stage alone (no LoRA/segmenter stage): remap words around the concept",
)(erase_mace_cfr)
