"""SPM: one-dimensional adapters to erase a concept (Lyu et al., CVPR 2024), with Facilitated Transport.

A rank-1 LoRA pair (alpha 1, so ΔW = B A) on every ``nn.Linear`` and ``nn.Conv2d`` inside the UNet's transformer
blocks (diffusers' ``Transformer2DModel``: proj_in, the attn1/attn2 projections, the feed-forward, proj_out) is
trained with peft on a private copy of the UNet (the loaded model is only read) to minimise

    L = ‖ε_θ(x_t, c, t) − [ε*(x_t, ∅, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))]‖²
        + λ · mean_j ‖ε_θ(x_t, a_j, t) − ε*(x_t, a_j, t)‖²                        (means over elements)

- x_t ``[1, C, h, w]``: ``stop ~ U{1..T−1}`` DDIM steps (T = 30) from noise at guidance 3 with the *adapted* UNet
  (the release samples inside ``with network``); t: the 1000-step DDIM schedule at index ⌊stop·1000/T⌋;
- c ``[1, 77, D]`` the concept's embedding, ∅ the empty prompt's, ε* the frozen UNet, ε_θ the adapted one;
- a_j ``[77, D]``, j = 1..4, latent anchors: Gaussian directions u accepted with probability 1 − cos(u, c) and
  rescaled to r·‖c‖, r ~ U[0.8, 1.2); η = 1, λ = 1000. AdamW, cosine schedule with 3 hard restarts, 500 warm-up.

Facilitated Transport (FT) at inference: the permeability of prompt p is s(p) = max over the erased prompts e of
max(cos(flat E_p, flat E_e), |T_p ∩ T_e| / |T_e|) (E: the encoder's ``[77, D]`` output, T: token ids less the special
ones) and the UNet runs with W + s(p)·ΔW. FT off: ΔW is merged (s = 1) and the result is a plain Patch. FT on: a
:class:`~erasekit.hooked.HookedPatch` holding the adapters (``low_rank_adapter``) and a ``prompt_gate`` hook that
computes s(p) from each prompt's tokens and embeddings while the pipeline runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.denoising import check_unet_family, ddim, encode_prompts, predict_noise, sample_until
from erasekit.errors import ErasekitError
from erasekit.hooked import AddedModule, HookedPatch, HookSpec
from erasekit.hooks.adapters import LowRankAdapter, low_rank_config_for
from erasekit.hooks.prompt_gate import METRICS
from erasekit.methods.common import check_choice, check_positive, frozen, generator, lora_copy, peft_adapter
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import Strength, config_to_dict, register

ANCHOR_ROWS = ("sampled", "release")
HOOK_NAME = "facilitated_transport"


@dataclass(frozen=True, kw_only=True)
class SPMConfig:
    """SPM's settings; defaults follow configs/*/config.yaml and prompt.yaml of Con6924/SPM (see the presets)."""

    iterations: int = field(default=3000, metadata={"help": "gradient steps (one concept and one x_t each)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (the release: AdamW8bit)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (AdamW8bit's default)"})
    warmup: int = field(default=500, metadata={"help": "linear warm-up steps of the learning rate"})
    restarts: int = field(default=3, metadata={"help": "hard restarts of the cosine learning-rate schedule"})
    rank: int = field(default=1, metadata={"help": "rank of each adapter (one-dimensional: 1)"})
    alpha: float = field(default=1.0, metadata={"help": "LoRA alpha: ΔW = (alpha / rank) B A"})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of the erase target"})
    anchor_weight: float = field(default=1000.0, metadata={"help": "λ, the latent-anchoring weight"})
    anchors: int = field(default=4, metadata={"help": "latent anchors sampled per step"})
    anchor_rows: str = field(
        default="sampled",
        metadata={
            "help": "sampled: every anchor is anchored; release: the released code's rows (see the preset)"
        },
    )
    ddim_steps: int = field(default=30, metadata={"help": "T, the DDIM schedule x_t is drawn along"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the partial sampling"})
    facilitated_transport: bool = field(
        default=True,
        metadata={"help": "on: a hooked artifact scaling ΔW per prompt; off: ΔW merged into a Patch"},
    )
    ft_metric: str = field(default="clipcos_tokenuni", metadata={"help": f"FT's s: {', '.join(METRICS)}"})
    ft_exponent: int = field(
        default=1, metadata={"help": "FT scales ΔW by s**exponent (1: W + sΔW; the release's code gives 2)"}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the adapters' init, the noise, anchors and steps"}
    )

    def __post_init__(self) -> None:
        check_positive(iterations=self.iterations, lr=self.lr, rank=self.rank, alpha=self.alpha,
                       anchors=self.anchors, restarts=self.restarts)  # fmt: skip
        check_choice("anchor_rows", self.anchor_rows, ANCHOR_ROWS)
        check_choice("ft_metric", self.ft_metric, METRICS)
        if self.ddim_steps < 2:
            raise ValueError(f"ddim_steps must be >= 2 (x_t takes 1..T-1 steps), got {self.ddim_steps}")
        if (
            min(
                self.warmup,
                self.weight_decay,
                self.negative_guidance,
                self.anchor_weight,
                self.start_guidance,
            )
            < 0
        ):
            raise ValueError(
                "warmup, weight_decay, negative_guidance, anchor_weight, start_guidance must be >= 0"
            )
        if self.ft_exponent not in (1, 2):
            raise ValueError(f"ft_exponent must be 1 or 2, got {self.ft_exponent}")
        if self.anchor_rows == "release" and self.anchors % 2:
            raise ValueError("the release's anchor rows need an even number of anchors")


def transformer_layers(unet: nn.Module, who: str = "spm") -> list[str]:
    """Qualified names of every Linear and Conv2d inside the UNet's ``Transformer2DModel`` blocks, in model order.

    Args:
        who: the method named in the errors (SPM and ACE adapt the same layers).
    """
    from diffusers.models import Transformer2DModel

    names: list[str] = []
    for name, block in unet.named_modules():
        if isinstance(block, Transformer2DModel):
            names += [f"{name}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not names:
        raise ErasekitError(
            f"{who} needs a UNet with transformer blocks (Transformer2DModel); this one has none"
        )
    for name in names:
        low_rank_config_for(unet.get_submodule(name), 1, 1.0)  # refuses grouped or string-padded convs
        if isinstance(unet.get_submodule(name), nn.Conv2d) and unet.get_submodule(name).dilation != (1, 1):
            raise ErasekitError(f"{who} cannot adapt the dilated conv {name}")
    return list(dict.fromkeys(names))


def sample_anchors(c: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` latent anchors ``[n, L, D]`` around the concept embedding ``c`` ``[L, D]``.

    A unit Gaussian direction u is accepted with probability 1 − cos(u, c) (drawn again otherwise), then scaled to
    r·‖c‖ with r ~ U[0.8, 1.2) (norms over the flattened L·D values).
    """
    flat = c.detach().flatten().float().cpu()
    out = []
    while len(out) < n:
        while True:
            u = torch.randn(flat.shape, generator=g)
            u = u / u.norm()
            sim = float(F.cosine_similarity(flat, u, dim=0))
            if float(torch.rand((), generator=g)) < 1 - sim:
                break
        out.append((float(torch.rand((), generator=g)) * 0.4 + 0.8) * u * flat.norm())
    return torch.stack(out).view(n, *c.shape).to(c.device, c.dtype)


def anchor_rows(anchors: torch.Tensor, null: torch.Tensor, layout: str) -> torch.Tensor:
    """The conditioning rows ``[n, L, D]`` that are anchored.

    ``sampled``: the anchors. ``release``: src/engine/sampling.py interleaves ``[∅, a_1, ∅, a_2, ...]`` and the
    guidance-1 prediction keeps the second half of that batch, so ∅ twice and the last n/2 anchors are anchored.
    """
    if layout == "sampled":
        return anchors
    n = anchors.shape[0]
    interleaved = torch.stack([row for a in anchors for row in (null[0], a)])  # [2n, L, D]
    return interleaved[n:]


def erase_spm(model: Any, concepts: list[str], config: SPMConfig) -> Patch | HookedPatch:
    """SPM: train rank-1 adapters on the transformer blocks; merged (FT off) or gated per prompt (FT on)."""
    pipe = check_unet_family(model, "spm")
    names = transformer_layers(pipe.unet)
    with frozen(pipe.unet, pipe.text_encoder):
        adapters = train(pipe, concepts, config, names)
    if not config.facilitated_transport:
        return Patch.from_tensors(model, "unet", merged(pipe.unet, adapters))
    modules = tuple(
        AddedModule.attached_to(model, f"unet/{name}", "low_rank_adapter", config_to_dict(low_rank_config_for(
            pipe.unet.get_submodule(name), config.rank, config.alpha)), a.state_dict())
        for name, a in adapters.items()
    )  # fmt: skip
    gate = {"prompts": list(concepts), "metric": config.ft_metric, "exponent": config.ft_exponent}
    hook = HookSpec(name=HOOK_NAME, kind="prompt_gate", config=gate, gates=tuple(m.name for m in modules))
    return HookedPatch(modules=modules, hooks=(hook,))


def merged(unet: nn.Module, adapters: dict[str, LowRankAdapter]) -> dict[str, torch.Tensor]:
    """``{name.weight: W + ΔW}`` for every adapted module."""
    out = {}
    for name, adapter in adapters.items():
        weight = unet.get_submodule(name).weight
        out[f"{name}.weight"] = weight.detach() + adapter.delta_weight().to(weight.device, weight.dtype)
    return out


def train(
    pipe: Any, concepts: Sequence[str], config: SPMConfig, names: Sequence[str]
) -> dict[str, LowRankAdapter]:
    """Train the adapters of ``names`` with peft on a copy of the UNet; returns them as low-rank adapters (CPU)."""
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    g = generator(config.seed)
    adapted, layers = lora_copy(pipe.unet, names, config.rank, config.alpha, g)
    params = [
        p
        for layer in layers.values()
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    ]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = get_cosine_with_hard_restarts_schedule_with_warmup(
        opt, config.warmup, config.iterations, config.restarts
    )
    with torch.no_grad():
        conds, null = encode_prompts(pipe, list(concepts)), encode_prompts(pipe, [""])  # [K, L, D], [1, L, D]
    sampler = SimpleNamespace(unet=adapted, scheduler=pipe.scheduler)  # sample_until reads these two
    schedule = ddim(pipe, 1000).timesteps
    for _ in track(range(config.iterations), desc="spm", total=config.iterations):
        k = int(torch.randint(len(concepts), (), generator=g))
        c = conds[k : k + 1]
        stop = int(torch.randint(1, config.ddim_steps, (), generator=g))
        x_t, _ = sample_until(sampler, c, null, steps=config.ddim_steps, stop=stop, guidance=config.start_guidance,
                              generator=g)  # fmt: skip
        t = schedule[int(stop * 1000 / config.ddim_steps)]
        rows = anchor_rows(sample_anchors(c[0], config.anchors, g), null, config.anchor_rows)  # [n, L, D]
        loss = spm_loss(pipe.unet, adapted, x_t, t, c, null, rows, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {name: peft_adapter(pipe.unet.get_submodule(name), layer, config.rank, config.alpha)
            for name, layer in layers.items()}  # fmt: skip


def spm_loss(
    base: nn.Module,
    adapted: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    c: torch.Tensor,
    null: torch.Tensor,
    rows: torch.Tensor,
    config: SPMConfig,
) -> torch.Tensor:
    """The erase term plus λ × the anchoring term (module docstring). ``x_t`` ``[1, C, h, w]``; ``c``, ``null``
    ``[1, L, D]``; ``rows`` ``[n, L, D]`` the anchored conditionings."""
    n = rows.shape[0]
    with torch.no_grad():
        e = predict_noise(base, x_t.expand(2 + n, -1, -1, -1), t, torch.cat([c, null, rows]))
        e_c, e_null, e_anchor = e[:1], e[1:2], e[2:]
        target = e_null - config.negative_guidance * (e_c - e_null)
    pred = predict_noise(adapted, x_t.expand(1 + n, -1, -1, -1), t, torch.cat([c, rows]))
    return F.mse_loss(pred[:1], target) + config.anchor_weight * F.mse_loss(pred[1:], e_anchor)


_FILES = (
    "Con6924/SPM@3dd762e: train_spm.py, src/models/spm.py, src/engine/{sampling,train_util}.py, infer_spm.py"
)
_RELEASE = {"anchor_rows": "release", "ft_exponent": 2}
BUDGET = {"iterations": 200, "warmup": 33}

register(
    "spm",
    SPMConfig,
    presets={
        "paper": {},  # the defaults: configs/*/config.yaml + prompt.yaml, FT on, the released code's intent
        "release": _RELEASE,  # the released code as it runs: its anchor rows and FT scaling both factors
        "merged": {"facilitated_transport": False},
        "budget": BUDGET,
        "budget-merged": {**BUDGET, "facilitated_transport": False},
    },
    strength=Strength("negative_guidance", (0.5, 1.0, 2.0, 4.0, 8.0), preset="budget"),
    summary=f"SPM: rank-1 adapters on the transformer blocks, latent anchoring, Facilitated Transport ({_FILES})",
)(erase_spm)
