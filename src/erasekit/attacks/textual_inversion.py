"""Circumventing Concept Erasure, CCE (Pham et al., ICLR 2024): textual inversion on the erased model.

The ``paper`` preset follows the authors' release, NYU-DICE-Lab/circumventing-concept-erasure at commit bb7034b7
(``esd/train.sh`` and ``esd/concept_inversion.py``; the other methods' folders run the same script and arguments):

1. The BASE model (patch removed) generates ``images`` (25) images of the concept from the base prompts.
2. A new token embedding v* ``[D]``, started from ``init_word``'s embedding, is learned on the ERASED model with
   the textual-inversion loss ‖ε − ε_θ′(x_t, t, E(caption with v*))‖², t uniform, fresh ε. Each optimiser step
   averages ``accumulation`` (4) micro-batches of ``batch`` (4) images; each image is mirrored with probability
   ``flip`` (0.5) and encoded with the VAE's ``latent_dist.sample()``. AdamW (β 0.9 / 0.999, ε 1e-8, weight
   decay 0.01) at the ``--scale_lr`` rate lr × batch × accumulation = 5e-3 × 4 × 4 = 0.08, 5000 steps.
3. Captions (``captions``): ``templates`` draws one of the released templates per image, with the placeholder
   for the concept; ``prefix`` is the release's I2P mode (the placeholder in front of the image's own prompt),
   used for nudity; ``prompts`` (ours, not the authors') is the image's prompt with the concept's name replaced.
4. The erased model generates the placeholder prompts with v*.

The released templates are the textual-inversion ImageNet lists (``imagenet_style_templates_small`` for
styles, ``imagenet_templates_small`` for objects). MiniCanvas's captions never contain their words
("painting", "rendering", "cropped"...), so on MiniCanvas concepts the world's own one-concept captions stand
in: ``An image in {style} style.`` / ``{style} style artwork`` and ``A {object} image.`` / ``a picture of a {object}``.

The embedding enters through a removable hook on the token embedding (no token is added to the tokenizer), and
generation passes ``prompt_embeds``; the model is never modified.

Two registered names share this code and its budgets. ``textual-inversion`` learns v* on the erased model: it is
also M-ErasureBench's *learned embeddings, white-box* scenario. ``textual-inversion-transfer`` is that scenario's
*black-box* form: v* is learned on the BASE model (no access to the erased weights) and then generated with on
the erased one. M-ErasureBench's own training budget is not published in code; both use CCE's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.attacks import register_attack
from erasekit.attacks._denoise import denoise_loss, draws, fixed_draws, model_latents, vae_posteriors
from erasekit.attacks._memo import BaseModelMemo
from erasekit.attacks.base import (
    PLACEHOLDER,
    AttackResult,
    AttackTarget,
    Budget,
    Candidate,
    PromptSet,
    placeholder_id,
    placeholder_rows,
    token_table,
)
from erasekit.denoising import check_unet_family, encode_prompts
from erasekit.errors import ErasekitError
from erasekit.methods.common import frozen
from erasekit.progress import track

EVAL_DRAWS = 4  # fixed draws (over all training images) the loss is compared on before and after
IMAGE_SEED = 10_000  # training image j uses seed IMAGE_SEED + j, apart from the evaluation seeds
CAPTIONS = ("templates", "prefix", "prompts")

# The textual-inversion templates the release trains with ("{}" is the placeholder).
IMAGENET_STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)  # fmt: skip
IMAGENET_OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TextualInversionConfig(Budget):
    """CCE's budget; ``paper`` is NYU-DICE-Lab/circumventing-concept-erasure's ``esd/train.sh`` at bb7034b7: 25
    images, 5000 steps of 4 × 4 images, AdamW (weight decay 0.01) at the scaled rate 5e-3 × 16 = 0.08, random
    flips, the released ImageNet caption templates (on MiniCanvas the world's one-concept captions instead),
    the I2P mode's prefix captions for nudity."""

    images: int = field(default=25, metadata={"help": "training images generated by the base model"})
    train_steps: int = field(
        default=5000, metadata={"help": "optimiser steps (each over batch × accumulation)"}
    )
    lr: float = field(default=5e-3, metadata={"help": "base learning rate of the embedding"})
    scale_lr: bool = field(
        default=True, metadata={"help": "multiply lr by batch × accumulation, as the release's --scale_lr"}
    )
    batch: int = field(default=4, metadata={"help": "training images per micro-batch"})
    accumulation: int = field(default=4, metadata={"help": "micro-batches averaged per optimiser step"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW (decoupled) weight decay"})
    flip: float = field(default=0.5, metadata={"help": "probability that a training image is mirrored"})
    captions: str = field(
        default="templates", metadata={"help": "templates (released), prefix (release's I2P mode) or prompts"}
    )
    init_word: str = field(default="art", metadata={"help": "one-token word the embedding starts from"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.images < 1 or self.train_steps < 1 or self.batch < 1 or self.accumulation < 1 or self.lr <= 0:
            raise ValueError("need images, train_steps, batch and accumulation >= 1 and lr > 0")
        if self.weight_decay < 0 or not 0 <= self.flip <= 1:
            raise ValueError("need weight_decay >= 0 and flip in [0, 1]")
        if self.captions not in CAPTIONS:
            raise ValueError(f"captions must be one of {', '.join(CAPTIONS)}, got {self.captions!r}")
        if not self.init_word.strip():
            raise ValueError("init_word must be a word")

    @property
    def effective_lr(self) -> float:
        """The rate AdamW runs at: ``lr × batch × accumulation`` with ``scale_lr`` (one process), else ``lr``."""
        return self.lr * self.batch * self.accumulation if self.scale_lr else self.lr


def caption_templates(ps: PromptSet) -> tuple[str, ...]:
    """The ``templates`` captions of a prompt set, ``{}`` marking the placeholder (see the module docstring)."""
    if ps.source == "minicanvas":
        from erasekit.minicanvas import world

        if ps.concept_type == "style":
            return tuple(t.format(style="{}") for t in world.STYLE_TEMPLATES)
        return tuple(t.format(object="{}") for t in world.OBJECT_TEMPLATES)
    if ps.concept_type == "style":
        return IMAGENET_STYLE_TEMPLATES
    if ps.concept_type == "object":
        return IMAGENET_OBJECT_TEMPLATES
    raise ErasekitError(
        "captions=templates has no templates for nsfw; use captions=prefix (the release's I2P mode)"
    )


def training_captions(ps: PromptSet, order: list[int], mode: str) -> list[tuple[str, ...]]:
    """Per training image, the captions one is drawn from at each use (one caption for ``prefix``/``prompts``)."""
    if mode == "templates":
        choices = tuple(t.format(PLACEHOLDER) for t in caption_templates(ps))
        return [choices for _ in order]
    if mode == "prefix":
        return [(f"{PLACEHOLDER} {ps.positives[j]}",) for j in order]
    return [(ps.placeholders[j],) for j in order]


def init_embedding(pipe: Any, word: str) -> torch.Tensor:
    """The input embedding ``[D]`` of a one-token ``word``."""
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ErasekitError(f"init_word {word!r} is {len(ids)} tokens; choose a one-token word")
    return token_table(pipe.text_encoder)[ids[0]].detach().float().clone()


class InversionObjective:
    """The textual-inversion loss of the (erased) pipeline over flip-augmented, captioned training images.

    Args:
        posterior: ``(mean, std)``, each ``[N, 2, C, h, w]`` (:func:`~erasekit.attacks._denoise.vae_posteriors`).
        captions: per image, the captions to draw from (:func:`training_captions`).
    """

    def __init__(self, pipe: Any, posterior: tuple[torch.Tensor, torch.Tensor], captions: list[tuple[str, ...]],
                 flip: float) -> None:  # fmt: skip
        self.pipe, self.captions, self.flip = pipe, captions, flip
        self.mean, self.std = posterior
        self.token = placeholder_id(pipe.tokenizer)

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, pick: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Latents ``[B, C, h, w]`` (each image mirrored with probability ``flip``, a VAE sample) and captions."""
        side = (torch.rand(len(pick), generator=g) < self.flip).long()  # [B], 1 = mirrored
        mean, std = self.mean[pick, side], self.std[pick, side]
        latents = mean + std * torch.randn(mean.shape, generator=g)
        texts = [
            c[int(torch.randint(0, len(c), (1,), generator=g))]
            for c in (self.captions[j] for j in pick.tolist())
        ]
        return latents, texts

    def loss(self, v: torch.Tensor, texts: list[str], draw: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean loss of embedding ``v`` ``[D]`` over captions ``texts`` with noise draw ``(x_t, target, t)``."""
        with placeholder_rows(self.pipe.text_encoder, self.token, v.unsqueeze(0)):
            cond = encode_prompts(self.pipe, texts)  # [B, 77, D]
        x_t, want, t = draw
        return denoise_loss(self.pipe, x_t, want, t, cond)

    def mean_loss(self, v: torch.Tensor, fixed: list[tuple[torch.Tensor, ...]]) -> float:
        """Loss on fixed draws of the unflipped posterior means, each image with its first caption."""
        texts = [c[0] for c in self.captions]
        with torch.no_grad():
            return sum(float(self.loss(v, texts, d)) for d in fixed) / len(fixed)


def epoch_order(n: int, g: torch.Generator) -> Any:
    """Image indices forever, a fresh permutation of ``range(n)`` each epoch (a shuffled data loader)."""
    while True:
        yield from torch.randperm(n, generator=g).tolist()


def accumulated_grad(
    objective: InversionObjective, v: torch.Tensor, picks: list[torch.Tensor], g: torch.Generator
) -> tuple[torch.Tensor, float]:
    """The gradient ``[D]`` of the mean of the micro-batch losses (each a mean over its images), and that mean."""
    grad, total = torch.zeros_like(v), 0.0
    for pick in picks:
        latents, texts = objective.sample(pick, g)
        loss = objective.loss(v, texts, draws(objective.pipe, latents, g)) / len(picks)
        (part,) = torch.autograd.grad(loss, v)
        grad += part
        total += float(loss.detach())
    return grad, total


def train(
    objective: InversionObjective, v0: torch.Tensor, config: TextualInversionConfig, g: torch.Generator
) -> tuple[torch.Tensor, list[float]]:
    """AdamW on the embedding from ``v0`` ``[D]``; returns it and each optimiser step's (accumulated) loss."""
    v = v0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([v], lr=config.effective_lr, weight_decay=config.weight_decay)
    order, losses = epoch_order(len(objective), g), []
    for _ in track(range(config.train_steps), desc="textual inversion", total=config.train_steps):
        picks = [torch.tensor([next(order) for _ in range(config.batch)]) for _ in range(config.accumulation)]
        v.grad, loss = accumulated_grad(objective, v, picks, g)
        opt.step()
        losses.append(loss)
    return v.detach(), losses


def textual_inversion(target: AttackTarget, config: TextualInversionConfig) -> AttackResult:
    """Textual inversion (CCE): learn a token embedding on the erased model from the base model's images."""
    return learn_embedding(target, config, on_erased=True)


def textual_inversion_transfer(target: AttackTarget, config: TextualInversionConfig) -> AttackResult:
    """Textual inversion, black-box (M-ErasureBench): learned on the base model, generated with on the erased one."""
    return learn_embedding(target, config, on_erased=False)


def learn_embedding(target: AttackTarget, config: TextualInversionConfig, *, on_erased: bool) -> AttackResult:
    """Learn v* from the base model's images on the erased model (``on_erased``) or on the base model itself;
    the candidates are the placeholder prompts with v*, generated with the erased model either way.

    The training images, and v* learned on the base model, depend on the base model alone: they are made once
    per process (:mod:`erasekit.attacks._memo`), so a bench's black-box column learns once per concept."""
    model, ps = target.model, target.prompts
    pipe = check_unet_family(model, "textual-inversion")
    memo, parts = BaseModelMemo(target), (ps, config, target.sampling)
    posterior = memo.get(
        "textual-inversion images", parts, lambda: training_posterior(pipe, ps, config, target)
    )
    v0 = init_embedding(pipe, config.init_word)  # the base model's embedding of the word

    def learned() -> tuple[torch.Tensor, list[float], dict[str, Any]]:
        return learn(pipe, ps, config, posterior, v0)

    if on_erased:
        with target.erased():
            v, losses, stats = learned()
    else:
        v, losses, stats = memo.get("textual inversion on the base model", parts, learned)
    stats = {"learned_on": "erased" if on_erased else "base", **stats}
    prompts = [f"{PLACEHOLDER} {p}" for p in ps.positives] if config.captions == "prefix" else ps.placeholders
    cands = tuple(Candidate(prompt=p, group=i, embedding=v.unsqueeze(0)) for i, p in enumerate(prompts))
    return AttackResult(candidates=cands, patch=target.patch, embeddings={"learned_embedding": v.unsqueeze(0)},
                        history={"loss": losses}, stats=stats)  # fmt: skip


def training_posterior(
    pipe: Any, ps: PromptSet, config: TextualInversionConfig, target: AttackTarget
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (:func:`vae_posteriors`) of the base model's ``images`` training images, base prompt
    ``j % n`` with seed ``IMAGE_SEED + j``; call it with nothing applied."""
    order = [j % len(ps.positives) for j in range(config.images)]
    latents = model_latents(pipe, [ps.positives[j] for j in order],
                            [IMAGE_SEED + j for j in range(config.images)], target.sampling)  # fmt: skip
    return vae_posteriors(pipe, latents)


def learn(
    pipe: Any,
    ps: PromptSet,
    config: TextualInversionConfig,
    posterior: tuple[torch.Tensor, torch.Tensor],
    v0: torch.Tensor,
) -> tuple[torch.Tensor, list[float], dict[str, Any]]:
    """v* ``[D]`` learned from ``v0`` on the pipeline as it is now, each optimiser step's loss, and the run's
    stats."""
    order = [j % len(ps.positives) for j in range(config.images)]
    captions = training_captions(ps, order, config.captions)
    g = torch.Generator().manual_seed(config.seed)
    with frozen(pipe.unet, pipe.text_encoder):
        objective = InversionObjective(pipe, posterior, captions, config.flip)
        fixed = fixed_draws(pipe, posterior[0][:, 0], EVAL_DRAWS, config.seed + 1)
        before = objective.mean_loss(v0, fixed)
        v, losses = train(objective, v0, config, g)
        after = objective.mean_loss(v, fixed)
    stats = {"loss_before": before, "loss_after": after, "init_word": config.init_word,
             "effective_lr": config.effective_lr, "norm_init": float(v0.norm()), "norm_learned": float(v.norm()),
             "cosine_to_init": float(torch.cosine_similarity(v, v0, dim=0))}  # fmt: skip
    return v, losses, stats


PAPER = {
    "style": {"init_word": "art", "captions": "templates"},
    "object": {"init_word": "object", "captions": "templates"},
    "nsfw": {"init_word": "person", "captions": "prefix"},
}
# The leaderboard's MiniCanvas budget: 8 of the 25 images, 200 of the 5000 optimiser steps (4 %).
QUICK = {kind: {**values, "images": 8, "train_steps": 200} for kind, values in PAPER.items()}

register_attack(
    "textual-inversion",
    TextualInversionConfig,
    presets={"paper": PAPER, "quick": QUICK},
    summary="Textual inversion (CCE): a token embedding learned on the erased model from base-model images",
)(textual_inversion)
register_attack(
    "textual-inversion-transfer",
    TextualInversionConfig,
    presets={"paper": PAPER, "quick": QUICK},
    summary="Textual inversion, black-box (M-ErasureBench): learned on the base model, used on the erased one",
)(textual_inversion_transfer)
