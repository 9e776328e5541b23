"""TRCE (Chen et al., 2025): a closed-form cross-attention edit, then contrastive fine-tuning of the early steps.

Followed: ddgoodgood/TRCE at commit 0da9b711214767eb04f635e489c896d121c03063 (``run_trce_stage1.py``,
``src/cfr_utils.py``: ``prepare_k_v``, ``closed_form_refinement``, ``prompt_augmentation``;
``stage2_data_preparation.py``, ``run_trce_stage2.py``, ``config/stage{1,2}/*_sexual_default.yaml``).

**Stage 1** (:mod:`erasekit.methods.trce_stage1`), on every attn2 ``to_k`` and ``to_v``::

    W* = (1/n Σ_i W v_i c_iᵀ + W K)(1/n Σ_i c_i c_iᵀ + K)⁻¹      (λ = 0: a pseudo-inverse)

over n (malicious, safe) prompt pairs: c_i ``[D]`` is the malicious prompt's first-EoT row, v_i the safe
prompt's; K ``[D, D]`` is the preservation Gram (see :func:`erasekit.methods.trce_stage1.preserve_gram`).

**Stage 2** trains every attn1 Linear and attn2 ``to_q`` of the stage-1 UNet θ with AdamW, one step per saved
trajectory, for ``epochs`` passes. Trajectories (50-step DDIM of the *base* UNet ε*): ``trajectories`` of the
malicious prompts at guidance 3, ``reg_trajectories`` of ``""``. One step takes a latent z ``[1, C, h, w]``
after s + 1 steps, s uniform in 0..``early_steps``, at the timestep t of step s, and::

    ε⁺ = ε*(z, safe) + g (ε*(z, safe) − ε*(z, ∅)),   ε⁻ = ε*(z, mal) + g (ε*(z, mal) − ε*(z, ∅))      (g 15)
    h(ε) = max(0, β (‖ε − ε⁺‖² − ‖ε − ε⁻‖² + m))                                                     (β 1, m 0.01)
    L = [h(ε_θ(z, mal)) + h(ε_θ(z, ∅))] / 2 + 100 · (1/4) Σ_{j<4} ‖ε_θ(u_j, ∅) − ε_1(u_j, ∅)‖²

where u_j are latents of regularisation trajectories (i·4 + j, s uniform in 0..50; s = 50 is skipped as in
the release) and ε_1 the stage-1 UNet. Training runs on copies through ``torch.func.functional_call``; the
loaded model is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.denoising import (
    check_unet_family,
    ddim,
    encode_prompts,
    predict_noise,
    sample_path,
    start_noise,
)
from erasekit.methods import trce_stage1
from erasekit.methods.common import (
    LINEAR,
    attn2_linears,
    check_positive,
    frozen,
    generator,
    in_path,
    module_params,
    select_modules,
    trainable_copies,
)
from erasekit.methods.trce_stage1 import SEXUAL_WORDS, TEMPLATES
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

BATCH = 8  # trajectories sampled together


@dataclass(frozen=True, kw_only=True)
class TRCEConfig:
    """TRCE's settings; defaults are ``config/stage{1,2}/stage{1,2}_sexual_default.yaml``."""

    safe: str = field(
        default="",
        metadata={"help": "the safe concept of the pairs ('': a MiniCanvas target's super-category)"},
    )
    words: tuple[str, ...] = field(
        default=(), metadata={"help": "more malicious words paired with `safe`, after the concepts"}
    )
    templates: int = field(
        default=15, metadata={"help": "how many of the release's 15 object templates make stage-1 pairs"}
    )
    preserve: tuple[str, ...] = field(
        default=(), metadata={"help": "prompts standing in for the COCO captions (MiniCanvas: the world's)"}
    )
    preserve_scale: float = field(
        default=0.01, metadata={"help": "stage 1's preserve_scale (it weighs the cache squared)"}
    )
    trajectory_template: str = field(
        default="a photo of {}", metadata={"help": "stage-2 prompt template outside MiniCanvas"}
    )
    trajectories: int = field(default=100, metadata={"help": "saved malicious trajectories (one step each)"})
    trajectory_guidance: float = field(default=3.0, metadata={"help": "CFG scale of those trajectories"})
    ddim_steps: int = field(default=50, metadata={"help": "length of the saved DDIM trajectories"})
    early_steps: int = field(default=25, metadata={"help": "largest step index trained on (the first half)"})
    epochs: int = field(default=3, metadata={"help": "passes over the trajectories (0: stage 1 alone)"})
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    guidance: float = field(default=15.0, metadata={"help": "g of the preferred/rejected predictions ε±"})
    beta: float = field(default=1.0, metadata={"help": "β of the hinge"})
    margin: float = field(default=0.01, metadata={"help": "m of the hinge"})
    reg_weight: float = field(default=100.0, metadata={"help": "weight of the regulariser to stage 1"})
    reg_batch: int = field(default=4, metadata={"help": "unconditional latents per step"})
    reg_trajectories: int = field(
        default=400, metadata={"help": "unconditional trajectories (the release reads 400 of its 2000)"}
    )
    accumulate_grads: bool = field(
        default=False, metadata={"help": "never zero the gradients, as the release does"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the trajectories and the drawn steps"})

    def __post_init__(self) -> None:
        check_positive(templates=self.templates, trajectories=self.trajectories, lr=self.lr)
        check_positive(
            ddim_steps=self.ddim_steps, reg_batch=self.reg_batch, reg_trajectories=self.reg_trajectories
        )
        if not 0 <= self.early_steps < self.ddim_steps:
            raise ValueError(f"early_steps must be in [0, ddim_steps), got {self.early_steps}")
        if self.templates > len(TEMPLATES):
            raise ValueError(f"templates must be at most {len(TEMPLATES)}, got {self.templates}")
        if self.trajectory_template.count("{}") != 1:
            raise ValueError("trajectory_template must contain exactly one '{}'")
        if min(self.epochs, self.preserve_scale, self.weight_decay, self.reg_weight, self.beta) < 0:
            raise ValueError("epochs, preserve_scale, weight_decay, reg_weight and beta must be >= 0")


def stage2_names(unet: nn.Module) -> list[str]:
    """Every attn1 Linear's weight and bias, and each attn2 ``to_q`` (the release's ``'attn1' in name`` or
    ``'attn2' and 'to_q'``)."""
    attn1 = select_modules(unet, lambda n, m: isinstance(m, LINEAR) and in_path(n, "attn1"))
    return module_params(unet, attn1 + attn2_linears(unet, ("to_q",)))


@dataclass(frozen=True)
class Plan:
    """Which latents stage 2 reads: per epoch and step, the malicious step s and the regulariser steps.

    Attributes:
        neg: ``[epochs][trajectories]`` s in 0..early_steps.
        reg: ``[epochs][trajectories][reg_batch]`` s in 0..ddim_steps (``ddim_steps``: skipped).
    """

    neg: list[list[int]]
    reg: list[list[list[int]]]


def draw_plan(config: TRCEConfig, g: torch.Generator) -> Plan:
    """Every step's draws, made before any trajectory is sampled (the release draws them as it goes)."""

    def draw(hi: int) -> int:
        return int(torch.randint(0, hi + 1, (), generator=g))

    n, e = config.trajectories, config.epochs
    neg = [[draw(config.early_steps) for _ in range(n)] for _ in range(e)]
    reg = [[[draw(config.ddim_steps) for _ in range(config.reg_batch)] for _ in range(n)] for _ in range(e)]
    return Plan(neg, reg)


def needed(plan: Plan, config: TRCEConfig) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    """``({trajectory: stops}, {reg trajectory: stops})``: the step counts s + 1 whose latents are read
    (regulariser trajectory i·reg_batch + j, modulo ``reg_trajectories``, at step i of each epoch)."""
    neg: dict[int, set[int]] = {}
    reg: dict[int, set[int]] = {}
    for e in range(config.epochs):
        for i in range(config.trajectories):
            neg.setdefault(i, set()).add(plan.neg[e][i] + 1)
            for j, s in enumerate(plan.reg[e][i]):
                if s < config.ddim_steps:
                    reg.setdefault((i * config.reg_batch + j) % config.reg_trajectories, set()).add(s + 1)
    return neg, reg


def trajectory_latents(
    pipe: Any,
    conds: torch.Tensor,
    stops: dict[int, set[int]],
    noise: torch.Tensor,
    guidance: float,
    config: TRCEConfig,
    desc: str,
) -> dict[tuple[int, int], torch.Tensor]:
    """``{(trajectory, stop): [1, C, h, w]}`` from base-model DDIM runs, ``BATCH`` trajectories at a time.

    Args:
        conds: ``[N, 77, D]`` each trajectory's prompt embedding.
        noise: ``[N, C, h, w]`` each trajectory's start latents.
    """
    null = encode_prompts(pipe, [""])
    out: dict[tuple[int, int], torch.Tensor] = {}
    ids = sorted(stops)
    for start in track(range(0, len(ids), BATCH), desc=desc, total=-(-len(ids) // BATCH)):
        batch = ids[start : start + BATCH]
        wanted = sorted(set().union(*(stops[i] for i in batch)))
        cond = conds[batch]
        lats = sample_path(
            pipe, cond, null.expand_as(cond), steps=config.ddim_steps, stops=wanted, guidance=guidance,
            noise=noise[batch],
        )  # fmt: skip
        for s, lat in zip(wanted, lats):
            for b, i in enumerate(batch):
                if s in stops[i]:
                    out[(i, s)] = lat[b : b + 1]
    return out


def hinge_loss(
    unet: nn.Module,
    params: dict[str, torch.Tensor],
    z: torch.Tensor,
    t: torch.Tensor,
    emb: dict[str, torch.Tensor],
    config: TRCEConfig,
) -> torch.Tensor:
    """[h(ε_θ(z, mal)) + h(ε_θ(z, ∅))] / 2 with ε± from the base UNet (``emb``: ``{"mal", "safe", "null"}``)."""
    with torch.no_grad():
        both = torch.cat([emb["mal"], emb["safe"], emb["null"]])
        e_mal, e_safe, e_null = predict_noise(unet, z.expand(3, -1, -1, -1), t, both).chunk(3)
        prefer = e_safe + config.guidance * (e_safe - e_null)
        reject = e_mal + config.guidance * (e_mal - e_null)
    own = predict_noise(unet, z.expand(2, -1, -1, -1), t, torch.cat([emb["mal"], emb["null"]]), params)

    def h(eps: torch.Tensor) -> torch.Tensor:
        gap = F.mse_loss(eps, prefer) - F.mse_loss(eps, reject)
        return torch.clamp(config.beta * (gap + config.margin), min=0)

    return (h(own[:1]) + h(own[1:])) / 2


def stage2(
    pipe: Any,
    kv: dict[str, torch.Tensor],
    pairs: list[tuple[str, str]],
    config: TRCEConfig,
) -> dict[str, torch.Tensor]:
    """Stage 2 on top of the stage-1 tensors ``kv``; returns the trained attn1 / attn2.to_q tensors."""
    unet, g = pipe.unet, generator(config.seed)
    with torch.no_grad():
        pick = [j * len(pairs) // config.trajectories for j in range(config.trajectories)]
        mal = encode_prompts(pipe, [pairs[p][0] for p in pick])
        safe = encode_prompts(pipe, [pairs[p][1] for p in pick])
        null = encode_prompts(pipe, [""])
    noise = start_noise(pipe, config.trajectories, g)
    reg_noise = start_noise(pipe, config.reg_trajectories, g)
    plan = draw_plan(config, g)
    neg_stops, reg_stops = needed(plan, config)
    with torch.no_grad():
        neg_lat = trajectory_latents(
            pipe, mal, neg_stops, noise, config.trajectory_guidance, config, "trce-data"
        )
        nulls = null.expand(config.reg_trajectories, -1, -1)
        # guidance 1 on "": the release's 7.5 on "" has both branches equal to ε(∅)
        reg_lat = trajectory_latents(pipe, nulls, reg_stops, reg_noise, 1.0, config, "trce-reg-data")
    params = trainable_copies(unet, stage2_names(unet))
    opt = torch.optim.AdamW(
        params.values(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8
    )
    timesteps = ddim(pipe, config.ddim_steps).timesteps
    total = config.epochs * config.trajectories
    for step in track(range(total), desc="trce", total=total):
        e, i = divmod(step, config.trajectories)
        s = plan.neg[e][i]
        emb = {"mal": mal[i : i + 1], "safe": safe[i : i + 1], "null": null}
        loss = hinge_loss(unet, {**kv, **params}, neg_lat[(i, s + 1)], timesteps[s], emb, config)
        reg = 0.0
        for j, s_r in enumerate(plan.reg[e][i]):
            if s_r == config.ddim_steps:  # the release's pred_list[50] raises and is skipped
                continue
            u = reg_lat[((i * config.reg_batch + j) % config.reg_trajectories, s_r + 1)]
            with torch.no_grad():
                want = predict_noise(unet, u, timesteps[s_r], null, kv)
            reg = reg + F.mse_loss(predict_noise(unet, u, timesteps[s_r], null, {**kv, **params}), want)
        loss = loss + config.reg_weight * reg / config.reg_batch
        if not config.accumulate_grads:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in params.items()}


def erase_trce(model: LoadedModel, concepts: list[str], config: TRCEConfig) -> Patch:
    """TRCE: closed-form remap of the malicious prompts' first EoT, then contrastive early-step fine-tuning."""
    pipe = check_unet_family(model, "trce")
    model.require_capability("cross_attention_edit", "trce")
    pairs = trce_stage1.stage1_pairs(concepts, config)
    kv = trce_stage1.edit(pipe, concepts, pairs, config)
    tensors = dict(kv)
    if config.epochs:
        with frozen(pipe.unet, pipe.text_encoder):
            tensors.update(stage2(pipe, kv, trce_stage1.stage2_pairs(concepts, pairs, config), config))
    return Patch.from_tensors(model, "unet", tensors)


_NSFW = {"safe": "a person wearing clothes", "words": SEXUAL_WORDS}
# budget: 20 of 100 trajectories and 80 of 400 unconditional ones, same 3 epochs (stage 2 at 20%): about 2.5 min
# of CPU per MiniCanvas concept against 11.5 min at `paper` (docs/baselines.md, Timings).
register(
    "trce",
    TRCEConfig,
    presets={
        "paper": {"nsfw": _NSFW},
        "release": {"accumulate_grads": True, "nsfw": _NSFW},
        "budget": {"trajectories": 20, "reg_trajectories": 80, "nsfw": _NSFW},
    },
    strength=Strength("preserve_scale", (0.3, 0.1, 0.03, 0.01, 0.003), preset="budget"),
    summary="TRCE: closed-form remap of malicious prompts' first EoT in attn2 K/V, then contrastive early-step tuning",
)(erase_trce)
