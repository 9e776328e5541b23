"""UnGuide: a rank-1 LoRA unlearned with ESD, mixed with the base model per prompt at inference (Polowczyk et al.).

Training (piotrmwojcik/UnGuide@ef15713, ``train.py``, ``lora.py``): LoRA pairs (rank 1, scale alpha = 8) on every
cross-attention ``to_k`` and ``to_v``, A ~ N(0, 1/r), B = 0, trained with Adam (lr 3e-5, 200 iterations) on

    ‖ε_LoRA(x_t, c, t) − [ε*(x_t, r, t) − η (ε*(x_t, c, t) − ε*(x_t, r, t))]‖²,   η = 2

x_t from a partial 50-step DDIM run of the LoRA model at guidance 9, c the concept's embedding, r the reference
prompt's (the release's JSON names one per concept; here ``reference``, the empty prompt unless given), ε* the
frozen UNet.

Inference: a :class:`~erasekit.hooked.HookedPatch` holding the pairs as ``low_rank_adapter`` modules and a
``guidance_mix`` hook (:mod:`erasekit.hooks.guidance_mix`) that measures, per prompt, how far the LoRA model's
prediction moves from the base model's, compares it with the empty prompt's, and mixes the two models' guided
predictions with w = −1 (the concept: 2 ε_LoRA − ε_base) or w = 2 (anything else: 2 ε_base − ε_LoRA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.denoising import check_unet_family, encode_prompts, predict_noise
from erasekit.hooked import AddedModule, HookedPatch, HookSpec
from erasekit.hooks.adapters import LowRankAdapter, low_rank_config_for
from erasekit.hooks.guidance_mix import GuidanceMixConfig
from erasekit.methods.common import attn2_linears, check_positive, frozen, generator, lora_copy, peft_adapter
from erasekit.methods.esd import diffusion_loop
from erasekit.registry import Strength, config_to_dict, register

HOOK_NAME = "unguide"


@dataclass(frozen=True, kw_only=True)
class UnGuideConfig:
    """UnGuide's settings; defaults follow the README and ``train.py``'s argparse (see the presets)."""

    iterations: int = field(default=200, metadata={"help": "Adam steps (one concept and one x_t each)"})
    lr: float = field(default=3e-5, metadata={"help": "Adam learning rate"})
    rank: int = field(default=1, metadata={"help": "LoRA rank"})
    alpha: float = field(
        default=8.0, metadata={"help": "the LoRA's scale is alpha (the release: not alpha / r)"}
    )
    negative_guidance: float = field(default=2.0, metadata={"help": "η of the erase target"})
    start_guidance: float = field(default=9.0, metadata={"help": "CFG scale of the partial sampling"})
    ddim_steps: int = field(default=50, metadata={"help": "the DDIM schedule x_t is drawn along"})
    reference: str = field(default="", metadata={"help": "r, the prompt the target is anchored on"})
    w_concept: float = field(default=-1.0, metadata={"help": "mix weight of the base model on the concept"})
    w_other: float = field(default=2.0, metadata={"help": "mix weight of the base model on other prompts"})
    repeats: int = field(default=30, metadata={"help": "probes per prompt of the gate"})
    probe_stop: int = field(default=11, metadata={"help": "the gate's DDIM steps before it compares (of 50)"})
    probe_t: int = field(default=800, metadata={"help": "the gate compares predictions at t in [this, +20)"})
    probe_guidance: float = field(default=7.5, metadata={"help": "CFG scale of the gate's probe sampling"})
    seed: int = field(default=0, metadata={"help": "seed of the LoRA init, the noise and steps"})
    probe_seed: int = field(default=2024, metadata={"help": "seed of the gate's probes (the release: 2024)"})

    def __post_init__(self) -> None:
        check_positive(iterations=self.iterations, lr=self.lr, rank=self.rank, alpha=self.alpha,
                       ddim_steps=self.ddim_steps)  # fmt: skip
        if self.negative_guidance < 0 or self.start_guidance < 0:
            raise ValueError("negative_guidance and start_guidance must be >= 0")
        GuidanceMixConfig(**self.gate())  # the gate's own checks

    def gate(self) -> dict[str, Any]:
        """The ``guidance_mix`` hook's config."""
        return {"w_concept": self.w_concept, "w_other": self.w_other, "repeats": self.repeats,
                "probe_stop": self.probe_stop, "probe_t": self.probe_t, "probe_guidance": self.probe_guidance,
                "seed": self.probe_seed}  # fmt: skip


def unguide_loss(
    base: torch.nn.Module,
    adapted: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    c: torch.Tensor,
    ref: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """‖ε_LoRA(x_t, c) − [ε*(r) − η (ε*(c) − ε*(r))]‖² (mean over elements); ``x_t`` ``[1, C, h, w]``, ``c``,
    ``ref`` ``[1, L, D]``."""
    with torch.no_grad():
        e_ref, e_c = predict_noise(base, x_t.expand(2, -1, -1, -1), t, torch.cat([ref, c])).chunk(2)
    return F.mse_loss(predict_noise(adapted, x_t, t, c), e_ref - eta * (e_c - e_ref))


def erase_unguide(model: Any, concepts: list[str], config: UnGuideConfig) -> HookedPatch:
    """UnGuide: train the LoRA pairs with ESD's loss; the artifact adds them with the per-prompt guidance mix."""
    pipe = check_unet_family(model, "unguide")
    names = attn2_linears(pipe.unet, ("to_k", "to_v"))
    with frozen(pipe.unet, pipe.text_encoder):
        layers = train(pipe, concepts, config, names)
    modules = tuple(
        AddedModule.attached_to(model, f"unet/{name}", "low_rank_adapter",
                                config_to_dict(low_rank_config_for(pipe.unet.get_submodule(name), config.rank,
                                                                   config.alpha * config.rank)),
                                adapter.state_dict())
        for name, adapter in layers.items()
    )  # fmt: skip
    hook = HookSpec(
        name=HOOK_NAME, kind="guidance_mix", config=config.gate(), gates=tuple(m.name for m in modules)
    )
    return HookedPatch(modules=modules, hooks=(hook,))


def train(
    pipe: Any, concepts: Sequence[str], config: UnGuideConfig, names: Sequence[str]
) -> dict[str, LowRankAdapter]:
    """Train peft LoRA pairs on ``names`` of a copy of the UNet; returns them as low-rank adapters (CPU)."""
    g = generator(config.seed)
    # peft's scaling is alpha / r; the release scales by alpha, so peft gets alpha · r
    adapted, layers = lora_copy(pipe.unet, names, config.rank, config.alpha * config.rank, g)
    with torch.no_grad():
        for layer in layers.values():  # the release's A: randn / √r
            a = layer.lora_A["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(config.rank))
    params = {f"{n}.{p}": layer.lora_A["default"].weight if p == "A" else layer.lora_B["default"].weight
              for n, layer in layers.items() for p in ("A", "B")}  # fmt: skip
    with torch.no_grad():
        conds = encode_prompts(pipe, list(concepts))
        ref = encode_prompts(pipe, [config.reference])

    def loss(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unguide_loss(pipe.unet, adapted, x_t, t, conds[k : k + 1], ref, config.negative_guidance)

    # x_t from the model being trained: the loop samples with ``adapted``, whose LoRA weights are ``params``
    diffusion_loop(pipe, params, conds, loss, config, "unguide", generator_=g, unet=adapted)
    return {n: peft_adapter(pipe.unet.get_submodule(n), layer, config.rank, config.alpha * config.rank)
            for n, layer in layers.items()}  # fmt: skip


_FILES = "piotrmwojcik/UnGuide@ef15713: train.py, lora.py, compute_lora_diff.py, autoguide.py"
BUDGET = {"repeats": 8}

register(
    "unguide",
    UnGuideConfig,
    presets={
        "paper": {},  # README + argparse: 200 Adam steps at 3e-5, η 2, guidance 9; the gate with 30 probes
        "budget": BUDGET,  # the same training; 8 probes per prompt for the gate
    },
    strength=Strength("negative_guidance", (0.5, 1.0, 2.0, 4.0, 8.0), preset="budget"),
    summary=f"UnGuide: rank-1 LoRA with ESD's loss, mixed with the base model per prompt at inference ({_FILES})",
)(erase_unguide)
