"""CRCE: Coreference-Retention Concept Erasure (Xue et al., arXiv 2503.14232), ESD erasing a concept together
with its coreferent concepts while keeping named retained ones.

Paper-level: the code was to be released "upon acceptance" and is not; only the abstract and third-party
summaries could be read here. The paper asks an LLM for M coreferents (other names and wordings of the target,
erased with it) and N retained concepts (distinct but related, kept), reports M = 5, N = 3 as the best
balance and builds on ESD. Our reading of the joint loss, at iteration i with e = E[i mod |E|] for the erase
set E = targets + coreferents::

    L = ‖ε_θ(x_t, e, t) − [ε*(x_t, e, t) − η (ε*(x_t, e, t) − ε*(x_t, ∅, t))]‖²
        + β · (1/N) Σ_r ‖ε_θ(x_t, r, t) − ε*(x_t, r, t)‖²

(means over elements; x_t ``[1, C, h, w]`` from the frozen model's partial DDIM run conditioned on e; the
retained predictions batched ``[N, C, h, w]`` on the same x_t). The first term is ESD's
(:func:`erasekit.methods.esd.esd_loss`) and the loop is ESD's (:func:`erasekit.methods.esd.diffusion_loop`).
The weighting β, the ESD variant and the schedule could not be confirmed (summaries call the loss
"manifold-aware"; its form could not be read): ESD-x's parameters and its newer schedule (200 iterations,
Adam 5e-5, η = 2) are used with β = 1.

On MiniCanvas the world stands in for the LLM: the coreferents are the concept's synonyms, then the world's
single-concept captions of its name and of its synonyms ("a picture of a fish", "A goldfish image."), the
first M; the retained are the other concepts of its kind, those of its super-category first, the first N.
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
    esd_loss,
    iteration_prefixes,
    parameter_names,
    snapshots_at,
)
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


@dataclass(frozen=True, kw_only=True)
class CRCEConfig:
    """CRCE's settings (paper-level: see the module docstring for what is a reading)."""

    coreferents: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "concepts erased with the target; None = the world's synonyms and wordings"},
    )
    retained: tuple[str, ...] | None = field(
        default=None, metadata={"help": "concepts kept; None = MiniCanvas siblings of the same kind"}
    )
    n_coref: int = field(
        default=5, metadata={"help": "M: coreferents taken from the world (the paper's best)"}
    )
    n_retain: int = field(default=3, metadata={"help": "N: retained taken from the world (the paper's best)"})
    retain_weight: float = field(default=1.0, metadata={"help": "β: weight of the retain term (unconfirmed)"})
    parameters: str = field(
        default="attn2", metadata={"help": f"which UNet tensors train: {', '.join(PARAMETER_SETS)}"}
    )
    iterations: int = field(default=200, metadata={"help": "gradient steps (the strength knob)"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate"})
    negative_guidance: float = field(default=2.0, metadata={"help": "η of the ESD erase term"})
    ddim_steps: int = field(default=50, metadata={"help": "length of the DDIM schedule x_t is sampled along"})
    start_guidance: float = field(
        default=3.0, metadata={"help": "CFG scale of the frozen model's partial sampling"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the noise and the stopping steps"})

    def __post_init__(self) -> None:
        check_choice("parameters", self.parameters, PARAMETER_SETS)
        check_positive(iterations=self.iterations, lr=self.lr, ddim_steps=self.ddim_steps)
        if min(self.n_coref, self.n_retain) < 0:
            raise ValueError("n_coref and n_retain must be >= 0")
        if min(self.retain_weight, self.negative_guidance, self.start_guidance) < 0:
            raise ValueError("retain_weight, negative_guidance and start_guidance must be >= 0")


def world_coreferents(concept: str, m: int) -> list[str]:
    """The first ``m`` of: the concept's synonyms, then its kind's one-concept captions of its names."""
    from erasekit.minicanvas.world import OBJECT_TEMPLATES, STYLE_TEMPLATES, concept_info

    info = concept_info(concept)
    templates, slot = (OBJECT_TEMPLATES, "object") if info.kind == "object" else (STYLE_TEMPLATES, "style")
    wordings = [t.format(**{slot: n}) for n in (info.name, *info.synonyms) for t in templates]
    return [*info.synonyms, *wordings][:m]


def world_retained(concepts: list[str], n: int) -> list[str]:
    """The first ``n`` other concepts of the kind, those sharing the first concept's super-category first."""
    from erasekit.methods._closed_form import world_kind_mates
    from erasekit.minicanvas.world import concept_info

    mates = world_kind_mates(concepts)
    category = concept_info(concepts[0]).category
    return sorted(mates, key=lambda c: concept_info(c).category != category)[:n]  # stable: world order


def erase_and_retain(concepts: list[str], config: CRCEConfig) -> tuple[list[str], list[str]]:
    """``(E, R)``: the erase set (targets, then coreferents) and the retained concepts (none erased)."""
    from erasekit.methods._closed_form import world_kind_mates

    needs_world = config.coreferents is None or config.retained is None
    if needs_world and not world_kind_mates(concepts):
        raise ErasekitError("crce needs coreferents=... and retained=... (the concepts are not MiniCanvas's)")
    if config.coreferents is None:
        corefs = [r for c in concepts for r in world_coreferents(c, config.n_coref)]
    else:
        corefs = list(config.coreferents)
    erase = list(dict.fromkeys([*concepts, *corefs]))
    retained = world_retained(concepts, config.n_retain) if config.retained is None else config.retained
    erased = {e.lower() for e in erase}
    return erase, [r for r in retained if r.lower() not in erased]


def retain_loss(
    unet: torch.nn.Module,
    params: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    kept: torch.Tensor,
) -> torch.Tensor:
    """(1/N) Σ_r ‖ε_θ(x_t, r, t) − ε*(x_t, r, t)‖², batched over the retained on one x_t.

    Args:
        x_t: ``[1, C, h, w]``.
        kept: ``[N, 77, D]`` the retained concepts' conditioning.
    """
    many = x_t.expand(kept.shape[0], -1, -1, -1)
    with torch.no_grad():
        target = predict_noise(unet, many, t, kept)
    return F.mse_loss(predict_noise(unet, many, t, kept, params), target)


def erase_crce(model: LoadedModel, concepts: list[str], config: CRCEConfig) -> Patch:
    """CRCE: ESD on the concept and its coreferents jointly, with the retained concepts' predictions kept."""
    return _trained(model, concepts, config, [config.iterations])[0]


def erase_crce_jointly(model: LoadedModel, concepts: list[str], configs: Sequence[CRCEConfig]) -> list[Patch]:
    """CRCE at several ``iterations`` in one run of the longest, each patch its prefix of that run
    (:func:`~erasekit.methods.esd.snapshots_at`): the leaderboard's sweep."""
    longest, keep = iteration_prefixes(configs)
    return _trained(model, concepts, longest, keep)


def _trained(model: LoadedModel, concepts: list[str], config: CRCEConfig, keep: Sequence[int]) -> list[Patch]:
    """Train ``config.iterations`` iterations; the patch after each count in ``keep``."""
    pipe = check_unet_family(model, "crce")
    erase, retained = erase_and_retain(concepts, config)
    with frozen(pipe.unet, pipe.text_encoder):
        params = trainable_copies(pipe.unet, parameter_names(pipe.unet, config.parameters))
        with torch.no_grad():
            conds, null = encode_prompts(pipe, erase), encode_prompts(pipe, [""])
            kept = encode_prompts(pipe, retained) if retained else None

        def loss(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            e = conds[k : k + 1]
            total = esd_loss(
                pipe.unet, params, x_t, t, {"c": e, "from": e, "null": null}, config.negative_guidance
            )
            if kept is not None and config.retain_weight > 0:
                total = total + config.retain_weight * retain_loss(pipe.unet, params, x_t, t, kept)
            return total

        after, snapshots = snapshots_at(params, keep)
        diffusion_loop(pipe, params, conds, loss, config, "crce", after_step=after)
    return [Patch.from_tensors(model, "unet", snapshots[n]) for n in keep]


#: The leaderboard's budget on MiniCanvas (docs/baselines.md): half the paper preset's iterations, about 4.5
#: CPU-minutes per concept instead of 9.
BUDGET = {"iterations": 100}

register(
    "crce",
    CRCEConfig,
    presets={"paper": {}, "budget": BUDGET},
    strength=Strength("iterations", (25, 50, 100, 200), joint=erase_crce_jointly),
    summary="CRCE: ESD on the concept and its coreferents jointly, keeping retained concepts (paper-level)",
)(erase_crce)
