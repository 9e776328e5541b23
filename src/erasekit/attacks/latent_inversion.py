"""Inverted latents (M-ErasureBench): DDIM-invert an image of the concept, then let the erased model regenerate it.

M-ErasureBench (arXiv 2512.22877; no code released, so this follows the paper's description, and the choices
below are ours) attacks through the image-editing path: an image of the erased concept is inverted into start
latents, and the erased model denoises them again. Two scenarios:

- ``latent-inversion`` (white-box): the image is inverted through the ERASED model (its text encoder and UNet,
  the patch or hooked artifact applied);
- ``latent-inversion-transfer`` (black-box): it is inverted through the BASE model, and the latents are handed
  to the erased model.

What a run does, per base prompt j:

1. The base model generates the concept image from ``positives[j]`` (seed ``IMAGE_SEED + j``, the seeds
   textual inversion trains on), decoded to pixels and encoded again by the VAE (its posterior mean), which is
   what an editor holding the PNG gets.
2. The latents are inverted with diffusers' ``DDIMInverseScheduler`` over the run's ``steps`` at guidance 1,
   conditioned on the prompt they are then regenerated with, so regenerating at guidance 1 with the inverting
   model would give the image back.
3. The erased model regenerates from them with the run's sampling, with the empty prompt (``empty``: the
   unconditional setting, where the paper finds CRR above 90 %) and with a neutral prompt (``neutral``: the base
   prompt without the concept, e.g. ``A circle image.``).

Each candidate carries its latents and is generated once, with the run's first seed: DDIM adds no noise, so
more seeds would repeat the image. The headline ``ASR`` is M-ErasureBench's CRR (concept reproduction rate), the
share of regenerated images the detector reads as the concept; ``ASR_by_tag`` gives it per prompt. The
inverted latents are saved as ``embeddings.safetensors`` (``inverted_<prompt>``, ``[N, C, h, w]``). The
concept images, and the black-box scenario's inverted latents, depend on the base model alone: they are made
once per process (:mod:`erasekit.attacks._memo`), so a bench pays for them once per concept, not once per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.attacks import register_attack
from erasekit.attacks._denoise import ddim_invert, model_latents, vae_posteriors
from erasekit.attacks._memo import BaseModelMemo
from erasekit.attacks.base import AttackResult, AttackTarget, Budget, Candidate, PromptSet
from erasekit.attacks.textual_inversion import IMAGE_SEED
from erasekit.denoising import check_unet_family, encode_prompts
from erasekit.errors import ErasekitError

REGENERATE = ("empty", "neutral", "both")


@dataclass(frozen=True, kw_only=True)
class LatentInversionConfig(Budget):
    """Which prompts the inverted latents are regenerated with; one concept image per base prompt (``prompts``).

    M-ErasureBench publishes no code or budget: ``paper`` is ours (12 images, inverted over the run's steps)."""

    regenerate: str = field(
        default="both",
        metadata={
            "help": "regeneration prompt: empty, neutral (the base prompt without the concept), or both"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regenerate not in REGENERATE:
            raise ValueError(f"regenerate must be one of {', '.join(REGENERATE)}, got {self.regenerate!r}")


def regeneration_prompts(ps: PromptSet, regenerate: str) -> dict[str, list[str]]:
    """``{tag: one prompt per base prompt}``: ``empty`` ("" each) and/or ``neutral`` (``ps.negatives``)."""
    prompts = {"empty": [""] * len(ps.positives), "neutral": list(ps.negatives)}
    return {k: v for k, v in prompts.items() if regenerate in (k, "both")}


def concept_latents(pipe: Any, ps: PromptSet, target: AttackTarget) -> torch.Tensor:
    """The VAE latents ``[N, C, h, w]`` of the base model's image of each base prompt (decoded, then encoded)."""
    seeds = [IMAGE_SEED + j for j in range(len(ps.positives))]
    latents = model_latents(pipe, list(ps.positives), seeds, target.sampling)  # the base model's own images
    return vae_posteriors(pipe, latents)[0][:, 0]  # posterior mean of the unmirrored image


def invert(pipe: Any, x0: torch.Tensor, prompts: list[str], steps: int) -> torch.Tensor:
    """Each image's start latents ``[N, C, h, w]`` under its own prompt, with the pipeline as it is now."""
    with torch.no_grad():
        cond = encode_prompts(pipe, prompts)  # [N, 77, D]
    return ddim_invert(pipe, x0, cond, steps).float().cpu()


def inverted_latents(
    target: AttackTarget, config: LatentInversionConfig, *, through_erased: bool
) -> AttackResult:
    """Invert a base-model image of the concept through the erased or the base model, and regenerate it with
    the erased model from the empty and/or the neutral prompt."""
    ps, pipe = target.prompts, check_unet_family(target.model, "latent-inversion")
    scheduler = target.sampling.scheduler or type(pipe.scheduler).__name__
    # the inverse steps mirror DDIM's; another sampler would not retrace them
    if scheduler != "DDIMScheduler":
        raise ErasekitError(
            f"latent-inversion regenerates with the DDIM schedule its inversion mirrors, but this run samples with "
            f"{scheduler}: pass --scheduler DDIMScheduler"
        )
    memo, parts = BaseModelMemo(target), (ps.positives, target.sampling)  # the same for every row
    x0 = memo.get("concept latents", parts, lambda: concept_latents(pipe, ps, target))
    prompts_by_tag = regeneration_prompts(ps, config.regenerate)

    def starts_now() -> dict[str, torch.Tensor]:
        return {v: invert(pipe, x0, prompts, target.sampling.steps) for v, prompts in prompts_by_tag.items()}

    if through_erased:
        with target.erased():
            starts = starts_now()
    else:  # inverted through the base model: the same for every erasure of the concept
        starts = memo.get("base inversion", (*parts, prompts_by_tag), starts_now)
    seed = (target.seeds[0],)
    cands = tuple(
        Candidate(prompt=prompts[j], group=j, latents=starts[v][j], tag=v, seeds=seed,
                  text=f"<inverted image {j}> {prompts[j]}".strip())
        for v, prompts in prompts_by_tag.items() for j in range(len(prompts))
    )  # fmt: skip
    stats = {"inverted_through": "erased" if through_erased else "base", "inversion_steps": target.sampling.steps,
             "generation_scheduler": scheduler, "images": len(ps.positives), "prompts": list(prompts_by_tag),
             "latent_std": {v: float(s.std()) for v, s in starts.items()}}  # fmt: skip
    return AttackResult(candidates=cands, patch=target.patch,
                        embeddings={f"inverted_{v}": s for v, s in starts.items()}, stats=stats)  # fmt: skip


def latent_inversion(target: AttackTarget, config: LatentInversionConfig) -> AttackResult:
    """Inverted latents, white-box (M-ErasureBench): a concept image DDIM-inverted through the erased model."""
    return inverted_latents(target, config, through_erased=True)


def latent_inversion_transfer(target: AttackTarget, config: LatentInversionConfig) -> AttackResult:
    """Inverted latents, black-box (M-ErasureBench): a concept image DDIM-inverted through the base model."""
    return inverted_latents(target, config, through_erased=False)


register_attack(
    "latent-inversion",
    LatentInversionConfig,
    presets={"paper": {}},
    summary=latent_inversion.__doc__.split("\n")[0],
)(latent_inversion)
register_attack(
    "latent-inversion-transfer",
    LatentInversionConfig,
    presets={"paper": {}},
    summary=latent_inversion_transfer.__doc__.split("\n")[0],
)(latent_inversion_transfer)
