"""Encoder swap: with open weights anyone can put the base model's text encoder back.

The attack drops every tensor of the patch that lives in a text encoder (the family's CLIP and T5 encoders)
and keeps the rest (UNet-side edits), then generates the plain concept prompts. HiRM alone should fall to the
base model's rate; HiRM stacked with a UNet-side method should not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from erasekit.attacks import register_attack
from erasekit.attacks.base import AttackResult, AttackTarget, Budget, Candidate
from erasekit.patch import Patch, split_key

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


@dataclass(frozen=True, kw_only=True)
class EncoderSwapConfig(Budget):
    """Encoder swap has no search: its budget is the number of base prompts (and seeds, set by the run)."""


def text_encoder_components(model: LoadedModel) -> set[str]:
    """Every text-encoder component name of the model's family (CLIP and T5)."""
    family = model.family
    return set(family.clip_encoders) | set(family.other_encoders)


def without_components(patch: Patch, components: Iterable[str]) -> Patch | None:
    """``patch`` minus its tensors in ``components``; ``None`` when nothing is left."""
    drop = set(components)
    keep = [k for k in patch.tensors if split_key(k)[0] not in drop]
    if not keep:
        return None
    return dataclasses.replace(
        patch,
        tensors={k: patch.tensors[k] for k in keep},
        fingerprints={k: patch.fingerprints[k] for k in keep},
    )


def encoder_swap(target: AttackTarget, config: EncoderSwapConfig) -> AttackResult:
    """Encoder swap: drop the patch's text-encoder tensors (keep UNet-side ones) and generate the concept."""
    patch = target.patch
    kept = without_components(patch, text_encoder_components(target.model)) if patch is not None else None
    dropped = len(patch.tensors) - (len(kept.tensors) if kept else 0) if patch is not None else 0
    candidates = tuple(Candidate(prompt=p, group=i) for i, p in enumerate(target.prompts.positives))
    stats = {"dropped_tensors": dropped, "kept_tensors": len(kept.tensors) if kept else 0,
             "kept_components": kept.components if kept else []}  # fmt: skip
    return AttackResult(candidates=candidates, patch=kept, stats=stats)


register_attack(
    "encoder-swap",
    EncoderSwapConfig,
    presets={"paper": {}},
    summary="Encoder swap: put the base text encoder back, keep UNet-side edits, generate the concept",
)(encoder_swap)
