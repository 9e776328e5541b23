"""HiRM (Lee, Kim, Hwang, ICLR 2026): High-Level Representation Misdirection, methods ``hirm-r`` and ``hirm-s``.

HiRM updates only the first block(s) of every CLIP text encoder of a model, supervised at a late point (the
last block's self-attention ``out_proj`` output by default): the concept's representation there is pushed to a
designated target, a scaled random vector (R) or a super-category's representation (S). The rest of the
diffusion model is untouched, so the patch also applies to other pipelines sharing the encoder (Flux).

Layout: ``config`` (dataclasses, presets), ``targets`` (prompts, hook, targets), ``train`` (the loop).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from erasekit.errors import ErasekitError
from erasekit.methods.hirm.config import (
    HIRM_R_DEFAULT,
    HIRM_S_PAPER_STEPS,
    HirmConfig,
    HirmSConfig,
    presets,
)
from erasekit.methods.hirm.train import TrainResult, trained, world_prompts
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

__all__ = ["HirmConfig", "HirmSConfig", "TrainResult", "erase_hirm", "trained"]


def erase_hirm(
    model: LoadedModel, concepts: Sequence[str], config: HirmConfig, method: str = "hirm"
) -> Patch:
    """Train every CLIP encoder of ``model`` and return one patch of the trained tensors.

    Args:
        model: a :class:`~erasekit.LoadedModel` (every encoder of ``model.clip_encoders()`` is trained, each
            with its own tokenizer, target width and optimizer).
        concepts: the concepts to erase. Several are trained jointly, or separately and averaged
            (``config.multi``).
        config: the HiRM config.
        method: the registry name recorded in the patch.
    """
    if config.multi == "average" and len(concepts) > 1:
        single = per_concept_config(concepts, config)
        parts = [_erase_joint(model, [c], single, method) for c in concepts]
        return Patch.compose(parts, merge="mean")
    return _erase_joint(model, concepts, config, method)


def per_concept_config(concepts: Sequence[str], config: HirmConfig) -> HirmConfig:
    """The config of each one-concept run of ``multi="average"``: the world prompts of *all* the concepts made
    explicit, so that no run keeps another erased concept at its frozen value."""
    if config.world_retain == "none":
        return config
    kept = tuple(dict.fromkeys((*config.retain_prompts, *world_prompts(concepts, config))))
    return dataclasses.replace(config, retain_prompts=kept, world_retain="none")


def _erase_joint(model: LoadedModel, concepts: Sequence[str], config: HirmConfig, method: str) -> Patch:
    encoders = model.clip_encoders()
    components, names, base = {}, {}, {}
    with contextlib.ExitStack() as stack:
        for comp, encoder, tokenizer in encoders:
            run = stack.enter_context(trained(encoder, tokenizer, concepts, config, desc=f"{method} {comp}"))
            components[comp], names[comp] = encoder, run.names
            base.update({f"{comp}/{n}": t for n, t in run.base.items()})
        return Patch.from_modules(components, names, base, method=method, concepts=tuple(concepts))


def _check_target(config: HirmConfig, method: str, target: str) -> None:
    if config.target != target:
        other = "hirm-s" if target == "random" else "hirm-r"
        raise ErasekitError(f"{method} uses target={target!r}; for target={config.target!r} use {other}")


@register(
    "hirm-r",
    HirmConfig,
    presets=presets(coefficient=5000.0, default_changes=HIRM_R_DEFAULT),
    default_preset="default",
    strength=Strength("steps", (25, 50, 75, 100, 150), preset="default"),
    summary="HiRM-R: train CLIP block 0 so the concept's last-block representation hits a random vector",
)
def erase_hirm_r(model: LoadedModel, concepts: Sequence[str], config: HirmConfig) -> Patch:
    """HiRM-R: misdirect toward ``c * U / ||U||``, ``U`` uniform random (seeded, CPU)."""
    _check_target(config, "hirm-r", "random")
    return erase_hirm(model, concepts, config, "hirm-r")


@register(
    "hirm-s",
    HirmSConfig,
    presets=presets(coefficient=1.0, steps=HIRM_S_PAPER_STEPS),
    default_preset="default",
    strength=Strength("steps", (40, 80, 160, 320, 640, 1280), preset="default"),
    summary="HiRM-S: train CLIP block 0 so the concept's last-block representation becomes a super-category's",
)
def erase_hirm_s(model: LoadedModel, concepts: Sequence[str], config: HirmConfig) -> Patch:
    """HiRM-S: misdirect toward ``c * rep(anchor)``; nudity: safe misdirection against a nudity vector."""
    _check_target(config, "hirm-s", "semantic")
    return erase_hirm(model, concepts, config, "hirm-s")
