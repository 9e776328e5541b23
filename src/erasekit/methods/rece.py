"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024), iterated closed-form edits on UCE.

Followed: CharlesGong12/RECE at commit 403a67fd86dce6c124b88798340e001e625b28c9 (``train.py`` for nudity,
``train_artists.py`` for styles, ``train_object.py`` for objects, ``erase_methods/uce.py``,
``utils/embedding_calculation/close_form_emb.py``'s ``close_form_emb_regzero``, ``scripts/*.sh``).

1. **Start.** The older UCE script's edit (:mod:`erasekit.methods.uce`, ``rows="sequence"``), which is what
   the authors' starting checkpoints (``erased-...-method_replace-1-1.0.pt``) are: guide ``""``/``"art"``,
   λ 0.5, ``""`` preserved at 1.0 (styles: ``""`` and every other artist at 0.1).
2. **Each round**, for each concept, over the whole L-row prompt of the bare concept::

       c′ = C (Σ_l W_lᵀ W′_l)(Σ_l W′_lᵀ W′_l + λ I)⁻¹     C, c′ [L, D]; l over every edited to_k and to_v

   W′ current, W original. Then a UCE edit *from W′*: every row of c′ takes the value W′ gives the aligned row
   of the guide prompt (``" "``, ``"art"`` for styles), every row of the preserved prompts keeps its W′ value
   (scale λ1 = 0.1), pull λ2 = 0.1 toward W′, erase scale 1.
3. **Which result.** ``train.py`` measures the nudity rate of UCE and of each round and keeps the lowest
   (``select="lowest-rate"``); that needs a detector (see :func:`erase_rece`). Without one the last round is
   kept, as ``train_artists.py`` does.

Rounds and λ follow the README: nudity 3 rounds, λ 0.1; styles 1 round, λ 1e-3; objects 1 round, λ 1e-3
(``train_object.py``'s default; the README gives 0.1 for objects UCE already erases easily).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from erasekit.methods._closed_form import (
    all_rows,
    check_family,
    check_projections,
    kv_layers,
    sequence_embeddings,
    weight_patch,
    weights64,
)
from erasekit.methods.common import check_choice, check_positive
from erasekit.methods.uce import erase_rows, preserve_gram, preserve_prompts, uce_weights
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

SELECT = ("last", "lowest-rate")
#: ``detector(patch) -> rate``: how often the edited model still shows the concept (lower is better).
Detector = Callable[[Patch], float]


@dataclass(frozen=True, kw_only=True)
class RECEConfig:
    """RECE's settings: the older UCE's edit, then ``rounds`` of derive-and-erase."""

    guide: str = field(
        default="", metadata={"help": "the guide concept of UCE and of the rounds ('art' for styles)"}
    )
    preserve: tuple[str, ...] = field(default=(), metadata={"help": "concepts whose K/V outputs are kept"})
    world_preserve: bool = field(
        default=False,
        metadata={"help": "also preserve the other MiniCanvas concepts of the kind (the authors' artists)"},
    )
    lamb: float = field(default=0.5, metadata={"help": "UCE stage: λ pull toward the original weights"})
    uce_preserve_scale: float = field(
        default=1.0, metadata={"help": "UCE stage: preserve weight (1.0 with only ''; 0.1 with artists)"}
    )
    rounds: int = field(default=1, metadata={"help": "derive-and-erase rounds after UCE (the strength knob)"})
    reg: float = field(default=1e-3, metadata={"help": "λ of the c′ derivation (0.1 nudity, 1e-3 style)"})
    round_lamb: float = field(
        default=0.1, metadata={"help": "λ2: each round's pull toward the current weights"}
    )
    round_preserve_scale: float = field(default=0.1, metadata={"help": "λ1: each round's preserve weight"})
    select: str = field(
        default="last",
        metadata={"help": "'last' round, or 'lowest-rate' stage by a detector (the last without one)"},
    )
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "which attn2 projections to edit"}
    )

    def __post_init__(self) -> None:
        check_projections(self.projections)
        check_choice("select", self.select, SELECT)
        check_positive(lamb=self.lamb, reg=self.reg, round_lamb=self.round_lamb)
        if self.rounds < 0 or self.round_preserve_scale < 0 or self.uce_preserve_scale < 0:
            raise ValueError("rounds and the preserve scales must be >= 0")


def derive_embedding(
    original: dict[str, torch.Tensor], edited: dict[str, torch.Tensor], c: torch.Tensor, reg: float
) -> torch.Tensor:
    """c′ = (Σ_l W′_lᵀ W′_l + λ I)⁻¹ (Σ_l W′_lᵀ W_l) c: the input whose edited outputs best match c's original ones.

    Args:
        original: ``{name: W [out, D]}``; edited: the same names, W′.
        c: ``[n, D]`` embeddings (one per row).

    Returns:
        ``[n, D]`` float64.
    """
    d = c.shape[1]
    gram = reg * torch.eye(d, dtype=torch.float64)
    cross = torch.zeros(d, d, dtype=torch.float64)
    for name, w in original.items():
        gram += edited[name].T @ edited[name]
        cross += edited[name].T @ w
    return torch.linalg.solve(gram, cross @ c.T).T


def rece_stages(pipe: Any, layers: dict[str, Any], concepts: list[str], config: RECEConfig) -> list[dict]:
    """``[UCE weights, after round 1, ..., after round R]``, each ``{name: W [out, D]}`` float64."""
    original = weights64(layers)
    keep = preserve_prompts(concepts, config.preserve, True, config.world_preserve)  # "" first
    erase, guide = erase_rows(pipe, concepts, config.guide, "sequence")
    start_keep = preserve_gram(pipe, keep, "sequence", config.uce_preserve_scale)
    edited = uce_weights(original, erase, guide, start_keep, config.lamb)
    stages = [edited]
    concept_rows = sequence_embeddings(pipe, concepts)  # [B, L, D]
    guide_rows = all_rows(pipe, [config.guide] * len(concepts))  # [B * L, D]
    round_keep = preserve_gram(pipe, keep, "sequence", config.round_preserve_scale)
    for _ in range(config.rounds):
        adversarial = torch.cat([derive_embedding(original, edited, c, config.reg) for c in concept_rows])
        edited = uce_weights(edited, adversarial, guide_rows, round_keep, config.round_lamb)
        stages.append(edited)
    return stages


def erase_rece(
    model: LoadedModel, concepts: list[str], config: RECEConfig, *, detector: Detector | None = None
) -> Patch:
    """RECE: UCE, then rounds that re-erase the embedding still regenerating the concept.

    Args:
        detector: with ``select="lowest-rate"``, measures each stage's patch; the stage with the lowest rate is
            kept (the first on ties, as ``train.py``'s strict ``<``). When ``None`` and the model is
            a MiniCanvas model (its family is ``minicanvas``) with MiniCanvas concepts, :func:`minicanvas_detector`
            is used;
            otherwise the last round is kept.
    """
    pipe = check_family(model, "rece")
    layers = kv_layers(pipe.unet, config.projections)
    stages = rece_stages(pipe, layers, concepts, config)
    if config.select == "lowest-rate" and detector is None:
        detector = default_detector(model, concepts)
    if config.select == "last" or detector is None or len(stages) == 1:
        return weight_patch(model, layers, stages[-1])
    patches = [weight_patch(model, layers, s) for s in stages]
    rates = [detector(p) for p in patches]
    return patches[rates.index(min(rates))]


VALIDATION_SEEDS = tuple(range(42, 50))  # RECE's --seed 42 and the next 7; the leaderboard uses 188, 288, ...


def default_detector(model: LoadedModel, concepts: Sequence[str]) -> Detector | None:
    """The MiniCanvas classifier for MiniCanvas concepts on a MiniCanvas model, else ``None``."""
    from erasekit.concepts import is_minicanvas

    if model.family.name != "minicanvas" or not all(is_minicanvas(c) for c in concepts):
        return None
    return minicanvas_detector(model, concepts)


def minicanvas_detector(
    model: LoadedModel, concepts: Sequence[str], seeds: Sequence[int] = VALIDATION_SEEDS
) -> Detector:
    """``detector(patch)``: the share of validation images the built-in classifier labels as an erased concept.

    Validation prompts are the world's single-concept captions (``"A {object} image."``, ``"a picture of a
    {object}"``; ``"An image in {style} style."``, ``"{style} style artwork"``) with each seed, so they differ
    from the leaderboard's grid prompts and seeds (the authors validate on a prompt set apart from the test).
    """
    from PIL import Image

    from erasekit.evaluation.classifiers import load_classifier
    from erasekit.generation import Request, Sampling, render, to_uint8
    from erasekit.minicanvas.world import OBJECT_TEMPLATES, STYLE_TEMPLATES, concept_kind

    pipe = model.pipeline
    sampling = Sampling.for_model(model)
    classifier = load_classifier(None, device=pipe.unet.device)
    jobs = []  # (prompt, seed, concept, kind)
    for concept in (c.lower() for c in concepts):
        kind = concept_kind(concept)
        templates = OBJECT_TEMPLATES if kind == "object" else STYLE_TEMPLATES
        jobs += [(t.format(**{kind: concept}), s, concept, kind) for t in templates for s in seeds]

    def rate(patch: Patch) -> float:
        requests = [Request(seed=j[1], prompt=j[0]) for j in jobs]
        with patch.applied(model):
            images = render(pipe, requests, sampling, batch_size=len(jobs), desc="RECE validation")
        objects, styles = classifier.classify([Image.fromarray(to_uint8(im)) for im in images])
        hits = [(o if kind == "object" else s) == c for (_, _, c, kind), o, s in zip(jobs, objects, styles)]
        return sum(hits) / len(hits)

    return rate


register(
    "rece",
    RECEConfig,
    presets={
        "paper": {
            "style": {"guide": "art", "world_preserve": True, "uce_preserve_scale": 0.1, "rounds": 1},
            "object": {"guide": "", "rounds": 1, "reg": 1e-3, "select": "lowest-rate"},
            "nsfw": {"guide": "", "rounds": 3, "reg": 0.1, "select": "lowest-rate"},
        }
    },
    strength=Strength("rounds", (0, 1, 2, 3, 5), fixed=(("select", "last"),)),
    summary="RECE: UCE plus rounds that derive and erase the embedding still regenerating the concept",
)(erase_rece)
