"""All but One (Hong, Lee & Woo, arXiv 2312.12807): move only the concept's guidance term onto an alternative.

Paper-level: no code was released, and only the paper's abstract and figure 1 could be read here. Our reading
of "surgical concept erasing with model preservation" is a loss that replaces the concept's classifier-free
guidance direction by the alternative's while the unconditional prediction stays the frozen model's::

    L = ‖[ε_θ(x_t, c, t) − ε_θ(x_t, ∅, t)] − [ε*(x_t, c_alt, t) − ε*(x_t, ∅, t)]‖²
        + λ ‖ε_θ(x_t, ∅, t) − ε*(x_t, ∅, t)‖²

(means over elements; ε* the frozen model, ε_θ the trained one; x_t ``[1, C, h, w]``, each prediction the
same shape). Sampling with guidance s then gives ε_θ(∅) + s (ε_θ(c) − ε_θ(∅)) ≈ ε*(∅) + s (ε*(c_alt) − ε*(∅)):
the concept is drawn as the alternative and everything the unconditional branch carries is kept. The exact
loss, λ, the trained parameters and the schedule could not be confirmed; we train ESD-x's parameters (every
attn2 Linear) on ESD's loop (:func:`erasekit.methods.esd.diffusion_loop`: x_t from the frozen model's partial
DDIM at guidance 3) with ESD's newer schedule (200 iterations, Adam 5e-5) and λ = 1.

The alternative is the user's, or on MiniCanvas the concept's super-category (``animal`` for ``fish``,
``painting`` for ``watercolor``): the paper lets the user pick it (``Van Gogh`` → ``dry brushing``,
``desktop`` → ``laptop``); the world's category is the neutral neighbour it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from erasekit.denoising import check_unet_family, encode_prompts, predict_noise
from erasekit.errors import ErasekitError
from erasekit.methods.common import check_choice, check_positive, frozen, trainable_copies
from erasekit.methods.esd import (
    PARAMETER_SETS,
    diffusion_loop,
    iteration_prefixes,
    parameter_names,
    snapshots_at,
)
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


@dataclass(frozen=True, kw_only=True)
class AllButOneConfig:
    """All but One's settings (paper-level: see the module docstring for what is a reading)."""

    alternative: str | None = field(
        default=None,
        metadata={"help": "c_alt, the concept the guidance moves to; None = the MiniCanvas super-category"},
    )
    preserve_weight: float = field(
        default=1.0, metadata={"help": "λ: weight of keeping the unconditional prediction (unconfirmed)"}
    )
    parameters: str = field(
        default="attn2", metadata={"help": f"which UNet tensors train: {', '.join(PARAMETER_SETS)}"}
    )
    iterations: int = field(default=200, metadata={"help": "gradient steps (the strength knob)"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate"})
    ddim_steps: int = field(default=50, metadata={"help": "length of the DDIM schedule x_t is sampled along"})
    start_guidance: float = field(
        default=3.0, metadata={"help": "CFG scale of the frozen model's partial sampling"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the noise and the stopping steps"})

    def __post_init__(self) -> None:
        check_choice("parameters", self.parameters, PARAMETER_SETS)
        check_positive(iterations=self.iterations, lr=self.lr, ddim_steps=self.ddim_steps)
        if self.preserve_weight < 0 or self.start_guidance < 0:
            raise ValueError("preserve_weight and start_guidance must be >= 0")


def alternatives(concepts: list[str], alternative: str | None) -> list[str]:
    """The alternative of each concept: the given one, or its MiniCanvas super-category."""
    if alternative is not None:
        return [alternative] * len(concepts)
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES, concept_info

    for c in concepts:
        if c.strip().lower() not in OBJECT_NAMES + STYLE_NAMES:
            raise ErasekitError(f"all-but-one needs alternative=... for {c!r} (not a MiniCanvas concept)")
    return [concept_info(c).category for c in concepts]


def all_but_one_loss(
    unet: torch.nn.Module,
    params: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    emb: dict[str, torch.Tensor],
    preserve_weight: float,
) -> torch.Tensor:
    """The loss of the module docstring.

    Args:
        params: the trainable copies standing in for the UNet's own.
        x_t: ``[1, C, h, w]``.
        emb: ``{"c", "alt", "null"}``, each ``[1, 77, D]``.
    """
    two = x_t.expand(2, -1, -1, -1)
    with torch.no_grad():
        e_alt, e_null = predict_noise(unet, two, t, torch.cat([emb["alt"], emb["null"]])).chunk(2)
    o_c, o_null = predict_noise(unet, two, t, torch.cat([emb["c"], emb["null"]]), params).chunk(2)
    return F.mse_loss(o_c - o_null, e_alt - e_null) + preserve_weight * F.mse_loss(o_null, e_null)


def erase_all_but_one(model: LoadedModel, concepts: list[str], config: AllButOneConfig) -> Patch:
    """All but One: train the UNet so the concept's guidance term becomes the alternative's, ε(∅) held."""
    return _trained(model, concepts, config, [config.iterations])[0]


def erase_all_but_one_jointly(
    model: LoadedModel, concepts: list[str], configs: Sequence[AllButOneConfig]
) -> list[Patch]:
    """All but One at several ``iterations`` in one run of the longest, each patch its prefix of that run
    (:func:`~erasekit.methods.esd.snapshots_at`): the leaderboard's sweep."""
    longest, keep = iteration_prefixes(configs)
    return _trained(model, concepts, longest, keep)


def _trained(
    model: LoadedModel, concepts: list[str], config: AllButOneConfig, keep: Sequence[int]
) -> list[Patch]:
    """Train ``config.iterations`` iterations; the patch after each count in ``keep``."""
    pipe = check_unet_family(model, "all-but-one")
    alts = alternatives(concepts, config.alternative)
    with frozen(pipe.unet, pipe.text_encoder):
        params = trainable_copies(pipe.unet, parameter_names(pipe.unet, config.parameters))
        with torch.no_grad():
            conds, alt, null = (encode_prompts(pipe, p) for p in (concepts, alts, [""]))

        def loss(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            emb = {"c": conds[k : k + 1], "alt": alt[k : k + 1], "null": null}
            return all_but_one_loss(pipe.unet, params, x_t, t, emb, config.preserve_weight)

        after, kept = snapshots_at(params, keep)
        diffusion_loop(pipe, params, conds, loss, config, "all-but-one", after_step=after)
    return [Patch.from_tensors(model, "unet", kept[n]) for n in keep]


#: The leaderboard's budget on MiniCanvas (docs/baselines.md): half the paper preset's iterations, about 4.5
#: CPU-minutes per concept instead of 9.
BUDGET = {"iterations": 100}

register(
    "all-but-one",
    AllButOneConfig,
    presets={"paper": {}, "budget": BUDGET},
    strength=Strength("iterations", (25, 50, 100, 200), joint=erase_all_but_one_jointly),
    summary="All but One: move the guidance term ε(c) − ε(∅) onto an alternative, holding ε(∅) (paper-level)",
)(erase_all_but_one)
