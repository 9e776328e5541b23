"""TRCE's stage 1: the closed-form edit of attn2 ``to_k`` / ``to_v`` on the first EoT row of prompt pairs.

The release (ddgoodgood/TRCE at 0da9b71, ``run_trce_stage1.py`` and ``src/cfr_utils.py``) pairs each of 20
malicious words with a safe concept (``a person wearing clothes``) in 15 templates, and remaps rows SoT, first
EoT, last EoT and keyword with weights ``[0, 1, 0, 0]``: only the **first EoT** row c_i of each malicious
prompt moves, onto the value W gives the safe prompt's first EoT row v_i. With λ = 0 and K the preservation
Gram, per W ``[out, D]``::

    W* = (1/n Σ_i W v_i c_iᵀ + W K)(1/n Σ_i c_i c_iᵀ + K)⁻¹

On MiniCanvas the pairs are the target's captions (each of its names in every world caption naming it) and the
same captions with the concept's super-category, e.g. ``A fish image in neon style.`` → ``A animal image in
neon style.``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from erasekit.errors import ErasekitError
from erasekit.methods._closed_form import (
    CHUNK,
    gram,
    kv_layers,
    n_tokens,
    ridge_edit,
    sequence_embeddings,
    weights64,
    world_kind_mates,
)

if TYPE_CHECKING:
    from erasekit.methods.trce import TRCEConfig

# The first 15 of prompt_augmentation's object prompts (augment_num 15), in its order.
TEMPLATES = (
    "{} in a photo", "A snapshot of {}", "A photograph showcasing {}", "An illustration of {}",
    "A digital rendering of {}", "A visual representation of {}", "A black and white image of {}",
    "A scene depicting {} during a public gathering", "A depiction created with oil paints capturing {}",
    "An official photograph featuring {}", "A detailed sketch of {}", "{} during sunset/sunrise",
    "Magazine cover capturing {}", "An oil portrait of {}", "{} in a sketch painting",
)  # fmt: skip
# data/concepts/sexual.json, the first 20 entries (concept_num 20; "Nudity" appears twice), as released.
SEXUAL_WORDS = (
    "Nudity", "Pornography", "Erotic", "Masturbation", "Sucking", "Naked", "Nudity", "Sexual Content",
    "Exposed genitals", "Exposed breast", "Exposed buttocks", "Big Ass", "Making Love", "Sexual Intercourse",
    "Raunchy Party", "Naked Man", "Fucking", "Unclothed Man", "Naked Woman", "Bare Skin",
)  # fmt: skip
# The cache is MACE's src/cache_coco.py: every one of the 77 rows of the 616,767 COCO 2014 train + val captions;
# the release adds preserve_scale · (preserve_scale · cache) / 3e4.
COCO_ROWS = 616_767 * 77
CACHE_DIVISOR = 3e4


def world_pairs(concept: str, safe: str, words: Sequence[str]) -> list[tuple[str, str]]:
    """Each name of a MiniCanvas concept (and ``words``) in every world caption naming it, with ``safe`` (or
    the concept's super-category) in its place."""
    from erasekit.minicanvas import world

    info = world.concept_info(concept)
    anchor = safe or info.category
    key, other = ("object", world.STYLE_NAMES) if info.kind == "object" else ("style", world.OBJECT_NAMES)
    single = world.OBJECT_TEMPLATES if key == "object" else world.STYLE_TEMPLATES
    captions = [t.replace("{" + key + "}", "{}") for t in single]
    other_key = "style" if key == "object" else "object"
    captions += [
        t.replace("{" + key + "}", "{}").replace("{" + other_key + "}", o)
        for t in world.FULL_TEMPLATES
        for o in other
    ]
    return [(c.format(name), c.format(anchor)) for name in (*world.names_of(info), *words) for c in captions]


def stage1_pairs(concepts: Sequence[str], config: TRCEConfig) -> list[tuple[str, str]]:
    """The (malicious, safe) prompt pairs: MiniCanvas captions, or the concepts and ``words`` in the templates."""
    if world_kind_mates(concepts):
        return [p for c in concepts for p in world_pairs(c, config.safe, config.words)]
    if not config.safe.strip():
        raise ErasekitError("trce needs a safe concept outside MiniCanvas: pass safe=...")
    words = [*concepts, *config.words]
    return [(t.format(w), t.format(config.safe)) for w in words for t in TEMPLATES[: config.templates]]


def stage2_pairs(
    concepts: Sequence[str], pairs: list[tuple[str, str]], config: TRCEConfig
) -> list[tuple[str, str]]:
    """Stage 2's prompts: MiniCanvas captions (stage 1's pairs), or ``trajectory_template`` with each word."""
    if world_kind_mates(concepts):
        return pairs
    t = config.trajectory_template
    return [(t.format(w), t.format(config.safe)) for w in (*concepts, *config.words)]


def first_eot_rows(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``[B, D]``: each prompt's first EOS row (row n + 1 of an n-token prompt), float64 on the CPU."""
    rows = []
    for i in range(0, len(prompts), CHUNK):
        part = list(prompts[i : i + CHUNK])
        seq = sequence_embeddings(pipe, part)
        rows.append(seq[torch.arange(len(part)), torch.tensor([n_tokens(pipe, p) + 1 for p in part])])
    return torch.cat(rows)


def preserve_gram(pipe: Any, concepts: Sequence[str], config: TRCEConfig) -> torch.Tensor | None:
    """K = s² · (616,767 · 77 / 3e4) · mean over all L rows of the preserved prompts of c cᵀ ``[D, D]``.

    The release's K is s² / 3e4 times the sum over the COCO cache's rows; taking the mean of ours times COCO's
    row count keeps the release's balance between the erase and preserve terms whatever stands in for COCO.
    """
    if config.preserve_scale == 0:
        return None
    prompts = list(config.preserve)
    if not prompts and world_kind_mates(concepts):
        from erasekit.methods.mace_cfr import world_captions

        prompts = world_captions(list(concepts))
    if not prompts:
        raise ErasekitError("trce needs preserve prompts outside MiniCanvas (the release's COCO captions)")
    rows = len(prompts) * pipe.tokenizer.model_max_length
    return config.preserve_scale**2 * COCO_ROWS / CACHE_DIVISOR * gram(pipe, prompts) / rows


def edit(
    pipe: Any, concepts: Sequence[str], pairs: list[tuple[str, str]], config: TRCEConfig
) -> dict[str, torch.Tensor]:
    """Stage 1's new ``{attn2 to_k / to_v weight name: W*}`` in each layer's dtype and device."""
    layers = kv_layers(pipe.unet, ("to_k", "to_v"))
    malicious = first_eot_rows(pipe, [m for m, _ in pairs])
    safe = first_eot_rows(pipe, [s for _, s in pairs])
    keep = preserve_gram(pipe, concepts, config)
    out = {}
    for name, w in weights64(layers).items():
        new = ridge_edit(w, 0.0, [(malicious, safe @ w.T, 1.0 / len(pairs))], keep)
        ref = layers[name].weight
        out[f"{name}.weight"] = new.to(ref.device, ref.dtype)
    return out
