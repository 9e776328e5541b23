"""AdvUnlearn (Zhang et al., NeurIPS 2024): adversarial training of the text encoder, with a retain set.

Objective: min_θ E[ℓ_ESD(θ; c ⊕ δ*)] + γ ℓ_retain, trained on the text encoder θ with the UNet frozen.

- x_t is drawn by partial DDIM from the frozen model (:func:`erasekit.denoising.sample_until`).
- δ* is ``attack_tokens`` prefix-token input embeddings, found by ``attack_steps`` of signed-gradient PGD
  (step ``attack_lr``) that make the current model's ε(x_t, c ⊕ δ) match the frozen model's ε*(x_t, c).
  It is inserted through a removable hook on the token embedding (:func:`erasekit.denoising.prefix_embeddings`).
- ℓ_ESD = ‖ε(x_t, E_θ(c ⊕ δ*)) − [ε*(x_t, c) − η (ε*(x_t, c) − ε*(x_t, ∅))]‖².
- ℓ_retain = ‖ε(x_t, E_θ(r)) − ε(x_t, E*(r))‖² over ``retain_batch`` prompts "a photo of {object}" per step.

``trainable``: ``full`` (every text-encoder tensor, the authors' default), ``all-blocks`` (every transformer
block) or ``block-0``. The encoder is trained in place and restored exactly before returning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.denoising import (
    check_unet_family,
    encode_prompts,
    predict_noise,
    prefix_embeddings,
    sample_until,
    with_prefix,
)
from erasekit.methods.common import (
    block_params,
    check_choice,
    check_positive,
    frozen,
    generator,
    trained_in_place,
)
from erasekit.models.families import num_blocks
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import register

TRAINABLE = ("full", "all-blocks", "block-0")
RETAIN_OBJECTS = (
    "dog", "cat", "car", "bicycle", "chair", "cup", "tree", "house", "bird", "horse",
    "boat", "airplane", "clock", "umbrella", "banana", "laptop", "train", "flower", "book", "bottle",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AdvUnlearnConfig:
    """AdvUnlearn's settings; defaults are the authors' (1000 iterations, lr 1e-5, γ = 0.3, PGD 30 × 1e-3)."""

    trainable: str = field(
        default="full", metadata={"help": f"text-encoder tensors to train: {', '.join(TRAINABLE)}"}
    )
    iterations: int = field(default=1000, metadata={"help": "training iterations"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate"})
    retain_weight: float = field(default=0.3, metadata={"help": "γ, weight of the retain loss"})
    retain: tuple[str, ...] = field(
        default=RETAIN_OBJECTS, metadata={"help": "objects of the retain prompts"}
    )
    retain_template: str = field(default="a photo of {}", metadata={"help": "retain prompt template"})
    retain_batch: int = field(default=5, metadata={"help": "retain prompts per iteration"})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of the ESD target"})
    attack_tokens: int = field(default=1, metadata={"help": "length k of the adversarial prefix"})
    attack_steps: int = field(default=30, metadata={"help": "PGD steps per iteration"})
    attack_lr: float = field(default=1e-3, metadata={"help": "PGD step size (signed gradient)"})
    ddim_steps: int = field(default=50, metadata={"help": "length of the DDIM schedule x_t is sampled along"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the frozen partial sampling"})
    seed: int = field(
        default=0, metadata={"help": "seed of noise, stopping steps, retain picks and δ's init"}
    )

    def __post_init__(self) -> None:
        check_choice("trainable", self.trainable, TRAINABLE)
        check_positive(
            iterations=self.iterations, lr=self.lr, ddim_steps=self.ddim_steps, attack_lr=self.attack_lr
        )
        check_positive(attack_tokens=self.attack_tokens, retain_batch=self.retain_batch)
        if self.retain_weight < 0 or self.attack_steps < 0 or self.negative_guidance < 0:
            raise ValueError("retain_weight, attack_steps and negative_guidance must be >= 0")
        if self.retain_weight > 0 and not self.retain:
            raise ValueError("a positive retain_weight needs retain objects")
        if self.retain_template.count("{}") != 1:
            raise ValueError("retain_template must contain exactly one '{}'")


def trainable_names(encoder: torch.nn.Module, trainable: str) -> list[str]:
    """The text-encoder parameter names of one of :data:`TRAINABLE`."""
    if trainable == "full":
        return [n for n, _ in encoder.named_parameters()]
    blocks = range(num_blocks(encoder)) if trainable == "all-blocks" else [0]
    return block_params(encoder, list(blocks))


def attack(
    pipe: Any,
    prompt: str,
    delta: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    want: torch.Tensor,
    config: AdvUnlearnConfig,
) -> torch.Tensor:
    """PGD on the prefix ``delta`` ``[k, D]``: minimise ‖ε(x_t, E_θ(δ ⊕ c)) − ε*(x_t, c)‖²; returns the new δ."""
    delta = delta.detach().clone()
    for _ in range(config.attack_steps):
        delta.requires_grad_(True)
        with prefix_embeddings(pipe.text_encoder, delta):
            emb = encode_prompts(pipe, [with_prefix(prompt, config.attack_tokens)])
        loss = F.mse_loss(predict_noise(pipe.unet, x_t, t, emb), want)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta - config.attack_lr * grad.sign()).detach()
    return delta


def train(
    pipe: Any, concepts: list[str], config: AdvUnlearnConfig, params: dict[str, torch.Tensor]
) -> list[float]:
    """Adversarial unlearning of the (live, trainable) text-encoder ``params``; returns each iteration's loss."""
    g, unet, enc = generator(config.seed), pipe.unet, pipe.text_encoder
    retain = [config.retain_template.format(o) for o in config.retain]
    with torch.no_grad():  # the frozen encoder's embeddings, before any step
        conds, null = encode_prompts(pipe, concepts), encode_prompts(pipe, [""])
        retain_emb = encode_prompts(pipe, retain) if retain else None
    table = enc.get_input_embeddings().weight
    delta = table[torch.randint(0, table.shape[0] - 2, (config.attack_tokens,), generator=g)].detach().clone()
    opt, losses = torch.optim.Adam(params.values(), lr=config.lr), []
    for i in track(range(config.iterations), desc="advunlearn", total=config.iterations):
        k = i % len(concepts)
        c = conds[k : k + 1]
        stop = int(torch.randint(0, config.ddim_steps, (), generator=g))
        x_t, t = sample_until(
            pipe, c, null, steps=config.ddim_steps, stop=stop, guidance=config.start_guidance, generator=g
        )
        with torch.no_grad():
            e_c, e_0 = predict_noise(unet, x_t.expand(2, -1, -1, -1), t, torch.cat([c, null])).chunk(2)
        delta = attack(pipe, concepts[k], delta, x_t, t, e_c, config)
        with prefix_embeddings(enc, delta):
            emb = encode_prompts(pipe, [with_prefix(concepts[k], config.attack_tokens)])
        loss = F.mse_loss(predict_noise(unet, x_t, t, emb), e_c - config.negative_guidance * (e_c - e_0))
        if retain_emb is not None and config.retain_weight > 0:
            loss = loss + config.retain_weight * retain_loss(pipe, retain, retain_emb, x_t, t, config, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def retain_loss(
    pipe: Any,
    prompts: list[str],
    frozen_emb: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    config: AdvUnlearnConfig,
    g: torch.Generator,
) -> torch.Tensor:
    """‖ε(x_t, E_θ(r)) − ε(x_t, E*(r))‖² over ``retain_batch`` prompts drawn with ``g`` (``frozen_emb`` ``[R, 77, D]``)."""
    pick = torch.randperm(len(prompts), generator=g)[: config.retain_batch]
    emb = encode_prompts(pipe, [prompts[j] for j in pick])
    x = x_t.expand(len(pick), -1, -1, -1)
    with torch.no_grad():
        want = predict_noise(pipe.unet, x, t, frozen_emb[pick])
    return F.mse_loss(predict_noise(pipe.unet, x, t, emb), want)


def erase_advunlearn(model: Any, concepts: list[str], config: AdvUnlearnConfig) -> Patch:
    """AdvUnlearn: adversarially robust ESD unlearning in the text encoder, with a retain loss."""
    pipe = check_unet_family(model, "advunlearn")
    names = trainable_names(pipe.text_encoder, config.trainable)
    with frozen(pipe.unet), trained_in_place(pipe.text_encoder, names) as params:
        train(pipe, concepts, config, params)
        new = {n: p.detach().clone() for n, p in params.items()}
    return Patch.from_tensors(model, "text_encoder", new)


register(
    "advunlearn",
    AdvUnlearnConfig,
    presets={
        "paper": {"trainable": "full"},
        "all-blocks": {"trainable": "all-blocks"},
        "block0": {"trainable": "block-0"},
    },
    summary="AdvUnlearn: adversarial (PGD prefix) ESD training of the text encoder with a retain loss",
)(erase_advunlearn)
