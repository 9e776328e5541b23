"""Encoder swap: with open weights anyone can put the base model's text encoder back.

The attack drops every tensor of the patch that lives in a text encoder (the family's CLIP and T5 encoders)
and keeps the rest (UNet-side edits), then generates the plain concept prompts. HiRM alone should fall to the
base model's rate; HiRM stacked with a UNet-side method should not.

A hooked artifact loses the same way everything it puts in a text encoder: its tensors there, its added modules
attached there, and its hooks that modify a text encoder (that is what swapping the encoder means). Hooks that
only read the encoder stay: SPM's Facilitated Transport then measures prompts with the base encoder, as the
release computes it. The attack generates with what is left, so it sees the hooked pipeline, not the bare base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from erasekit.attacks import register_attack
from erasekit.attacks.base import AttackResult, AttackTarget, Budget, Candidate
from erasekit.hooked import HookedPatch
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


def without_components(patch: Patch | HookedPatch, components: Iterable[str]) -> Patch | HookedPatch | None:
    """``patch`` minus its tensors (and a hooked artifact's modules and modifying hooks) in ``components``;
    ``None`` when nothing is left."""
    if isinstance(patch, HookedPatch):
        return patch.without_components(components)
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
    if isinstance(patch, HookedPatch):
        left = kept if isinstance(kept, HookedPatch) else None
        stats["dropped_modules"] = len(patch.modules) - (len(left.modules) if left else 0)
        stats["kept_hooks"] = [h.name for h in left.hooks] if left else []
    return AttackResult(candidates=candidates, patch=kept, stats=stats)


register_attack(
    "encoder-swap",
    EncoderSwapConfig,
    presets={"paper": {}},
    summary="Encoder swap: put the base text encoder back, keep UNet-side edits, generate the concept",
)(encoder_swap)
