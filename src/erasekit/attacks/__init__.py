"""Attacks that try to bring an erased concept back, registered by lowercase name.

An attack is a frozen budget dataclass plus ``fn(target, config) -> AttackResult`` (see
:mod:`erasekit.attacks.base`). :func:`erasekit.attacks.run.run_attack` runs one against a (patched) model,
generates with what it found, scores the images with the protocol's detector and writes ``RUN/metrics.json``
(key ``ASR``, percent). Budgets are named presets (``paper`` follows the authors), optionally per concept type,
exactly like method presets in :mod:`erasekit.registry`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from erasekit.errors import ErasekitError

CONCEPT_TYPES = ("style", "object", "nsfw")
# Modules whose import registers attacks; listed explicitly.
ATTACK_MODULES = (
    "erasekit.attacks.ring_a_bell",
    "erasekit.attacks.unlearndiffatk",
    "erasekit.attacks.textual_inversion",
    "erasekit.attacks.encoder_swap",
    "erasekit.attacks.probes",
)


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack.

    Attributes:
        name: lowercase registry name (``ring-a-bell``).
        config_cls: frozen, keyword-only budget dataclass; each field has ``metadata={"help": ...}``.
        fn: ``fn(target: AttackTarget, config) -> AttackResult``.
        presets: ``{preset: {field: value}}`` or ``{preset: {concept_type: {field: value}}}``.
        needs_pipeline: ``False`` when the attack itself runs on the text encoder alone.
        asr: which rate is the headline ``ASR``: ``images`` (share of attacked images that show the concept),
            ``any`` (share of base prompts with at least one such image) or ``pre+post`` (UnlearnDiffAtk's sum).
        summary: one line for ``erasekit attack --list``.
    """

    name: str
    config_cls: type
    fn: Callable[..., Any]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    needs_pipeline: bool = True
    asr: str = "images"
    summary: str = ""


ASR_RULES = ("images", "any", "pre+post")
_REGISTRY: dict[str, AttackSpec] = {}


def register_attack(
    name: str,
    config_cls: type,
    presets: Mapping[str, Mapping[str, Any]],
    *,
    needs_pipeline: bool = True,
    asr: str = "images",
    summary: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as attack ``name``; every attack has a ``paper`` preset."""
    if name != name.lower() or not name:
        raise ValueError(f"attack names are lowercase and non-empty: {name!r}")
    if "paper" not in presets:
        raise ValueError(f"attack {name!r} needs a 'paper' budget preset")
    if asr not in ASR_RULES:
        raise ValueError(f"attack {name!r}: asr must be one of {ASR_RULES}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"attack {name!r} registered twice")
        doc = summary or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = AttackSpec(name, config_cls, fn, dict(presets), needs_pipeline, asr, doc)
        return fn

    return deco


def _ensure_loaded() -> None:
    for mod in ATTACK_MODULES:
        importlib.import_module(mod)


def list_attacks() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_attack(name: str) -> AttackSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ErasekitError(
            f"unknown attack {name!r}; choose one of {', '.join(sorted(_REGISTRY))}"
        ) from None


def preset_values(spec: AttackSpec, preset: str, concept_type: str) -> dict[str, Any]:
    """The budget a preset gives for one concept type."""
    if preset not in spec.presets:
        raise ErasekitError(
            f"attack {spec.name} has no preset {preset!r}; choose one of {', '.join(spec.presets)}"
        )
    entry = spec.presets[preset]
    common = {k: v for k, v in entry.items() if k not in CONCEPT_TYPES}
    return {**common, **entry.get(concept_type, {})}


def make_budget(
    name: str, preset: str = "paper", concept_type: str = "style", overrides: Mapping[str, Any] | None = None
) -> Any:
    """An attack's budget: dataclass defaults, then the preset for ``concept_type``, then ``overrides``."""
    if concept_type not in CONCEPT_TYPES:
        raise ErasekitError(
            f"unknown concept type {concept_type!r}; choose one of {', '.join(CONCEPT_TYPES)}"
        )
    spec = get_attack(name)
    values = preset_values(spec, preset, concept_type)
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ErasekitError(
                f"attack {name} has no budget key {key!r}; known: {', '.join(sorted(fields))}"
            )
        values[key] = value
    try:
        return spec.config_cls(**values)
    except (TypeError, ValueError) as e:
        raise ErasekitError(f"invalid {name} budget: {e}") from None


def budget_dict(config: Any) -> dict[str, Any]:
    """A budget as JSON-ready data (tuples become lists)."""
    from erasekit.registry import json_ready

    return json_ready(dataclasses.asdict(config))


__all__ = [
    "ATTACK_MODULES",
    "AttackSpec",
    "budget_dict",
    "get_attack",
    "list_attacks",
    "make_budget",
    "preset_values",
    "register_attack",
]
