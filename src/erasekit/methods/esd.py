"""ESD: Erased Stable Diffusion (Gandikota et al., ICCV 2023), fine-tuning the UNet with negative guidance.

Each iteration draws x_t by partial DDIM from the frozen model (:func:`erasekit.denoising.sample_until`) and
regresses the trainable UNet's ε(x_t, c, t) onto ``ε*(x_t, c_from, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))``,
where ε* is the frozen model. Training runs on copies of the selected parameters through
``torch.func.functional_call``; the loaded model is never modified. The loop (:func:`diffusion_loop`) is
shared with the methods that train on the same partial trajectories with another loss (All but One, CRCE).

Parameter sets (by module path component and type, see :mod:`erasekit.methods.common`):

- ``attn2`` (esd-x): every ``nn.Linear`` under a module path component ``attn2`` (to_q, to_k, to_v, to_out.0);
- ``attn2-kv`` (esd-x ``strict`` preset): only the ``to_k`` and ``to_v`` Linears of ``attn2``;
- ``non-attn2`` (esd-u): every ``nn.Linear`` and ``nn.Conv2d`` outside ``attn2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.denoising import check_unet_family, encode_prompts, predict_noise, sample_until
from erasekit.methods.common import (
    attn2_linears,
    check_choice,
    check_positive,
    frozen,
    generator,
    module_params,
    non_attn2_layers,
    trainable_copies,
)
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import register

PARAMETER_SETS = ("attn2", "attn2-kv", "non-attn2")


@dataclass(frozen=True, kw_only=True)
class ESDConfig:
    """ESD's settings; defaults follow the authors' newer code (200 iterations, Adam 5e-5, η = 2)."""

    parameters: str = field(
        default="attn2", metadata={"help": f"which UNet tensors train: {', '.join(PARAMETER_SETS)}"}
    )
    iterations: int = field(default=200, metadata={"help": "gradient steps (one concept, one x_t each)"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate"})
    negative_guidance: float = field(
        default=2.0, metadata={"help": "η, the strength of the negative guidance"}
    )
    ddim_steps: int = field(default=50, metadata={"help": "length of the DDIM schedule x_t is sampled along"})
    start_guidance: float = field(
        default=3.0, metadata={"help": "CFG scale of the frozen model's partial sampling"}
    )
    erase_from: str = field(
        default="", metadata={"help": "c_from: the concept the target is taken from ('' = itself)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the noise and the stopping steps"})

    def __post_init__(self) -> None:
        check_choice("parameters", self.parameters, PARAMETER_SETS)
        check_positive(iterations=self.iterations, lr=self.lr, ddim_steps=self.ddim_steps)
        if self.negative_guidance < 0 or self.start_guidance < 0:
            raise ValueError("negative_guidance and start_guidance must be >= 0")


def parameter_names(unet: torch.nn.Module, parameters: str) -> list[str]:
    """Qualified UNet parameter names of one of :data:`PARAMETER_SETS`."""
    if parameters == "attn2":
        modules = attn2_linears(unet)
    elif parameters == "attn2-kv":
        modules = attn2_linears(unet, ("to_k", "to_v"))
    else:
        modules = non_attn2_layers(unet)
    return module_params(unet, modules)


def esd_loss(
    unet: torch.nn.Module,
    params: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    emb: dict[str, torch.Tensor],
    eta: float,
) -> torch.Tensor:
    """‖ε_θ(x_t, c, t) − [ε*(x_t, c_from, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))]‖² (mean over elements).

    Args:
        params: the trainable copies (``{name: tensor}``) standing in for the UNet's own.
        x_t: ``[1, C, h, w]`` latents.
        emb: ``{"c", "from", "null"}`` each ``[1, 77, D]``.
    """
    with torch.no_grad():
        cond = torch.cat([emb["from"], emb["c"], emb["null"]])
        e_from, e_c, e_null = predict_noise(unet, x_t.expand(3, -1, -1, -1), t, cond).chunk(3)
        target = e_from - eta * (e_c - e_null)
    return F.mse_loss(predict_noise(unet, x_t, t, emb["c"], params), target)


def diffusion_loop(
    pipe: Any,
    params: dict[str, torch.Tensor],
    conds: torch.Tensor,
    loss_fn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    config: Any,
    desc: str,
) -> list[float]:
    """ESD's training loop, shared by the methods trained on the frozen model's partial DDIM trajectories.

    Iteration ``i`` takes ``k = i % K``, draws a stopping step uniformly from ``[0, ddim_steps)``, samples
    x_t from the frozen model conditioned on ``conds[k]`` (guidance ``start_guidance``), and takes one Adam
    step on ``loss_fn(k, x_t, t)``.

    Args:
        params: the trainable copies, trained in place.
        conds: ``[K, 77, D]`` the conditionings x_t is sampled with.
        loss_fn: ``(k, x_t [1, C, h, w], t) -> scalar loss``.
        config: has ``iterations``, ``lr``, ``ddim_steps``, ``start_guidance`` and ``seed``.

    Returns:
        The loss of every iteration.
    """
    g = generator(config.seed)
    with torch.no_grad():
        null = encode_prompts(pipe, [""])
    opt = torch.optim.Adam(params.values(), lr=config.lr)
    losses = []
    for i in track(range(config.iterations), desc=desc, total=config.iterations):
        k = i % conds.shape[0]
        stop = int(torch.randint(0, config.ddim_steps, (), generator=g))
        x_t, t = sample_until(
            pipe,
            conds[k : k + 1],
            null,
            steps=config.ddim_steps,
            stop=stop,
            guidance=config.start_guidance,
            generator=g,
        )
        loss = loss_fn(k, x_t, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train(
    pipe: Any, concepts: Sequence[str], config: ESDConfig, params: dict[str, torch.Tensor]
) -> list[float]:
    """Run ESD on ``params`` (trainable copies) in place; returns the loss of every iteration."""
    with torch.no_grad():
        conds = encode_prompts(pipe, list(concepts))
        froms = encode_prompts(pipe, [config.erase_from or c for c in concepts])
        null = encode_prompts(pipe, [""])

    def loss(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = {"c": conds[k : k + 1], "from": froms[k : k + 1], "null": null}
        return esd_loss(pipe.unet, params, x_t, t, emb, config.negative_guidance)

    return diffusion_loop(pipe, params, conds, loss, config, "esd")


def erase_esd(model: Any, concepts: list[str], config: ESDConfig) -> Patch:
    """ESD: fine-tune the selected UNet tensors so the concept's noise prediction points away from it."""
    pipe = check_unet_family(model, "esd")
    with frozen(pipe.unet, pipe.text_encoder):
        params = trainable_copies(pipe.unet, parameter_names(pipe.unet, config.parameters))
        train(pipe, concepts, config, params)
    return Patch.from_tensors(model, "unet", {n: p.detach() for n, p in params.items()})


_LEGACY = {"iterations": 1000, "lr": 1e-5, "negative_guidance": 1.0}

register(
    "esd-x",
    ESDConfig,
    presets={
        "paper": {"parameters": "attn2"},
        "strict": {"parameters": "attn2-kv"},
        "legacy": {"parameters": "attn2", **_LEGACY},
    },
    summary="ESD-x: fine-tune every cross-attention Linear of the UNet with negative guidance",
)(erase_esd)
register(
    "esd-u",
    ESDConfig,
    presets={"paper": {"parameters": "non-attn2"}, "legacy": {"parameters": "non-attn2", **_LEGACY}},
    summary="ESD-u: fine-tune every Linear and Conv of the UNet outside cross-attention",
)(erase_esd)
