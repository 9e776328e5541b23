"""DoCo: Concept Domain Correction (Wu et al., AAAI 2025): make the target's outputs indistinguishable from an anchor's.

Training data are N base-model images of the *anchor* concept (latents x0 ``[N, C, h, w]``), each with its anchor
caption p_a and the target caption p_c (the same caption naming the concept instead of the anchor). Per step, B
images for the adversarial term and B others for the prior term are forward-diffused at random DDPM timesteps
(x_t = √ᾱ x0 + √(1−ᾱ) ε, ``[2B, C, h, w]``), and with ε_θ the trained UNet, ε* the frozen one::

    x̂_fake = x0̂(ε_θ(x_t, p_c), x_t, t)   (trained model on the target caption)         [B, C, h, w]
    x̂_real = x0̂(ε*(x_t, p_a), x_t, t)    (frozen model on the anchor caption, same x_t) [B, C, h, w]
    x0̂(ε, x_t, t) = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
    L_D     = BCE(D(x̂_real), 0) + BCE(D(x̂_fake), 1)          discriminator, every step (Adam, betas 0.5/0.999)
    L_adv   = BCE(D(x̂_fake), 0)                              the UNet fools D: the target's domain → the anchor's
    L_prior = ‖ε_θ(x_t', p_a') − ε‖²                          prior preservation on the other B anchor images

D (:class:`PatchDiscriminator`) is the release's PatchGAN with its downsampling fitted to the latent side. The
UNet (attn2 to_k/to_v, AdamW at 6e-6 × B) trains only after ``warmup`` discriminator-only steps. Its update is
*concept-preserving gradient surgery*: each gradient is clipped to total norm 1, then per tensor, with
ĝ = g / ‖g‖, when cos(g_adv, g_prior) < 0 the conflicting part is taken out of g_adv and the result alone is the
update (``surgery``):

- ``release``:    g_adv − λ cos(g_adv, g_prior) ĝ_prior  (the released ``adjust_gradient``; λ 1);
- ``projection``: g_adv − λ (g_adv · ĝ_prior) ĝ_prior  (the textbook projection onto the normal plane);
- ``none``:       the gradient of L_adv + 0.1 L_prior (the release without ``--gradient_clip``).

``paper`` follows yongliang-wu/DoCo at commit ebf6ff400412c1a7eee1a252ba1b2cd6da3fd696 (``train.py``,
``DoCo/gan.py``, ``DoCo/gradient_clip.py``, ``DoCo/utils.py``, the README's commands): batch 8, lr 6e-6 scaled by
the batch (``--scale_lr``, one process), 2000 steps with 1000 warm-up, discriminator lr 5e-4 for styles and 1e-4
for objects and nudity, prior preservation, surgery λ 1, horizontal flips, 1000 anchor images made by the base
model with DPM-Solver (25 steps, guidance 6). As released, the discriminator's step also takes the gradient of the
UNet's L_adv through D (the script never zeroes D's gradients between the two backward passes; the fake term
then pushes D's logits toward 0 instead of 1): ``disc_generator_grad``.
MiniCanvas substitutes: the anchor is the concept's super-category (``fish`` → ``animal``; the README uses
``painting`` for styles, ``airplane`` for an instance, ``clothed`` for nudity), the captions are the world's
templates with the anchor in the concept's slot (the release: LAION captions retrieved for the anchor, or
ChatGPT's), and D fits 8×8 latents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.denoising import check_unet_family, encode_prompts, noised, predict_noise
from erasekit.errors import ErasekitError
from erasekit.methods.common import check_choice, check_positive, frozen, generator, trainable_copies
from erasekit.methods.esd import PARAMETER_SETS, detached, parameter_names
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

SURGERY = ("release", "projection", "none")
KINDS = ("style", "object", "nsfw")


@dataclass(frozen=True, kw_only=True)
class DoCoConfig:
    """DoCo's settings; defaults are the README's commands of yongliang-wu/DoCo (see the module docstring)."""

    concept_type: str = field(
        default="object",
        metadata={"help": "style, object or nsfw: which slot of the captions the concept fills"},
    )
    anchor: str = field(default="", metadata={"help": "anchor concept ('' = the MiniCanvas super-category)"})
    parameters: str = field(
        default="attn2-kv", metadata={"help": f"which UNet tensors train: {', '.join(PARAMETER_SETS)}"}
    )
    iterations: int = field(default=2000, metadata={"help": "training steps (max_train_steps)"})
    warmup: int = field(
        default=1000,
        metadata={"help": "steps 0..warmup train the discriminator alone (global_step > warm_up)"},
    )
    batch_size: int = field(default=8, metadata={"help": "B: images per term and step"})
    lr: float = field(default=6e-6, metadata={"help": "UNet learning rate before scaling"})
    scale_lr: bool = field(default=True, metadata={"help": "multiply lr by batch_size (--scale_lr)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay of the UNet tensors"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "each UNet gradient is clipped to this total norm (0: off)"}
    )
    disc_lr: float = field(default=1e-4, metadata={"help": "discriminator Adam learning rate (--dlr)"})
    prior: bool = field(default=True, metadata={"help": "prior preservation on anchor images"})
    surgery: str = field(default="release", metadata={"help": f"gradient surgery rule: {', '.join(SURGERY)}"})
    surgery_lambda: float = field(default=1.0, metadata={"help": "λ of the surgery (--lambda_)"})
    prior_weight: float = field(
        default=0.1, metadata={"help": "weight of L_prior when surgery=none (prior_loss_weight × 0.1)"}
    )
    disc_generator_grad: bool = field(
        default=True, metadata={"help": "D's step also takes L_adv's gradient, as released"}
    )
    anchor_images: int = field(default=1000, metadata={"help": "N: base-model images per anchor"})
    anchor_steps: int = field(default=25, metadata={"help": "sampling steps of the anchor images"})
    anchor_guidance: float = field(default=6.0, metadata={"help": "CFG scale of the anchor images"})
    anchor_scheduler: str = field(
        default="DPMSolverMultistepScheduler", metadata={"help": "diffusers scheduler of the anchor images"}
    )
    hflip: bool = field(default=True, metadata={"help": "flip each latent left-right with probability 1/2"})
    seed: int = field(default=0, metadata={"help": "seed of the images, batches, noise, timesteps and D"})

    def __post_init__(self) -> None:
        check_choice("concept_type", self.concept_type, KINDS)
        check_choice("parameters", self.parameters, PARAMETER_SETS)
        check_choice("surgery", self.surgery, SURGERY)
        check_positive(iterations=self.iterations, batch_size=self.batch_size, lr=self.lr, disc_lr=self.disc_lr,
                       anchor_images=self.anchor_images, anchor_steps=self.anchor_steps)  # fmt: skip
        if not 0 <= self.warmup < self.iterations - 1:
            raise ValueError(f"warmup must be in [0, iterations - 1) so the UNet trains, got {self.warmup}")
        if self.surgery != "none" and not self.prior:
            raise ValueError("gradient surgery needs the prior term (prior=True) or surgery=none")
        if min(self.weight_decay, self.max_grad_norm, self.surgery_lambda, self.prior_weight) < 0:
            raise ValueError("weight_decay, max_grad_norm, surgery_lambda and prior_weight must be >= 0")
        if self.anchor_guidance < 0:
            raise ValueError("anchor_guidance must be >= 0")


class PatchDiscriminator(nn.Module):
    """The release's PatchGAN (``DoCo/gan.py``) with as many blocks as fit the latent.

    Blocks of widths 64, 128, 256, 512 (4×4 stride-2 convs, LeakyReLU 0.2, BatchNorm on all but the first), as many
    as halve the side down to 4 (four for SD's 64×64 latents, as released), then a 4×4 conv to one logit per patch
    (3×3 patches). An 8×8 latent gets one halving block and a second, 3×3 stride-1 block, so D keeps a hidden
    normalised layer: 2 blocks, 80k weights, against the release's 2.8M on SD.

    Args:
        channels: latent channels C.
        side: latent side h (= w).
    """

    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        downs = min(4, max(1, int(math.log2(max(side, 8) // 4))))
        widths = (64, 128, 256, 512)[: max(2, downs)]
        layers: list[nn.Module] = []
        for k, (cin, cout) in enumerate(zip((channels, *widths), widths)):
            conv = (
                nn.Conv2d(cin, cout, 4, stride=2, padding=1)
                if k < downs
                else nn.Conv2d(cin, cout, 3, padding=1)
            )
            layers += [conv, *([nn.BatchNorm2d(cout)] if k else []), nn.LeakyReLU(0.2)]
        self.model = nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 4, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> patch logits ``[B, 1, p, p]``."""
        return self.model(x)


def discriminator(channels: int, side: int, g: torch.Generator, device: torch.device) -> PatchDiscriminator:
    """A :class:`PatchDiscriminator` with torch's default init (uniform ±1/√fan_in) drawn from ``g``."""
    with torch.device("meta"):
        d = PatchDiscriminator(channels, side)
    d = d.to_empty(device="cpu")
    with torch.no_grad():
        for m in d.modules():
            if isinstance(m, nn.Conv2d):
                bound = 1.0 / math.sqrt(m.in_channels * m.kernel_size[0] * m.kernel_size[1])
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
    return d.to(device).train()


def caption_pairs(concept: str, anchor: str, kind: str) -> list[tuple[str, str]]:
    """``(anchor caption, target caption)`` pairs: the world's templates with the anchor, then the concept, in one slot.

    Objects (and nudity) fill the object slot of every two-concept template over the world's styles and of the
    object templates; styles the style slot, over the world's objects.
    """
    from erasekit.minicanvas import world

    if kind == "style":
        full = [(t, {"object": o}) for t in world.FULL_TEMPLATES for o in world.OBJECT_NAMES]
        rows, slot = full + [(t, {}) for t in world.STYLE_TEMPLATES], "style"
    else:
        full = [(t, {"style": s}) for t in world.FULL_TEMPLATES for s in world.STYLE_NAMES]
        rows, slot = full + [(t, {}) for t in world.OBJECT_TEMPLATES], "object"
    return [(t.format(**{slot: anchor}, **rest), t.format(**{slot: concept}, **rest)) for t, rest in rows]


def anchor_of(concept: str, config: DoCoConfig) -> str:
    """The config's anchor, or the concept's MiniCanvas super-category."""
    from erasekit.concepts import is_minicanvas
    from erasekit.minicanvas.world import concept_info

    if config.anchor:
        return config.anchor
    if not is_minicanvas(concept):
        raise ErasekitError(f"doco needs anchor=... for {concept!r} (not a MiniCanvas concept)")
    return concept_info(concept).category


def anchor_latents(
    pipe: Any, captions: Sequence[str], config: DoCoConfig, g: torch.Generator
) -> torch.Tensor:
    """``[N, C, h, w]``: N base-model images (latents) of the anchor captions, image i from caption i mod P."""
    from erasekit.generation import Request, Sampling, render

    sampling = Sampling(
        steps=config.anchor_steps, guidance=config.anchor_guidance, scheduler=config.anchor_scheduler
    )
    base = int(torch.randint(2**31 - config.anchor_images, (), generator=g))
    requests = [
        Request(seed=base + i, prompt=captions[i % len(captions)]) for i in range(config.anchor_images)
    ]
    return torch.stack(render(pipe, requests, sampling, batch_size=64, output="latent", desc="doco-anchors"))


def predicted_x0(scheduler: Any, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 from the UNet's output at per-image timesteps (DDPM's ``pred_original_sample``). Shapes ``[B, C, h, w]``,
    ``t`` ``[B]``."""
    a = scheduler.alphas_cumprod.to(x_t.device, x_t.dtype)[t].view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * eps
    else:
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0


def clipped(grads: Sequence[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """``grads`` scaled to total norm at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s rule; 0: as they are)."""
    if not max_norm:
        return list(grads)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * torch.clamp(max_norm / (total + 1e-6), max=1.0) for g in grads]


def surgery(g_adv: torch.Tensor, g_prior: torch.Tensor, rule: str, lam: float) -> torch.Tensor:
    """One tensor's update: ``g_adv`` less its conflict with ``g_prior`` when their cosine is negative."""
    unit = g_prior / (torch.linalg.vector_norm(g_prior) + 1e-8)
    cos = torch.dot((g_adv / (torch.linalg.vector_norm(g_adv) + 1e-8)).flatten(), unit.flatten())
    if rule == "none" or cos >= 0:
        return g_adv
    along = cos if rule == "release" else torch.dot(g_adv.flatten(), unit.flatten())
    return g_adv - lam * along * unit


@dataclass(frozen=True)
class AnchorSet:
    """The training images of every concept's anchor.

    Attributes:
        latents: ``[M, C, h, w]`` anchor-image latents (N per concept).
        rows: ``[M]`` each image's caption row in ``anchor`` and ``target``.
        anchor: ``[R, 77, D]`` the anchor captions' conditioning.
        target: ``[R, 77, D]`` the same captions naming the concept.
    """

    latents: torch.Tensor
    rows: torch.Tensor
    anchor: torch.Tensor
    target: torch.Tensor


def anchor_set(pipe: Any, concepts: Sequence[str], config: DoCoConfig, g: torch.Generator) -> AnchorSet:
    """Make each concept's N anchor images and encode the caption pairs."""
    latents, rows, anchors, targets = [], [], [], []
    for concept in concepts:
        pairs = caption_pairs(concept, anchor_of(concept, config), config.concept_type)
        captions = [a for a, _ in pairs]
        latents.append(anchor_latents(pipe, captions, config, g))
        rows.append(len(anchors) + torch.arange(config.anchor_images) % len(pairs))
        anchors += captions
        targets += [c for _, c in pairs]
    with torch.no_grad():
        anchor, target = encode_prompts(pipe, anchors), encode_prompts(pipe, targets)
    x0 = torch.cat(latents).to(pipe.unet.device, pipe.unet.dtype)
    return AnchorSet(latents=x0, rows=torch.cat(rows), anchor=anchor, target=target)


def draw(
    data: AnchorSet, config: DoCoConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch: x0 ``[2B, C, h, w]`` (adversarial images, then prior images; ``[B, ...]`` without the prior), the
    trained UNet's conditioning ``[2B, 77, D]`` (target captions, then anchor captions) and the frozen UNet's
    ``[B, 77, D]`` (the adversarial images' anchor captions)."""
    picks = torch.randint(data.latents.shape[0], (2 if config.prior else 1, config.batch_size), generator=g)
    idx = picks.flatten()
    x0 = data.latents[idx]
    if config.hflip:
        flip = (torch.rand(len(idx), generator=g) < 0.5).to(x0.device).view(-1, 1, 1, 1)
        x0 = torch.where(flip, x0.flip(-1), x0)
    inst = data.rows[picks[0]]
    conds = torch.cat([data.target[inst], *([data.anchor[data.rows[picks[1]]]] if config.prior else [])])
    return x0, conds, data.anchor[inst]


def generator_step(
    d: nn.Module,
    opt: torch.optim.Optimizer,
    params: dict[str, torch.Tensor],
    fake: torch.Tensor,
    prior_pred: torch.Tensor,
    prior_noise: torch.Tensor,
    config: DoCoConfig,
) -> None:
    """One UNet update from L_adv on ``fake`` ``[B, C, h, w]`` and L_prior (``prior_pred`` vs ``prior_noise``)."""
    plist = list(params.values())
    logits = d(fake)
    adv = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
    prior = F.mse_loss(prior_pred, prior_noise) if config.prior else None
    g_prior = None
    if config.surgery == "none":
        adv = adv if prior is None else adv + config.prior_weight * prior
    else:
        g_prior = clipped(torch.autograd.grad(prior, plist, retain_graph=True, allow_unused=True, materialize_grads=True),
                          config.max_grad_norm)  # fmt: skip
    adv.backward()  # D's parameters take this gradient too (disc_generator_grad)
    if not config.disc_generator_grad:
        d.zero_grad(set_to_none=True)
    g_adv = clipped([torch.zeros_like(p) if p.grad is None else p.grad for p in plist], config.max_grad_norm)
    for k, p in enumerate(plist):
        p.grad = (
            g_adv[k]
            if g_prior is None
            else surgery(g_adv[k], g_prior[k], config.surgery, config.surgery_lambda)
        )
    opt.step()
    opt.zero_grad(set_to_none=True)


def discriminator_step(
    d: nn.Module, opt: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor
) -> float:
    """One Adam step of L_D = BCE(D(real), 0) + BCE(D(fake), 1) on detached ``[B, C, h, w]`` x0 predictions."""
    r, f = d(real), d(fake)
    loss = F.binary_cross_entropy_with_logits(r, torch.zeros_like(r)) + F.binary_cross_entropy_with_logits(
        f, torch.ones_like(f)
    )
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train(
    pipe: Any, params: dict[str, torch.Tensor], data: AnchorSet, config: DoCoConfig, g: torch.Generator
) -> None:
    """Train ``params`` (trainable copies of UNet tensors) in place with D alongside; see the module docstring."""
    from diffusers import DDPMScheduler

    unet, b = pipe.unet, config.batch_size
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    _, channels, side, _ = data.latents.shape
    d = discriminator(channels, side, g, unet.device)
    d_opt = torch.optim.Adam(d.parameters(), lr=config.disc_lr, betas=(0.5, 0.999))
    lr = config.lr * (b if config.scale_lr else 1)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=config.weight_decay)
    for i in track(range(config.iterations), desc="doco", total=config.iterations):
        x0, conds, anchor_conds = draw(data, config, g)
        x_t, noise, t = noised(pipe, x0, g)
        train_unet = i > config.warmup
        n = x_t.shape[0] if train_unet else b  # the prior half is only needed for an update
        with torch.set_grad_enabled(train_unet):
            pred = predict_noise(unet, x_t[:n], t[:n], conds[:n], params)
        with torch.no_grad():
            real = predicted_x0(scheduler, predict_noise(unet, x_t[:b], t[:b], anchor_conds), x_t[:b], t[:b])
        fake = predicted_x0(scheduler, pred[:b], x_t[:b], t[:b])
        if train_unet:
            generator_step(d, opt, params, fake, pred[b:], noise[b:n], config)
        discriminator_step(d, d_opt, real, fake.detach())


def erase_doco(model: LoadedModel, concepts: list[str], config: DoCoConfig) -> Patch:
    """DoCo: align the target's x0 predictions with the anchor's through a discriminator, with gradient surgery."""
    pipe = check_unet_family(model, "doco")
    g = generator(config.seed)
    with frozen(pipe.unet, pipe.text_encoder):
        data = anchor_set(pipe, concepts, config, g)
        params = trainable_copies(pipe.unet, parameter_names(pipe.unet, config.parameters))
        train(pipe, params, data, config, g)
    return Patch.from_tensors(model, "unet", detached(params))


_PAPER = {
    "style": {"disc_lr": 5e-4},
    "object": {"disc_lr": 1e-4},
    "nsfw": {"disc_lr": 1e-4, "anchor": "clothed"},
}
# budget: see docs/baselines.md (Timings).
_BUDGET = {"iterations": 400, "warmup": 200, "anchor_images": 200}

register(
    "doco",
    DoCoConfig,
    presets={
        "paper": _PAPER,
        "projection": {**_PAPER, "surgery": "projection"},
        "budget": {k: {**v, **_BUDGET} for k, v in _PAPER.items()},
    },
    strength=Strength("lr", (1.5e-6, 3e-6, 6e-6, 1.2e-5, 2.4e-5), preset="budget"),
    summary="DoCo: a discriminator aligns the concept's x0 predictions with an anchor's; concept-preserving surgery",
)(erase_doco)
