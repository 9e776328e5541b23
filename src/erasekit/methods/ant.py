"""ANT (Li, Lu, Ren & Kong, ACM MM 2025): saliency-masked UNet fine-tuning that steers only the later denoising.

Each iteration draws one DDIM start noise x_T and samples, with the model being trained at guidance
``start_guidance``, two latents of the same trajectory: z⁺ in the positive phase (a stop among the first
``switch_step`` of ``ddim_steps`` steps when ``positive_phase="early"``; the last ``switch_step`` when
``"late"``) and z⁻ in the rest. With ε* the frozen model, ε_θ the trained one, all ``[1, C, h, w]``::

    L1 = ‖ε_θ(z⁺, c) − [ε*(z⁺, ∅) + η (ε*(z⁺, c) − ε*(z⁺, ∅))]‖²      keep the guidance direction
    L2 = ‖ε*(z⁺, ∅) − ε_θ(z⁺, ∅)‖²                                     keep the unconditional prediction
    L3 = ‖ε_θ(z⁻, c) − [ε*(z⁻, ∅) − η (ε*(z⁻, c) − ε*(z⁻, ∅))]‖²      ESD's target: reverse it
    L4 = ‖ε*(z⁻, ∅) − ε_θ(z⁻, ∅)‖²
    L  = L3 + α₂ L4 + α₁ (L1 + α₂ L2)                                   (α₁ 1, α₂ 0.5)

Only the salient entries train: a **mask stage** runs ``mask_iterations`` unmasked Adam steps (lr ``mask_lr``)
of the same loss from the base model, once per mask prompt × seed, sums each tensor's gradients over its steps,
and keeps per tensor the ``mask_fraction`` of entries with the largest (``mask_keep="largest"``) or smallest
|Σ grad|; the runs' masks are intersected. The training stage multiplies every gradient by the mask before
each Adam step, so entries outside it never move. Training runs on copies through ``torch.func.functional_call``;
the loaded model is never modified.

Followed: lileyang1210/ANT at commit 78ce8f3e780190bdacffd8d04b9a2b01af87bef0 (``Single/train-scripts/
train_ant_single.py``, ``Single/train-scripts/generate_mask.py``, ``Single/configs/ant_{gradient,train}.yaml``;
``Multiple/train_ant.py`` for the phase direction). ``paper`` departs from the single-concept script in three
places where it contradicts the method: the mask keeps the largest |grad| (the script keeps the smallest), L2/L4
back-propagate (the script computes ε_θ(z, ∅) under ``no_grad``), and the positive phase is the first 7 steps
from the noise (the paper and ``Multiple/``; the script's CompVis ``till_T`` indexing puts it on the last 7).
The ``release`` preset runs the script as released.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from erasekit.denoising import (
    check_unet_family,
    ddim,
    encode_prompts,
    predict_noise,
    sample_path,
    start_noise,
)
from erasekit.methods.common import check_choice, check_positive, frozen, generator, trainable_copies
from erasekit.methods.esd import PARAMETER_SETS, detached, parameter_names
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

PARAMETERS = ("full", *PARAMETER_SETS)
PHASES = ("early", "late")
KEEP = ("largest", "smallest")
RELEASE_SEEDS = (24, 42, 98, 403, 3407)


@dataclass(frozen=True, kw_only=True)
class ANTConfig:
    """ANT's settings; defaults are ``Single/configs/ant_train.yaml`` and ``ant_gradient.yaml``."""

    parameters: str = field(
        default="full", metadata={"help": f"which UNet tensors train: {', '.join(PARAMETERS)}"}
    )
    iterations: int = field(default=250, metadata={"help": "masked training iterations"})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate of the masked training"})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of both phases' targets"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the partial sampling"})
    ddim_steps: int = field(default=50, metadata={"help": "length of the DDIM schedule"})
    switch_step: int = field(
        default=7, metadata={"help": "how many DDIM steps the positive phase spans (before_step)"}
    )
    positive_phase: str = field(
        default="early",
        metadata={"help": "where the positive phase is: 'early' (from the noise, the paper) or 'late'"},
    )
    alpha1: float = field(default=1.0, metadata={"help": "α₁, weight of the positive phase's terms"})
    alpha2: float = field(default=0.5, metadata={"help": "α₂, weight of the unconditional terms L2, L4"})
    preserve_grad: bool = field(
        default=True,
        metadata={"help": "L2/L4 back-propagate (False: computed without gradient, as released)"},
    )
    mask_iterations: int = field(
        default=10, metadata={"help": "gradient-stage iterations per run (0: no mask, train every entry)"}
    )
    mask_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the gradient stage"})
    mask_fraction: float = field(default=0.5, metadata={"help": "share of each tensor one run's mask keeps"})
    mask_keep: str = field(
        default="largest", metadata={"help": "keep the 'largest' |grad| (SalUn) or the 'smallest' (release)"}
    )
    mask_seeds: tuple[int, ...] = field(
        default=RELEASE_SEEDS, metadata={"help": "one gradient run per seed and mask prompt"}
    )
    mask_prompts: tuple[str, ...] = field(
        default=(), metadata={"help": "prompts of the gradient stage (empty: the concepts)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the training stage's noise and stops"})

    def __post_init__(self) -> None:
        check_choice("parameters", self.parameters, PARAMETERS)
        check_choice("positive_phase", self.positive_phase, PHASES)
        check_choice("mask_keep", self.mask_keep, KEEP)
        check_positive(iterations=self.iterations, lr=self.lr, mask_lr=self.mask_lr)
        if not 0 < self.switch_step < self.ddim_steps:
            raise ValueError(f"switch_step must be in (0, ddim_steps), got {self.switch_step}")
        if not 0 < self.mask_fraction <= 1:
            raise ValueError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}")
        if self.mask_iterations < 0 or (self.mask_iterations and not self.mask_seeds):
            raise ValueError("mask_iterations must be >= 0, and a mask needs at least one seed")
        if min(self.negative_guidance, self.start_guidance, self.alpha1, self.alpha2) < 0:
            raise ValueError("negative_guidance, start_guidance, alpha1 and alpha2 must be >= 0")


def trainable_names(unet: torch.nn.Module, parameters: str) -> list[str]:
    """Every UNet parameter (``full``, the release's ``train_method``) or one of ESD's parameter sets."""
    if parameters == "full":
        return [n for n, _ in unet.named_parameters()]
    return parameter_names(unet, parameters)


def phase_stops(config: ANTConfig, g: torch.Generator) -> tuple[int, int]:
    """``(stop⁺, stop⁻)``: DDIM steps taken before z⁺ and z⁻, each uniform in its phase."""
    s, n = config.switch_step, config.ddim_steps
    plus, minus = ((0, s), (s, n)) if config.positive_phase == "early" else ((n - s, n), (0, n - s))
    return tuple(int(torch.randint(lo, hi, (), generator=g)) for lo, hi in (plus, minus))  # type: ignore[return-value]


def phase_terms(
    unet: torch.nn.Module,
    params: dict[str, torch.Tensor],
    z: torch.Tensor,
    t: torch.Tensor,
    emb: dict[str, torch.Tensor],
    sign: float,
    config: ANTConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖ε_θ(z, c) − [ε*(∅) + sign·η (ε*(c) − ε*(∅))]‖², ‖ε*(z, ∅) − ε_θ(z, ∅)‖²)`` at one latent.

    Args:
        z: ``[1, C, h, w]`` at timestep ``t``.
        emb: ``{"c", "null"}`` each ``[1, 77, D]``.
        sign: +1 (L1, L2) or −1 (L3, L4).
    """
    both = torch.cat([emb["c"], emb["null"]])
    with torch.no_grad():
        e_c, e_0 = predict_noise(unet, z.expand(2, -1, -1, -1), t, both).chunk(2)
    target = e_0 + sign * config.negative_guidance * (e_c - e_0)
    if config.preserve_grad:
        own_c, own_0 = predict_noise(unet, z.expand(2, -1, -1, -1), t, both, params).chunk(2)
    else:
        own_c = predict_noise(unet, z, t, emb["c"], params)
        with torch.no_grad():
            own_0 = predict_noise(unet, z, t, emb["null"], params)
    return F.mse_loss(own_c, target), F.mse_loss(e_0, own_0)


def ant_loss(
    pipe: Any,
    params: dict[str, torch.Tensor],
    emb: dict[str, torch.Tensor],
    config: ANTConfig,
    g: torch.Generator,
) -> torch.Tensor:
    """L = L3 + α₂ L4 + α₁ (L1 + α₂ L2) on z⁺, z⁻ of one fresh trajectory sampled with ``params``."""
    stops = phase_stops(config, g)
    noise = start_noise(pipe, 1, g)
    z_plus, z_minus = sample_path(
        pipe, emb["c"], emb["null"], steps=config.ddim_steps, stops=stops,
        guidance=config.start_guidance, noise=noise, params=detached(params),
    )  # fmt: skip
    timesteps = ddim(pipe, config.ddim_steps).timesteps
    l1, l2 = phase_terms(pipe.unet, params, z_plus, timesteps[stops[0]], emb, 1.0, config)
    l3, l4 = phase_terms(pipe.unet, params, z_minus, timesteps[stops[1]], emb, -1.0, config)
    return l3 + config.alpha2 * l4 + config.alpha1 * (l1 + config.alpha2 * l2)


def run(
    pipe: Any,
    params: dict[str, torch.Tensor],
    conds: torch.Tensor,
    config: ANTConfig,
    *,
    iterations: int,
    lr: float,
    g: torch.Generator,
    mask: dict[str, torch.Tensor] | None = None,
    collect: bool = False,
    desc: str = "ant",
) -> dict[str, torch.Tensor]:
    """Adam on :func:`ant_loss`, gradients masked when ``mask``; with ``collect``, each tensor's summed gradients."""
    with torch.no_grad():
        null = encode_prompts(pipe, [""])
    opt = torch.optim.Adam(params.values(), lr=lr)
    total = {n: torch.zeros_like(p) for n, p in params.items()} if collect else {}
    for i in track(range(iterations), desc=desc, total=iterations):
        k = i % conds.shape[0]
        loss = ant_loss(pipe, params, {"c": conds[k : k + 1], "null": null}, config, g)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is None:  # a tensor the loss does not reach
                    continue
                if mask is not None:
                    p.grad.mul_(mask[n])
                if collect:
                    total[n] += p.grad
        opt.step()
    return total


def keep_mask(saliency: torch.Tensor, fraction: float, keep: str) -> torch.Tensor:
    """Bool mask of ``saliency``'s shape keeping ``int(fraction · n)`` entries with the largest/smallest values."""
    flat = saliency.flatten()
    k = int(flat.numel() * fraction)
    order = torch.argsort(flat, stable=True)
    chosen = order[flat.numel() - k :] if keep == "largest" else order[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[chosen] = True
    return mask.reshape(saliency.shape)


def saliency_mask(
    pipe: Any, names: Sequence[str], prompts: Sequence[str], config: ANTConfig
) -> dict[str, torch.Tensor]:
    """The intersection over mask prompts × seeds of each run's per-tensor mask of |Σ grad|."""
    mask: dict[str, torch.Tensor] = {}
    for prompt in prompts:
        with torch.no_grad():
            cond = encode_prompts(pipe, [prompt])
        for seed in config.mask_seeds:
            params = trainable_copies(pipe.unet, names)
            grads = run(
                pipe, params, cond, config, iterations=config.mask_iterations, lr=config.mask_lr,
                g=generator(seed), collect=True, desc="ant-mask",
            )  # fmt: skip
            for n, grad in grads.items():
                one = keep_mask(grad.abs(), config.mask_fraction, config.mask_keep)
                mask[n] = one if n not in mask else mask[n] & one
    return mask


def erase_ant(model: LoadedModel, concepts: list[str], config: ANTConfig) -> Patch:
    """ANT: keep the early guidance direction, reverse the later one, on the salient UNet entries only."""
    pipe = check_unet_family(model, "ant")
    with frozen(pipe.unet, pipe.text_encoder):
        names = trainable_names(pipe.unet, config.parameters)
        mask = None
        if config.mask_iterations:
            mask = saliency_mask(pipe, names, config.mask_prompts or concepts, config)
            mask = {n: m.to(pipe.unet.dtype) for n, m in mask.items()}
        params = trainable_copies(pipe.unet, names)
        with torch.no_grad():
            conds = encode_prompts(pipe, concepts)
        run(pipe, params, conds, config, iterations=config.iterations, lr=config.lr, g=generator(config.seed),
            mask=mask)  # fmt: skip
    return Patch.from_tensors(model, "unet", detached(params))


# Single/train-scripts/train_ant_single.py's __main__: for "nudity" the gradient stage runs these four prompts.
_NSFW = {"mask_prompts": ("nudity", "naked", "erotic", "sexual")}
_RELEASE = {"mask_keep": "smallest", "preserve_grad": False, "positive_phase": "late"}
# budget: 2 of the 5 mask seeds and 50 of 250 iterations (70 of 300 ANT iterations, 23%): about 3.7 min of CPU per
# MiniCanvas concept against 16 min at `paper` (docs/baselines.md, Timings).
register(
    "ant",
    ANTConfig,
    presets={
        "paper": {"nsfw": _NSFW},
        "release": {**_RELEASE, "nsfw": _NSFW},
        "budget": {"iterations": 50, "mask_seeds": RELEASE_SEEDS[:2], "nsfw": _NSFW},
    },
    strength=Strength("lr", (5e-5, 1.5e-4, 5e-4, 1.5e-3, 5e-3), preset="budget"),
    summary="ANT: saliency-masked UNet fine-tuning; early steps keep the guidance direction, later ones reverse it",
)(erase_ant)
