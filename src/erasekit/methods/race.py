"""R.A.C.E. (Kim, Min & Yang, ECCV 2024): ESD continued with adversarial training on the text-encoder output.

Two stages on the same trainable UNet tensors (ESD's parameter sets, :func:`erasekit.methods.esd.parameter_names`),
both run by ESD's loop (:func:`erasekit.methods.esd.diffusion_loop`), x_t sampled by partial DDIM with the model
being trained at guidance ``start_guidance``:

1. **ESD** (``esd_iterations``; the release loads a UNet already erased by the ESD script it forks, run without
   ``--adv_train``; 0 continues from the model as given, e.g. an ESD-erased folder)::

       L = ‖ε_θ(x_t, c, t) − [ε*(x_t, ∅, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))]‖²

2. **Adversarial** (``iterations``): the same loss with the trained UNet fed the attacked condition c + δ,
   plus an optional ``lasso`` × Σ_tensors mean|θ − θ₀| pull toward the weights stage 2 starts from. δ is a
   one-timestep PGD over the whole ``[1, 77, D]`` encoder output c::

       δ₀ ~ U(−ε, ε);  10 × { c′ ← c + δ;  δ ← clip_ε(δ − (ε/4) sign ∇_δ ‖ε_θ(x_t, c′, t) − x_T‖²) },
       c + δ kept inside [min c, max c]

   where x_T is the DDIM start noise of the trajectory x_t came from and ε_θ the current trained UNet.

ε* is the frozen model. Training runs on copies through ``torch.func.functional_call``; the loaded model is never
modified.

Followed: chkimmmmm/R.A.C.E. at commit 424b9c0553fc6b5f9f53e9f42bdcfa3f18e31cf3 (``train-scripts/train-esd.py``
with ``--adv_train``, its argparse defaults, ``README.md``). Differences (docs/baselines.md): the DDIM timestep
where sampling stopped instead of a random DDPM one in its bin; ESD-u's parameter set for the release's
``noxattn``; concepts cycled instead of drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from erasekit.denoising import check_unet_family, encode_prompts, predict_noise
from erasekit.methods.common import check_choice, check_positive, frozen, generator, trainable_copies
from erasekit.methods.esd import PARAMETER_SETS, detached, diffusion_loop, esd_loss, parameter_names
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


@dataclass(frozen=True, kw_only=True)
class RACEConfig:
    """R.A.C.E.'s settings; defaults are the release's argparse defaults (1000 iterations, Adam 1e-5, η 1, ε 0.1)."""

    parameters: str = field(
        default="attn2", metadata={"help": f"which UNet tensors train: {', '.join(PARAMETER_SETS)}"}
    )
    esd_iterations: int = field(
        default=1000,
        metadata={
            "help": "ESD iterations before the adversarial stage (0: continue from the model as given)"
        },
    )
    iterations: int = field(default=1000, metadata={"help": "adversarial iterations"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of both stages"})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of both stages' ESD target"})
    start_guidance: float = field(
        default=3.0, metadata={"help": "CFG scale of the partial sampling that draws x_t"}
    )
    ddim_steps: int = field(default=50, metadata={"help": "length of the DDIM schedule x_t is sampled along"})
    epsilon: float = field(default=0.1, metadata={"help": "L∞ radius of δ on the text-encoder output"})
    pgd_steps: int = field(
        default=10, metadata={"help": "PGD steps per iteration (the release hard-codes 10)"}
    )
    pgd_step_ratio: float = field(
        default=0.25, metadata={"help": "PGD step size as a fraction of epsilon (the release: ε/4)"}
    )
    lasso: float = field(
        default=0.0,
        metadata={"help": "weight of the L1 pull toward the stage-2 start (the release's --lasso: 0.1)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the noise, the stopping steps and δ's start"})

    def __post_init__(self) -> None:
        check_choice("parameters", self.parameters, PARAMETER_SETS)
        check_positive(
            iterations=self.iterations, lr=self.lr, ddim_steps=self.ddim_steps, epsilon=self.epsilon
        )
        check_positive(pgd_step_ratio=self.pgd_step_ratio)
        if min(self.esd_iterations, self.pgd_steps) < 0:
            raise ValueError("esd_iterations and pgd_steps must be >= 0")
        if min(self.negative_guidance, self.start_guidance, self.lasso) < 0:
            raise ValueError("negative_guidance, start_guidance and lasso must be >= 0")


def pgd_attack(
    unet: torch.nn.Module,
    params: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    clean: torch.Tensor,
    target: torch.Tensor,
    config: RACEConfig,
    g: torch.Generator,
) -> torch.Tensor:
    """The attacked condition c + δ that makes ε_θ(x_t, c + δ, t) match ``target`` (signed-gradient PGD).

    Args:
        params: the trained UNet's tensors (detached).
        x_t: ``[1, C, h, w]`` latents at timestep ``t``.
        clean: ``[1, 77, D]`` the concept's encoder output c.
        target: ``[1, C, h, w]`` the DDIM start noise x_T.
        g: draws the uniform random start.

    Returns:
        ``[1, 77, D]`` c + δ with ‖δ‖∞ ≤ ε, inside ``[clean.min(), clean.max()]``.
    """
    eps, lo, hi = config.epsilon, clean.min(), clean.max()
    start = (torch.rand(clean.shape, generator=g, dtype=torch.float32) * 2 - 1) * eps
    adv = (clean + start.to(clean)).clamp(lo, hi)
    for _ in range(config.pgd_steps):
        adv.requires_grad_(True)
        loss = F.mse_loss(predict_noise(unet, x_t, t, adv, params), target)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() - eps * config.pgd_step_ratio * grad.sign()
        adv = (clean + (adv - clean).clamp(-eps, eps)).clamp(lo, hi)
    return adv.detach()


def lasso_penalty(params: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over tensors of mean |θ − θ₀| (the release's ``L1Loss`` per parameter, summed)."""
    return sum(F.l1_loss(p, start[n]) for n, p in params.items())


def train(pipe: Any, concepts: list[str], config: RACEConfig, params: dict[str, torch.Tensor]) -> None:
    """Both stages on ``params`` (trainable copies), in place."""
    unet, g = pipe.unet, generator(config.seed)
    with torch.no_grad():
        conds, null = encode_prompts(pipe, concepts), encode_prompts(pipe, [""])

    def esd(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = {"c": conds[k : k + 1], "from": null, "null": null}
        return esd_loss(unet, params, x_t, t, emb, config.negative_guidance)

    if config.esd_iterations:
        diffusion_loop(
            pipe, params, conds, esd, config, "race-esd",
            iterations=config.esd_iterations, generator_=g, sample_trained=True,
        )  # fmt: skip
    start = {n: p.detach().clone() for n, p in params.items()} if config.lasso else {}

    def adversarial(k: int, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        emb = {"c": conds[k : k + 1], "from": null, "null": null}
        target = noise.to(x_t.device, x_t.dtype)
        adv = pgd_attack(unet, detached(params), x_t, t, emb["c"], target, config, g)
        loss = esd_loss(unet, params, x_t, t, emb, config.negative_guidance, cond=adv)
        return loss + config.lasso * lasso_penalty(params, start) if config.lasso else loss

    diffusion_loop(
        pipe, params, conds, adversarial, config, "race",
        generator_=g, sample_trained=True, give_noise=True,
    )  # fmt: skip


def erase_race(model: LoadedModel, concepts: list[str], config: RACEConfig) -> Patch:
    """R.A.C.E.: ESD, then ESD against a PGD-attacked text condition, on the same UNet tensors."""
    pipe = check_unet_family(model, "race")
    with frozen(pipe.unet, pipe.text_encoder):
        params = trainable_copies(pipe.unet, parameter_names(pipe.unet, config.parameters))
        train(pipe, concepts, config, params)
    return Patch.from_tensors(model, "unet", detached(params))


# The release leaves --train_method to the user; the ESD README it builds on uses ESD-x for styles and ESD-u for
# nudity and objects.
_PARAMS = {"style": {"parameters": "attn2"}, "object": {"parameters": "non-attn2"}}
_PARAMS["nsfw"] = _PARAMS["object"]
# budget: 50 + 50 of the 1000 + 1000 iterations (5%) at the same rate: about 5 min of CPU per MiniCanvas concept
# against about 95 min at `paper` (docs/baselines.md, Timings); the sweep's rates make up for the short run.
register(
    "race",
    RACEConfig,
    presets={
        "paper": _PARAMS,
        "lasso": {**_PARAMS, "lasso": 0.1},
        "budget": {**_PARAMS, "esd_iterations": 50, "iterations": 50},
    },
    strength=Strength("lr", (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), preset="budget"),
    summary="R.A.C.E.: ESD, then ESD with a PGD-attacked text-encoder output (L∞ 0.1) on the same UNet tensors",
)(erase_race)
