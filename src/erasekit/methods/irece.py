"""IRECE: inference-time robustness enhancement for concept erasure (M-ErasureBench, 2025), paper-level.

No training: the artifact is a :class:`~erasekit.hooked.HookedPatch` holding one ``concept_perturb`` hook
(:mod:`erasekit.hooks.concept_perturb`), which localises the erased concept with cross-attention and perturbs
those latents during the early denoising steps. It is meant to be stacked on another erasure
(``erasekit bench --methods esd-x+irece``) and works alone too. The paper gives no code, strength, schedule or
threshold; ours are documented in docs/baselines.md ("IRECE").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from erasekit.hooked import HookedPatch, HookSpec
from erasekit.hooks.concept_perturb import ConceptPerturbConfig
from erasekit.registry import Strength, register


@dataclass(frozen=True, kw_only=True)
class IRECEConfig:
    """Our reading of IRECE (no released code)."""

    strength: float = field(default=1.0, metadata={"help": "the perturbation, in units of the latents' std"})
    until_t: int = field(default=500, metadata={"help": "perturb the denoising calls at timesteps >= this"})
    threshold: float = field(default=0.5, metadata={"help": "threshold of the normalised attention map"})
    mask_resolution: int = field(
        default=0, metadata={"help": "maps' side; 0: the coarsest above the smallest"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the perturbation"})

    def __post_init__(self) -> None:
        ConceptPerturbConfig(prompts=("x",), **self.hook())  # the hook's own checks

    def hook(self) -> dict[str, Any]:
        return {"strength": self.strength, "until_t": self.until_t, "threshold": self.threshold,
                "mask_resolution": self.mask_resolution, "seed": self.seed}  # fmt: skip


def erase_irece(model: Any, concepts: list[str], config: IRECEConfig) -> HookedPatch:
    """IRECE: a hook only; the concepts are the prompts it localises."""
    model.require_capability("unet_training", "irece")
    hook = HookSpec(name="irece", kind="concept_perturb", config={"prompts": list(concepts), **config.hook()})
    return HookedPatch(hooks=(hook,))


register(
    "irece",
    IRECEConfig,
    presets={"paper": {}},  # paper-level: our choices (docs/baselines.md)
    strength=Strength("strength", (0.25, 0.5, 1.0, 2.0, 4.0)),
    summary="IRECE: perturb the latents where cross-attention finds the concept, while sampling (paper-level)",
)(erase_irece)
