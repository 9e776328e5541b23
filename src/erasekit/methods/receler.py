"""Receler: reliable concept erasing with lightweight erasers (Huang et al., ECCV 2024).

An eraser ``E(y) = up(GELU(down(y)))`` (``up`` zero-initialised, so training starts from the base model) follows
every cross-attention of the UNet: the block computes ``x + y + E(y)`` with ``y = attn2(LN(x), c)``. The erasers
alone train, against

    L = ‖ε_E(x_t, c_adv, t) − [ε*(x_t, ∅, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))]‖²
        + λ · mean_layers Σ_pixels (1 − M) · mean_channels E(y)² / Σ_pixels (1 − M)

- x_t ``[1, C, h, w]``: partial DDIM at guidance 3 with the erasers on; ε* the UNet with them off; ε_E with them on;
- M, the concept mask: the frozen model's cross-attention maps of the concept's tokens in the ε*(x_t, c, t) pass,
  averaged over tokens and heads and over the layers at the mask resolution, min-max normalised per image,
  thresholded at 0.1 (binary) and resized (nearest) to each layer's resolution. The regulariser keeps the erasers
  silent outside the concept's region;
- c_adv: the concept's embedding with K = 16 learnable rows written right after its tokens. Before each eraser
  step an adversary takes Adam steps (lr 0.1, L2 0.1, its state kept across iterations) that minimise
  ‖ε_E(x_t, c_adv, t) − ε*(x_t, c, t)‖², bringing the concept back through the erasers; the eraser step uses the
  last of those forward passes.

Released code (jasper0314-huang/Receler@3ccedc9, ``train_receler.py``) writes the adversarial rows with
``emb_n[:, idx, :].data = ...``: advanced indexing makes a copy, so the rows never reach the UNet and the erasers
train on the clean prompt. ``paper`` does what the code means to do (``adversary="intended"``); ``release`` keeps
the inert adversary (``adversary="inert"``), and skips its forward passes, which change nothing the erasers see.

The result is a :class:`~erasekit.hooked.HookedPatch` of ``adapter_eraser`` modules (no hook: the erasers are
always on, for every prompt and both halves of guidance, as ``test_receler.py`` runs them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.denoising import check_unet_family, encode_prompts, predict_noise
from erasekit.errors import ErasekitError
from erasekit.hooked import AddedModule, HookedPatch
from erasekit.hooks.adapters import AdapterEraser, EraserConfig, attention_width
from erasekit.hooks.attention_maps import attention_probs, concept_mask, grid_shape
from erasekit.methods.common import check_choice, check_positive, frozen, generator, in_path
from erasekit.methods.esd import diffusion_loop
from erasekit.registry import Strength, config_to_dict, register

ADVERSARIES = ("intended", "inert")
RANK_PER_WIDTH = 128 / 320  # the release: rank 128 on SD1.x, whose narrowest cross-attention is 320 wide


@dataclass(frozen=True, kw_only=True)
class ReceleConfig:
    """Receler's settings; defaults follow train_receler.py's argparse and concept_reg.py (see the presets)."""

    iterations: int = field(default=500, metadata={"help": "eraser steps (one concept and one x_t each)"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate of the erasers"})
    rank: int = field(
        default=0, metadata={"help": "eraser width; 0: 0.4 x the narrowest cross-attention (SD1.x: 128)"}
    )
    negative_guidance: float = field(default=1.0, metadata={"help": "η of the erase target"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the partial sampling"})
    ddim_steps: int = field(default=50, metadata={"help": "the DDIM schedule x_t is drawn along"})
    reg_weight: float = field(default=0.1, metadata={"help": "λ, the concept-localised regulariser's weight"})
    mask_threshold: float = field(default=0.1, metadata={"help": "threshold of the normalised attention map"})
    mask_resolution: int = field(
        default=0,
        metadata={
            "help": "side of the attention maps the mask is built from; 0: the coarsest above the "
            "middle block's (SD1.x at 512: 16, the release's)"
        },
    )
    adversary: str = field(
        default="intended",
        metadata={"help": "intended: the adversarial rows reach the UNet; inert: the release's copy bug"},
    )
    adv_rows: int = field(default=16, metadata={"help": "K, learnable rows after the concept's tokens"})
    adv_iterations: int = field(default=50, metadata={"help": "adversary forward passes per eraser step"})
    adv_lr: float = field(default=0.1, metadata={"help": "Adam learning rate of the adversary"})
    adv_weight_decay: float = field(default=0.1, metadata={"help": "Adam (L2) weight decay of the adversary"})
    seed: int = field(
        default=0, metadata={"help": "seed of the erasers' init, the rows, the noise and steps"}
    )

    def __post_init__(self) -> None:
        check_positive(iterations=self.iterations, lr=self.lr, ddim_steps=self.ddim_steps, adv_rows=self.adv_rows,
                       adv_iterations=self.adv_iterations, adv_lr=self.adv_lr)  # fmt: skip
        check_choice("adversary", self.adversary, ADVERSARIES)
        if min(self.rank, self.mask_resolution, self.negative_guidance, self.start_guidance) < 0:
            raise ValueError("rank, mask_resolution, negative_guidance and start_guidance must be >= 0")
        if min(self.reg_weight, self.adv_weight_decay) < 0 or not 0 <= self.mask_threshold < 1:
            raise ValueError("reg_weight and adv_weight_decay must be >= 0, mask_threshold in [0, 1)")


def cross_attentions(unet: nn.Module) -> list[str]:
    """Qualified names of every cross-attention (``attn2``) of the UNet, in model order."""
    names = [n for n, m in unet.named_modules() if n.endswith("attn2") and in_path(n, "attn2")]
    if not names or any(attention_width(unet.get_submodule(n)) is None for n in names):
        raise ErasekitError("receler needs a UNet whose cross-attentions are diffusers Attention modules")
    return names


def eraser_rank(unet: nn.Module, names: Sequence[str], rank: int) -> int:
    """``rank``, or 0.4 x the narrowest cross-attention's width (the release's 128 on SD1.x)."""
    return rank or max(1, round(RANK_PER_WIDTH * min(attention_width(unet.get_submodule(n)) for n in names)))


def new_eraser(dim: int, rank: int, g: torch.Generator) -> AdapterEraser:
    """An eraser with torch's Linear init for ``down`` (drawn from ``g``) and ``up`` zero, so E(y) = 0."""
    with torch.device("meta"):
        eraser = AdapterEraser(EraserConfig(dim=dim, rank=rank))
    eraser = eraser.to_empty(device="cpu")
    bound = 1.0 / math.sqrt(dim)  # kaiming-uniform with a = √5 and the bias's default: both ±1/√fan_in
    with torch.no_grad():
        eraser.down.weight.copy_(torch.empty(rank, dim).uniform_(-bound, bound, generator=g))
        eraser.down.bias.copy_(torch.empty(rank).uniform_(-bound, bound, generator=g))
        eraser.up.weight.zero_()
        eraser.up.bias.zero_()
    return eraser


class Erasers:
    """The erasers attached to a UNet's cross-attentions during training, switchable, recording what is asked.

    - ``on``: the erasers add their output (off: the frozen model ε*);
    - ``record_maps``: each attention's cross-attention probabilities of the text rows, ``[B, heads, HW, L]``;
    - ``record_outputs``: each eraser's output ``[B, HW, dim]`` (with its graph).
    """

    def __init__(self, unet: nn.Module, erasers: dict[str, AdapterEraser]) -> None:
        self.unet, self.erasers = unet, erasers
        self.on, self.record_maps, self.record_outputs = True, False, False
        self.maps: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    @contextmanager
    def attached(self) -> Iterator[Erasers]:
        handles = []
        try:
            for name, eraser in self.erasers.items():
                attn = self.unet.get_submodule(name)
                handles.append(attn.register_forward_pre_hook(self._pre(attn), with_kwargs=True))
                handles.append(attn.register_forward_hook(self._post(eraser)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _pre(self, attn: nn.Module) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.record_maps:
                x = args[0] if args else kwargs["hidden_states"]
                ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                self.maps.append(attention_probs(attn, x, ctx))

        return hook

    def _post(self, eraser: AdapterEraser) -> Any:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not self.on:
                return None
            e = eraser(out)
            if self.record_outputs:
                self.outputs.append(e)
            return out + e

        return hook

    @contextmanager
    def state(self, on: bool, maps: bool = False, outputs: bool = False) -> Iterator[None]:
        saved = (self.on, self.record_maps, self.record_outputs)
        self.on, self.record_maps, self.record_outputs = on, maps, outputs
        self.maps, self.outputs = [], []
        try:
            yield
        finally:
            self.on, self.record_maps, self.record_outputs = saved


def background_penalty(
    outputs: Sequence[torch.Tensor], mask: torch.Tensor, latent_hw: tuple[int, int]
) -> torch.Tensor:
    """mean over layers of Σ_pixels (1 − M) · mean_channels E(y)² / (Σ_pixels (1 − M) + 1e-9).

    ``outputs``: per eraser ``[B, HW, dim]``; ``mask`` ``[B, 1, h, w]``, resized (nearest) to each layer."""
    terms = []
    for e in outputs:
        size = grid_shape(e.shape[1], latent_hw)
        flip = 1 - F.interpolate(mask, size=size, mode="nearest").flatten(1)  # [B, HW]
        terms.append((e.pow(2).mean(-1) * flip).sum() / (flip.sum() + 1e-9))
    return torch.stack(terms).mean()


def concept_tokens(pipe: Any, concept: str) -> list[int]:
    """Positions 1..n of the concept's tokens in its prompt (between BOS and EOS)."""
    n = len(pipe.tokenizer(concept).input_ids) - 2
    if n < 1:
        raise ErasekitError(f"concept {concept!r} has no tokens")
    return list(range(1, n + 1))


def with_rows(c: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """``c`` ``[1, L, D]`` with rows ``start .. start+K`` replaced by ``rows`` ``[1, K, D]`` (differentiable)."""
    idx = torch.arange(start, start + rows.shape[1], device=c.device)
    return c.index_copy(1, idx, rows.to(c.dtype))


def receler_loss(
    erasers: Erasers,
    x_t: torch.Tensor,
    t: torch.Tensor,
    c: torch.Tensor,
    null: torch.Tensor,
    tokens: Sequence[int],
    adversary: tuple[torch.Tensor, torch.optim.Optimizer] | None,
    config: ReceleConfig,
) -> torch.Tensor:
    """One eraser step's loss (module docstring); runs the adversary's steps first when ``adversary`` is given.

    Args:
        x_t: ``[1, C, h, w]``; ``c``, ``null``: ``[1, L, D]`` the concept's and the empty prompt's embeddings.
        adversary: the concept's rows ``[1, K, D]`` and their optimizer (``None``: the clean prompt, the release).
    """
    unet = erasers.unet
    with torch.no_grad(), erasers.state(on=False):
        e_null = predict_noise(unet, x_t, t, null)
    with torch.no_grad(), erasers.state(on=False, maps=True):
        e_c = predict_noise(unet, x_t, t, c)
        maps = erasers.maps
    mask = concept_mask(maps, tokens, tuple(x_t.shape[-2:]), config.mask_threshold, config.mask_resolution)
    target = e_null - config.negative_guidance * (e_c - e_null)
    cond = c
    if adversary is not None:
        rows, opt = adversary
        start = tokens[-1] + 1
        for i in range(config.adv_iterations):
            live = rows.detach().clone().requires_grad_(True)
            cond = with_rows(c, live, start)
            last = i == config.adv_iterations - 1
            with erasers.state(on=True, outputs=last):
                e_n = predict_noise(unet, x_t, t, cond)
                outputs = erasers.outputs
            (grad,) = torch.autograd.grad(F.mse_loss(e_n, e_c), live, retain_graph=last)
            rows.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        with erasers.state(on=True, outputs=True):
            e_n = predict_noise(unet, x_t, t, cond)
            outputs = erasers.outputs
    return F.mse_loss(e_n, target) + config.reg_weight * background_penalty(
        outputs, mask, tuple(x_t.shape[-2:])
    )


def erase_receler(model: Any, concepts: list[str], config: ReceleConfig) -> HookedPatch:
    """Receler: train an eraser after every cross-attention; the erasers are the artifact's added modules."""
    pipe = check_unet_family(model, "receler")
    names = cross_attentions(pipe.unet)
    rank = eraser_rank(pipe.unet, names, config.rank)
    g = generator(config.seed)
    erasers = {n: new_eraser(attention_width(pipe.unet.get_submodule(n)), rank, g) for n in names}
    ref = next(pipe.unet.parameters())
    for e in erasers.values():
        e.to(ref.device, ref.dtype).requires_grad_(True)
    with frozen(pipe.unet, pipe.text_encoder), Erasers(pipe.unet, erasers).attached() as live:
        train(pipe, live, concepts, config, g)
    modules = tuple(
        AddedModule.attached_to(model, f"unet/{n}", "adapter_eraser",
                                config_to_dict(EraserConfig(dim=attention_width(pipe.unet.get_submodule(n)), rank=rank)),
                                e.state_dict())
        for n, e in erasers.items()
    )  # fmt: skip
    return HookedPatch(modules=modules)


def train(
    pipe: Any, erasers: Erasers, concepts: Sequence[str], config: ReceleConfig, g: torch.Generator
) -> None:
    """Train ``erasers`` in place (the ESD loop: x_t sampled with the erasers on, one Adam step per iteration)."""
    with torch.no_grad():
        conds, null = encode_prompts(pipe, list(concepts)), encode_prompts(pipe, [""])  # [K, L, D], [1, L, D]
    tokens = [concept_tokens(pipe, c) for c in concepts]
    if max(t[-1] for t in tokens) + config.adv_rows >= conds.shape[1]:
        raise ErasekitError(f"a concept's tokens and {config.adv_rows} adversarial rows overrun the prompt")
    adversaries = None
    if config.adversary == "intended":
        adversaries = []
        for _ in concepts:  # the release: torch.rand rows, one Adam per concept, kept across iterations
            rows = torch.rand(1, config.adv_rows, conds.shape[-1], generator=g).to(conds.device, conds.dtype)
            rows.requires_grad_(True)
            opt = torch.optim.Adam([rows], lr=config.adv_lr, weight_decay=config.adv_weight_decay)
            adversaries.append((rows, opt))
    params = {f"{n}.{p}": t for n, e in erasers.erasers.items() for p, t in e.named_parameters()}

    def loss(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        adv = adversaries[k] if adversaries is not None else None
        return receler_loss(erasers, x_t, t, conds[k : k + 1], null, tokens[k], adv, config)

    diffusion_loop(pipe, params, conds, loss, config, "receler", generator_=g)


_FILES = "jasper0314-huang/Receler@3ccedc9: train_receler.py, receler/concept_reg.py, receler/erasers/"
BUDGET = {"iterations": 100, "adv_iterations": 5}

register(
    "receler",
    ReceleConfig,
    presets={
        "paper": {},  # train_receler.py's argparse defaults, with the adversarial rows reaching the UNet
        "release": {"adversary": "inert"},  # as released: the rows are written into a copy
        "budget": BUDGET,
        "budget-release": {**BUDGET, "adversary": "inert"},
    },
    strength=Strength("negative_guidance", (0.5, 1.0, 2.0, 4.0, 8.0), preset="budget"),
    summary=f"Receler: an eraser after every cross-attention, concept-localised, adversarially trained ({_FILES})",
)(erase_receler)
