"""Attacks that try to bring an erased concept back, registered by lowercase name.

An attack is a frozen budget dataclass plus ``fn(target, config) -> AttackResult`` (see
:mod:`erasekit.attacks.base`). :func:`erasekit.attacks.run.run_attack` runs one against a (patched) model,
generates with what it found, scores the images with the protocol's detector and writes ``RUN/metrics.json``
(key ``ASR``, percent). Budgets are named presets (``paper`` follows the authors), optionally per concept type,
exactly like method presets in :mod:`erasekit.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from erasekit.registry import Registry, Spec, config_to_dict

# Modules whose import registers attacks; listed explicitly.
ATTACK_MODULES = (
    "erasekit.attacks.ring_a_bell",
    "erasekit.attacks.unlearndiffatk",
    "erasekit.attacks.textual_inversion",
    "erasekit.attacks.latent_inversion",
    "erasekit.attacks.encoder_swap",
    "erasekit.attacks.probes",
    "erasekit.attacks.editing",
)
ASR_RULES = ("images", "any", "pre+post")


@dataclass(frozen=True)
class AttackSpec(Spec):
    """A registered attack (see :class:`~erasekit.registry.Spec`; its config is the attack's budget).

    Attributes:
        needs_pipeline: ``False`` when the attack itself runs on the text encoder alone.
        asr: which rate is the headline ``ASR``: ``images`` (share of attacked images that show the concept),
            ``any`` (share of base prompts with at least one such image) or ``pre+post`` (UnlearnDiffAtk's sum).
    """

    needs_pipeline: bool = True
    asr: str = "images"


ATTACKS: Registry[AttackSpec] = Registry("attack", ATTACK_MODULES, AttackSpec, config_word="budget")
get_attack = ATTACKS.get
list_attacks = ATTACKS.names


def register_attack(
    name: str,
    config_cls: type,
    presets: Mapping[str, Mapping[str, Any]],
    *,
    needs_pipeline: bool = True,
    asr: str = "images",
    summary: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as attack ``name``; every attack has a ``paper`` budget preset."""
    if asr not in ASR_RULES:
        raise ValueError(f"attack {name!r}: asr must be one of {ASR_RULES}")
    return ATTACKS.register(
        name, config_cls, presets, summary=summary, needs_pipeline=needs_pipeline, asr=asr
    )


def make_budget(
    name: str, preset: str = "paper", concept_type: str = "style", overrides: Mapping[str, Any] | None = None
) -> Any:
    """An attack's budget: dataclass defaults, then the preset for ``concept_type``, then ``overrides``."""
    return ATTACKS.config(name, preset, concept_type, overrides)


def budget_dict(config: Any) -> dict[str, Any]:
    """A budget as JSON-ready data (tuples become lists)."""
    return config_to_dict(config)


__all__ = [
    "ATTACKS",
    "ATTACK_MODULES",
    "AttackSpec",
    "budget_dict",
    "get_attack",
    "list_attacks",
    "make_budget",
    "register_attack",
]
