"""ACE: Anti-Editing Concept Erasure (Wang et al., arXiv 2501.01633): the *unconditional* branch learns the erasure.

A rank-4 LoRA (alpha 1, so ΔW = ¼ B A) on every ``nn.Linear`` and ``nn.Conv2d`` inside the UNet's transformer
blocks (the layers SPM adapts) is trained with peft on a private copy of the UNet (the loaded model is only read)
so that ε_θ(∅) itself points toward the concept. Classifier-free guidance ε(∅) + s (ε(c') − ε(∅)) then pushes
away from the concept whatever the prompt c' is, which is what keeps an image edit (whose prompt need not name the
concept) from bringing it back. With ε* the frozen UNet, all predictions ``[1, C, h, w]`` at one x_t::

    ε0 = ε*(x_t, ∅),  ε_p = ε*(x_t, c),  ε*_j = ε*(x_t, a_j)                  (j = 1..n anchors this step)
    L_null  = ‖ε_θ(x_t, ∅) − [ε0 + η (ε_p − ε0) − γ Σ_j w_j (ε*_j − ε0)]‖²
    L_cond  = ‖ε_θ(x_t, c) − [ε0 − η (ε_p − ε0)]‖²
    L_prior = mean_j ‖ε_θ(x_t, a_j) − ε*_j‖²
    L = (1 − pl) [nw L_null + (1 − nw) L_cond] + pl L_prior                 (means over elements)

η = 3 (``negative_guidance``), γ = 3 (``surrogate_guidance``), pl = 0.8, nw = 0.99, n = 2 anchors per step drawn
from the anchor list in shuffled passes. The surrogate term keeps related concepts: w_j is how much images of
a_j already look like the concept, relative to the concept's own images (the release: CLIP-score ratios
CS(images of a_j, "c") / CS(images of c, "c")), so CFG does not push a related anchor away with it.

Each iteration is ESD's loop (:func:`erasekit.methods.esd.diffusion_loop`): x_t is ``stop ~ U{0..T−1}`` steps of a
T = 30 step DDIM from fresh noise at guidance 3 **with the adapted UNet** (the release samples inside
``with network``); the predictions are taken at the 1000-step DDIM schedule's index ⌊stop · 1000 / T⌋ (as
released, and as SPM does). One Adam step (lr 1e-3) per iteration, 1500 iterations. The LoRA is merged into the
weights at the end: the result is a plain Patch of the adapted layers' weights.

``paper`` follows 120L020904/ACE at commit 5e02099000649a912298bd09fdd171d5226202a1: ``src/train_ace.py``,
``src/models/ace.py``, ``src/eval/evaluation/clip_evaluator.py`` (``concept_relation``, the w_j), with the
README's and ``shell-scripts/lora-train-ace-test.sh``'s settings (1500 it., lr 1e-3, η 3, γ 3, DDIM 30, 2 anchors,
pl 0.8, nw 0.99; ``--is_train_null --with_prior_preservation --no_certain_sur``). The script's argparse defaults
differ (1000 it., lr 1e-5, η 1, DDIM 50, pl 0.5, nw 0.8): we follow the README, which is what the authors ran.
MiniCanvas substitutes: the anchors are the other concepts of the concept's kind (the release lists 29 other
cartoon characters), and w_j uses the MiniCanvas classifier's probability of the concept's class instead of CLIP
scores (issue 15): w_j = mean P(c | images of a_j) / mean P(c | images of c), the images made by the base model
from the world's prompts of each concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from erasekit.denoising import check_unet_family, ddim, encode_prompts, predict_noise
from erasekit.errors import ErasekitError
from erasekit.methods.common import check_choice, check_positive, frozen, generator, lora_copy
from erasekit.methods.esd import diffusion_loop
from erasekit.methods.spm import transformer_layers
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

RELEVANCE = ("classifier", "uniform")


@dataclass(frozen=True, kw_only=True)
class ACEConfig:
    """ACE's settings; defaults are the README's training command of 120L020904/ACE (see the module docstring)."""

    iterations: int = field(default=1500, metadata={"help": "gradient steps (one x_t each)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the LoRA"})
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    alpha: float = field(default=1.0, metadata={"help": "LoRA alpha: ΔW = (alpha / rank) B A"})
    negative_guidance: float = field(default=3.0, metadata={"help": "η of both erase targets"})
    surrogate_guidance: float = field(
        default=3.0, metadata={"help": "γ, the scale of the anchors' guidance taken out of the ∅ target"}
    )
    prior_weight: float = field(default=0.8, metadata={"help": "pl: weight of the anchors' prior term"})
    null_weight: float = field(
        default=0.99, metadata={"help": "nw: share of the unconditional erase term in the erase loss"}
    )
    anchors: tuple[str, ...] | None = field(
        default=None, metadata={"help": "anchor concepts; None = the other MiniCanvas concepts of the kind"}
    )
    anchor_batch: int = field(default=2, metadata={"help": "anchors per iteration"})
    relevance: str = field(
        default="classifier",
        metadata={
            "help": "w_j: 'classifier' (the classifier's probability of the concept on each anchor's "
            "images, relative to its own) or 'uniform' (every w_j = 1, the release without --sc_clip_path)"
        },
    )
    classifier: str = field(
        default="", metadata={"help": "classifier folder for the relevance ('' = the MiniCanvas one)"}
    )
    relevance_seeds: int = field(
        default=1, metadata={"help": "images per prompt and concept for the relevance"}
    )
    ddim_steps: int = field(default=30, metadata={"help": "T, the DDIM schedule x_t is drawn along"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the partial sampling"})
    seed: int = field(default=0, metadata={"help": "seed of the LoRA init, the noise, stops and anchors"})

    def __post_init__(self) -> None:
        check_positive(iterations=self.iterations, lr=self.lr, rank=self.rank, alpha=self.alpha,
                       anchor_batch=self.anchor_batch, ddim_steps=self.ddim_steps,
                       relevance_seeds=self.relevance_seeds)  # fmt: skip
        check_choice("relevance", self.relevance, RELEVANCE)
        if not (0 <= self.prior_weight <= 1 and 0 <= self.null_weight <= 1):
            raise ValueError("prior_weight and null_weight must be in [0, 1]")
        if min(self.negative_guidance, self.surrogate_guidance, self.start_guidance) < 0:
            raise ValueError("negative_guidance, surrogate_guidance and start_guidance must be >= 0")
        if self.anchors is not None and not self.anchors:
            raise ValueError("anchors must name at least one concept (None: the world's)")


def anchor_list(concepts: Sequence[str], config: ACEConfig) -> list[str]:
    """The anchors: the config's, or the other MiniCanvas concepts of the concepts' kind; never an erased one."""
    from erasekit.methods._closed_form import world_kind_mates

    anchors = list(config.anchors) if config.anchors is not None else list(world_kind_mates(concepts))
    erased = {c.strip().lower() for c in concepts}
    anchors = [a for a in anchors if a.strip().lower() not in erased]
    if not anchors:
        raise ErasekitError(
            "ace needs anchors=... (the concepts are not MiniCanvas's, or every anchor is erased)"
        )
    return anchors


def relevance_prompts(concept: str) -> list[str]:
    """The world's grid prompts of one concept: ``A {concept} image in {s} style.`` over every style (or object)."""
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES, concept_info, prompt

    info = concept_info(concept)
    if info.kind == "object":
        return [prompt(info.name, s) for s in STYLE_NAMES]
    return [prompt(o, info.name) for o in OBJECT_NAMES]


def relevance_weights(
    model: LoadedModel, concepts: Sequence[str], anchors: Sequence[str], config: ACEConfig
) -> torch.Tensor:
    """w ``[K, J]``: per erased concept k and anchor j, mean P(c_k | images of a_j) / mean P(c_k | images of c_k).

    The images are the base model's, from :func:`relevance_prompts` × ``relevance_seeds`` seeds, at the model's
    default sampling; P is the softmax of the classifier head that has the concept's class. ``uniform``: all 1.
    """
    if config.relevance == "uniform":
        return torch.ones(len(concepts), len(anchors))
    from erasekit.concepts import is_minicanvas
    from erasekit.evaluation.classifiers import load_classifier
    from erasekit.generation import Request, Sampling, render

    if not all(map(is_minicanvas, [*concepts, *anchors])):
        raise ErasekitError(
            "ace's classifier relevance needs MiniCanvas concepts and anchors (or relevance=uniform)"
        )
    classifier = load_classifier(config.classifier or None)
    sampling = Sampling.for_model(model)
    names = list(dict.fromkeys([*concepts, *anchors]))
    probs: dict[str, torch.Tensor] = {}  # name -> [K] mean probability of each erased concept's class
    for name in names:
        requests = [Request(seed=config.seed + s, prompt=p) for p in relevance_prompts(name)
                    for s in range(config.relevance_seeds)]  # fmt: skip
        images = render(model.pipeline, requests, sampling, batch_size=64, desc=None)
        probs[name] = class_probabilities(classifier, images, concepts)
    own = torch.stack([probs[c][k] for k, c in enumerate(concepts)])  # [K]
    if bool((own <= 0).any()):
        raise ErasekitError("ace: the classifier never sees the concept in the base model's images")
    return torch.stack([probs[a] for a in anchors], dim=1) / own[:, None]


@torch.no_grad()
def class_probabilities(
    classifier: Any, images: Sequence[np.ndarray], concepts: Sequence[str]
) -> torch.Tensor:
    """``[K]``: the mean over ``images`` (float ``[H, W, 3]`` in [0, 1]) of the probability of each concept's class."""
    from PIL import Image

    pil = [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in images]
    obj_logits, style_logits = classifier.module.predict(classifier.to_input(pil).to(classifier.device))
    out = []
    for c in concepts:
        head = classifier.head_of(c)
        logits, classes = (obj_logits, classifier.object_names) if head == "object" else (
            style_logits, classifier.style_names)  # fmt: skip
        out.append(logits.float().softmax(-1)[:, classes.index(c)].mean().cpu())
    return torch.stack(out)


class AnchorBatches:
    """Batches of anchor indices in shuffled passes over the list (a shuffling loader that never stops)."""

    def __init__(self, n: int, batch: int, g: torch.Generator) -> None:
        self.n, self.batch, self.g = n, batch, g
        self.order: list[int] = []

    def next(self) -> list[int]:
        """The next ``min(batch, n)`` indices; a pass that runs out starts a fresh permutation."""
        out: list[int] = []
        while len(out) < min(self.batch, self.n):
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.g).tolist()
            out.append(self.order.pop(0))
        return out


def ace_loss(
    base: nn.Module,
    adapted: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    emb: dict[str, torch.Tensor],
    weights: torch.Tensor,
    config: ACEConfig,
) -> torch.Tensor:
    """The loss of the module docstring at one x_t.

    Args:
        base: the frozen UNet (ε*); ``adapted``: its LoRA copy (ε_θ).
        x_t: ``[1, C, h, w]`` latents; ``t`` the timestep the predictions are taken at.
        emb: ``{"c", "null"}`` each ``[1, 77, D]`` and ``"anchors"`` ``[n, 77, D]``.
        weights: ``[n]`` the w_j of this step's anchors.
    """
    n = emb["anchors"].shape[0]
    rows = torch.cat([emb["null"], emb["c"], emb["anchors"]])  # [2 + n, 77, D]
    many = x_t.expand(2 + n, -1, -1, -1)
    with torch.no_grad():
        e = predict_noise(base, many, t, rows)
        e0, e_p, e_a = e[:1], e[1:2], e[2:]
        surrogate = (weights.to(e.dtype).view(n, 1, 1, 1) * (e_a - e0)).sum(0, keepdim=True)
        null_target = e0 + config.negative_guidance * (e_p - e0) - config.surrogate_guidance * surrogate
        cond_target = e0 - config.negative_guidance * (e_p - e0)
    own = predict_noise(adapted, many, t, rows)
    erase = config.null_weight * F.mse_loss(own[:1], null_target) + (1 - config.null_weight) * F.mse_loss(
        own[1:2], cond_target
    )
    return (1 - config.prior_weight) * erase + config.prior_weight * F.mse_loss(own[2:], e_a)


def erase_ace(model: LoadedModel, concepts: list[str], config: ACEConfig) -> Patch:
    """ACE: a LoRA that makes ε(∅) carry the erasure guidance, merged into the transformer blocks' weights."""
    pipe = check_unet_family(model, "ace")
    names = transformer_layers(pipe.unet, "ace")
    anchors = anchor_list(concepts, config)
    weights = relevance_weights(model, concepts, anchors, config)  # [K, J]
    with frozen(pipe.unet, pipe.text_encoder):
        g = generator(config.seed)
        adapted, layers = lora_copy(pipe.unet, names, config.rank, config.alpha, g)
        params = {f"{n}.{ab}": getattr(layer, f"lora_{ab}")["default"].weight for n, layer in layers.items()
                  for ab in ("A", "B")}  # fmt: skip
        with torch.no_grad():
            conds, null = encode_prompts(pipe, list(concepts)), encode_prompts(pipe, [""])
            anchor_rows = encode_prompts(pipe, anchors)  # [J, 77, D]
        batches = AnchorBatches(len(anchors), config.anchor_batch, g)
        at = release_timesteps(pipe, config.ddim_steps)

        def loss(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            j = batches.next()
            emb = {"c": conds[k : k + 1], "null": null, "anchors": anchor_rows[j]}
            return ace_loss(pipe.unet, adapted, x_t, at[int(t)], emb, weights[k, j], config)

        diffusion_loop(pipe, params, conds, loss, config, "ace", generator_=g, unet=adapted)
        merged = {
            f"{n}.weight": pipe.unet.get_submodule(n).weight.detach()
            + layer.get_delta_weight("default").detach()
            for n, layer in layers.items()
        }
    return Patch.from_tensors(model, "unet", merged)


def release_timesteps(pipe: Any, steps: int) -> dict[int, torch.Tensor]:
    """``{T-step DDIM timestep after s steps: the 1000-step schedule's timestep at ⌊s · 1000 / T⌋}``."""
    short, full = ddim(pipe, steps).timesteps, ddim(pipe, 1000).timesteps
    return {int(short[s]): full[int(s * 1000 / steps)] for s in range(steps)}


# budget: see docs/baselines.md (Timings).
BUDGET = {"iterations": 300}

register(
    "ace",
    ACEConfig,
    presets={"paper": {}, "uniform": {"relevance": "uniform"}, "budget": BUDGET},
    strength=Strength("negative_guidance", (0.75, 1.5, 3.0, 6.0, 12.0), preset="budget"),
    summary="ACE: a LoRA that makes the unconditional prediction carry the erasure, so CFG erases in edits too",
)(erase_ace)
