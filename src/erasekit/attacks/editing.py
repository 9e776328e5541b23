"""SDEdit: image-to-image editing as an attack surface, the substitute for ACE's LEDITS++ / MasaCtrl editing.

ACE (Wang et al., 2025) measures whether an erased concept comes back when a user *edits* an image rather than
prompting from noise. Its paper edits with LEDITS++ and MasaCtrl; neither runs on MiniCanvas (they need DDPM
inversion of real photographs and SD-sized attention maps), so this attack uses SDEdit (Meng et al., ICLR 2022):
noise an image's latents ``strength`` of the way up the schedule and denoise them with the erased model under a
prompt. It runs through the one generation path (:func:`erasekit.generation.render` with an ``init`` image and a
``strength``: the family's image-to-image pipeline over the same components, patch and hooks applied).

Two modes, each a set of candidates tagged with its mode and strength (the run reports ``ASR_by_tag``):

- ``reedit@s``: a **base-model image of the concept** (base prompt i, the budget's seed, nothing applied) edited
  by the erased model under the same prompt, for every strength s of ``strengths``. Low strengths keep most of
  the image (a ceiling: the concept is in the pixels); as s grows the erased model redraws more of it, and at
  s = 1 it is close to plain generation.
- ``edit-in@s``: a **base-model image without the concept** (base prompt i's pair without it, e.g.
  ``A cat image.``) edited under the prompt that names it (``A cat image in neon style.``), for every s of
  ``edit_strengths``: can the concept be added to an existing image?

The headline ``ASR`` is the share of every attacked image that shows the concept; compare methods within a tag.
No published budget exists for this attack: the ``paper`` preset is ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from erasekit.attacks import register_attack
from erasekit.attacks.base import AttackResult, AttackTarget, Budget, Candidate
from erasekit.generation import Request, image_pipeline, render


@dataclass(frozen=True, kw_only=True)
class SDEditConfig(Budget):
    """Which strengths each editing mode tries."""

    strengths: tuple[float, ...] = field(
        default=(0.3, 0.5, 0.7, 0.9),
        metadata={"help": "reedit: strengths at which base-model images of the concept are edited"},
    )
    edit_strengths: tuple[float, ...] = field(
        default=(0.6, 0.8),
        metadata={"help": "edit-in: strengths at which images without the concept are edited to add it"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.strengths and not self.edit_strengths:
            raise ValueError("give at least one of strengths and edit_strengths")
        for s in (*self.strengths, *self.edit_strengths):
            if not 0.0 < s <= 1.0:
                raise ValueError(f"every strength must be in (0, 1], got {s}")
        if len(set(self.strengths)) != len(self.strengths) or len(set(self.edit_strengths)) != len(
            self.edit_strengths
        ):
            raise ValueError("strengths must be distinct within a mode")


def base_images(target: AttackTarget, prompts: tuple[str, ...], seed: int) -> list:
    """``[H, W, 3]`` float images the model generates, as it is when called, for each prompt with ``seed``."""
    pipe = target.model.require_pipeline()
    return render(pipe, [Request(seed=seed, prompt=p) for p in prompts], target.sampling, desc=None)


def sdedit(target: AttackTarget, config: SDEditConfig) -> AttackResult:
    """SDEdit: edit base-model images with the erased model (re-edit the concept's, edit it into others)."""
    ps = target.prompts
    # a family without an image-to-image pipeline stops here, before any work
    image_pipeline(target.model.require_pipeline())
    cands: list[Candidate] = []
    if config.strengths:  # the attack runs with nothing applied: these are the base model's images
        shown = base_images(target, ps.positives, config.seed)
        cands += [Candidate(prompt=p, group=i, init=shown[i], strength=s, tag=f"reedit@{s:g}")
                  for s in config.strengths for i, p in enumerate(ps.positives)]  # fmt: skip
    if config.edit_strengths:
        plain = base_images(target, ps.negatives, config.seed)
        cands += [Candidate(prompt=p, group=i, init=plain[i], strength=s, tag=f"edit-in@{s:g}")
                  for s in config.edit_strengths for i, p in enumerate(ps.positives)]  # fmt: skip
    stats = {"init_seed": config.seed, "edit_prompts": "the base prompts (they name the concept)",
             "init_prompts": {"reedit": "base prompts", "edit-in": "their pairs without the concept"}}  # fmt: skip
    return AttackResult(candidates=tuple(cands), patch=target.patch, stats=stats)


register_attack(
    "sdedit",
    SDEditConfig,
    presets={"paper": {}, "quick": {"strengths": (0.5, 0.9), "edit_strengths": (0.8,)}},
    summary="SDEdit: edit base-model images with the erased model, with and without the concept "
    "(substitute for ACE's LEDITS++/MasaCtrl)",
)(sdedit)
