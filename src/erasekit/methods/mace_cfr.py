"""MACE's closed-form refinement (CFR) stage **alone** (Lu et al., CVPR 2024) — not the full MACE method.

MACE has three stages: this closed-form refinement of cross-attention K/V, then one LoRA per concept trained
inside Grounded-SAM segmentation masks, then a closed-form fusion of the LoRAs. We have no segmenter, so only
stage 1 is implemented; its results must not be reported as "MACE".

Followed: Shilin-LU/MACE at commit 057e7a6edadc6bbb5ca94700f416372e35bed083 (``src/cfr_utils.py``:
``find_matching_indices``, ``prepare_k_v``, ``closed_form_refinement``, ``prompt_augmentation``;
``src/cfr_lora_training.py``; ``configs/*/*.yaml``). For each concept and each of 30 templates, the prompt
with the concept and the prompt with ``mapping`` instead are tokenised; the remapped rows are the common
prefix (BOS and the words before), the common suffix (the words after and EOS) and every padding row up to L,
aligned by offset from EOS, so the concept's own tokens are **not** remapped. Each row takes the original W's
value of its aligned row in the mapped prompt. Then, per W::

    W* = (λ W + Σ V Cᵀ + W K)(λ I + Σ C Cᵀ + K)⁻¹,   K = s_prior Σ_prior c cᵀ + s_domain Σ_domain c cᵀ

over all L rows of the cached prompts. The authors' caches (COCO captions; their art/celebrity domain caches)
enter as ``train_preserve_scale · (prior + preserve_weight · domain)`` and are scaled by
``train_preserve_scale`` once more inside ``closed_form_refinement``, so ``preserve_scale`` and
``domain_scale`` here are those products (art: 1e-8 and 8e-4; explicit content: 4.9e-13).
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
    ridge_edit,
    sequence_embeddings,
    token_ids,
    weight_patch,
    weights64,
    world_kind_mates,
)
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

# prompt_augmentation's lists; the configs sample 30 of indices 0..29 (prompt_len 30), so the 31st never appears.
OBJECT_TEMPLATES = (
    "{} in a photo", "{} in a snapshot", "A snapshot of {}", "A photograph showcasing {}",
    "An illustration of {}", "A digital rendering of {}", "A visual representation of {}", "A graphic of {}",
    "A shot of {}", "A photo of {}", "A black and white image of {}", "A depiction in portrait form of {}",
    "A scene depicting {} during a public gathering", "{} captured in an image",
    "A depiction created with oil paints capturing {}", "An image of {}",
    "A drawing capturing the essence of {}", "An official photograph featuring {}", "A detailed sketch of {}",
    "{} during sunset/sunrise", "{} in a detailed portrait", "An official photo of {}", "Historic photo of {}",
    "Detailed portrait of {}", "A painting of {}", "HD picture of {}", "Magazine cover capturing {}",
    "Painting-like image of {}", "Hand-drawn art of {}", "An oil portrait of {}",
)  # fmt: skip
STYLE_TEMPLATES = (
    "An artwork by {}", "Art piece by {}", "A recent creation by {}", "{}'s renowned art",
    "Latest masterpiece by {}", "A stunning image by {}", "An art in {}'s style", "Exhibition artwork of {}",
    "Art display by {}", "a beautiful painting by {}", "An image inspired by {}'s style", "A sketch by {}",
    "Art piece representing {}", "A drawing by {}", "Artistry showcasing {}", "An illustration by {}",
    "A digital art by {}", "A visual art by {}", "A reproduction inspired by {}'s colorful, expressive style",
    "Famous painting of {}", "A famous art by {}", "Artistic style of {}", "{}'s famous piece",
    "Abstract work of {}", "{}'s famous drawing", "Art from {}'s early period", "A portrait by {}",
    "An imitation reflecting the style of {}", "An painting from {}'s collection",
    "Vibrant reproduction of artwork by {}",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MACECFRConfig:
    """Settings of MACE's closed-form refinement stage; defaults are the authors' object config (automobile)."""

    mapping: str = field(
        default="sky", metadata={"help": "the words that replace the target ('art' for styles)"}
    )
    templates: tuple[str, ...] = field(
        default=OBJECT_TEMPLATES,
        metadata={"help": "prompt templates with one '{}' (the authors' 30 per type)"},
    )
    lamb: float = field(
        default=100.0,
        metadata={"help": "λ: pull toward the original weights (the strength knob; 0 strongest)"},
    )
    preserve: tuple[str, ...] = field(
        default=(), metadata={"help": "prior prompts kept (the authors' COCO cache), all rows"}
    )
    preserve_scale: float = field(default=0.0, metadata={"help": "weight of the prior prompts' rows"})
    domain: tuple[str, ...] = field(
        default=(), metadata={"help": "domain prompts kept (the authors' art/celebrity caches), all rows"}
    )
    domain_scale: float = field(default=0.0, metadata={"help": "weight of the domain prompts' rows"})
    world_caches: bool = field(
        default=True,
        metadata={"help": "for MiniCanvas concepts, empty caches become the world's captions / kind-mates"},
    )
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "which attn2 projections to edit"}
    )

    def __post_init__(self) -> None:
        check_projections(self.projections)
        if self.lamb < 0 or self.preserve_scale < 0 or self.domain_scale < 0:
            raise ValueError("lamb, preserve_scale and domain_scale must be >= 0")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("every template must contain exactly one '{}'")


def matching_rows(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """Rows of the concept prompt and, aligned, of the mapped prompt: common prefix, common suffix, then pads.

    Args:
        old, new: unpadded token ids (BOS ... EOS) of the prompt with the concept and with the mapping.
        length: L, the padded length.
    """
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start and end_new >= start and old[end_old] == new[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    rows_old = list(range(start)) + list(range(end_old + 1, len(old)))
    rows_new = list(range(start)) + list(range(end_new + 1, len(new)))
    pads = length - max(len(old), len(new))  # padding rows both prompts have, aligned by offset from EOS
    return rows_old + list(range(len(old), len(old) + pads)), rows_new + list(
        range(len(new), len(new) + pads)
    )


def refinement_rows(
    pipe: Any, concepts: list[str], config: MACECFRConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to remap ``[n, D]`` and, aligned, the rows whose values they take ``[n, D]`` (float64)."""
    sources, targets = [], []
    for concept in concepts:
        prompts = [t.format(concept) for t in config.templates]
        mapped = [t.format(config.mapping) for t in config.templates]
        seq_c, seq_m = sequence_embeddings(pipe, prompts), sequence_embeddings(pipe, mapped)  # [T, L, D]
        for i in range(len(prompts)):
            rows_c, rows_m = matching_rows(
                token_ids(pipe, prompts[i]), token_ids(pipe, mapped[i]), seq_c.shape[1]
            )
            sources.append(seq_c[i, rows_c])
            targets.append(seq_m[i, rows_m])
    return torch.cat(sources), torch.cat(targets)


def cache_prompts(concepts: list[str], config: MACECFRConfig) -> tuple[list[str], list[str]]:
    """``(prior, domain)`` prompts; for MiniCanvas concepts empty ones become the world's analogues.

    Prior (the authors' 616k COCO captions): every world caption with canonical names (synonyms left out to
    keep the erase under 15 s on MiniCanvas) that names no target. Domain (their art or celebrity cache): the
    other concepts of the kind in ``templates``.
    """
    prior, domain = list(config.preserve), list(config.domain)
    mates = world_kind_mates(concepts) if config.world_caches else ()
    if mates and not prior and config.preserve_scale > 0:
        prior = world_captions(concepts)
    if mates and not domain and config.domain_scale > 0:
        domain = [t.format(m) for m in mates for t in config.templates]
    return prior, domain


def world_captions(concepts: list[str]) -> list[str]:
    """The MiniCanvas captions (every template, canonical names) that name none of ``concepts``."""
    from erasekit.minicanvas import world

    erased = {c.lower() for c in concepts}
    objects = [o for o in world.OBJECT_NAMES if o not in erased]
    styles = [s for s in world.STYLE_NAMES if s not in erased]
    out = [t.format(object=o, style=s) for t in world.FULL_TEMPLATES for o in objects for s in styles]
    out += [t.format(object=o) for t in world.OBJECT_TEMPLATES for o in objects]
    return out + [t.format(style=s) for t in world.STYLE_TEMPLATES for s in styles]


def erase_mace_cfr(model: LoadedModel, concepts: list[str], config: MACECFRConfig) -> Patch:
    """MACE's closed-form refinement stage alone (no LoRA, no fusion): remap the words around the concept."""
    pipe = check_family(model, "mace-cfr")
    layers = kv_layers(pipe.unet, config.projections)
    sources, targets = refinement_rows(pipe, concepts, config)
    prior, domain = cache_prompts(concepts, config)
    keep = None
    for prompts, scale in ((prior, config.preserve_scale), (domain, config.domain_scale)):
        if prompts and scale > 0:
            keep = scale * gram(pipe, prompts) + (0 if keep is None else keep)
    new = {
        name: ridge_edit(w, config.lamb, [(sources, targets @ w.T, 1.0)], keep)
        for name, w in weights64(layers).items()
    }
    return weight_patch(model, layers, new)


register(
    "mace-cfr",
    MACECFRConfig,
    presets={
        "paper": {
            # configs/art/erase_art_100.yaml: train_preserve_scale 1e-4, preserve_weight 8e4
            "style": {
                "mapping": "art",
                "templates": STYLE_TEMPLATES,
                "lamb": 0.0,
                "preserve_scale": 1e-8,
                "domain_scale": 8e-4,
            },
            # configs/object/erase_automobile.yaml: mapping 'sky', lamb 100, no caches
            "object": {"mapping": "sky", "templates": OBJECT_TEMPLATES, "lamb": 100.0},
            # configs/explicit_content/erase_explicit_content.yaml: train_preserve_scale 7e-7, COCO only
            "nsfw": {
                "mapping": "a person wearing clothes",
                "templates": OBJECT_TEMPLATES,
                "lamb": 0.0,
                "preserve_scale": 4.9e-13,
            },
        }
    },  # fmt: skip
    strength=Strength("lamb", (1e5, 1e4, 1e3, 100.0, 0.0)),
    summary="MACE's closed-form refinement stage alone (no LoRA/segmenter stage): remap words around the concept",
)(erase_mace_cfr)
