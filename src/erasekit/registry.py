"""The explicit method registry: a method is a frozen config dataclass plus ``erase(model, concepts, config)``.

Methods register by a lowercase unique name together with their named presets. A preset is a set of config
overrides, optionally per concept type (``style``, ``object``, ``nsfw``), so ``paper`` can follow the authors'
per-type step counts. The CLI, the evaluation and the tests enumerate this registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from erasekit.errors import ErasekitError

CONCEPT_TYPES = ("style", "object", "nsfw")
# Modules whose import registers methods; listed explicitly, no import-time discovery magic.
METHOD_MODULES = (
    "erasekit.methods.hirm",
    "erasekit.methods.esd",
    "erasekit.methods.uce",
    "erasekit.methods.rece",
    "erasekit.methods.speed",
    "erasekit.methods.advunlearn",
    "erasekit.methods.fewshot_te",
    "erasekit.methods.mace_cfr",
    "erasekit.methods.ablations",
)

EraseFn = Callable[..., Any]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: lowercase registry name (``hirm-r``).
        config_cls: frozen, keyword-only dataclass; each field has ``metadata={"help": ...}``.
        fn: ``fn(model, concepts, config) -> Patch``.
        presets: ``{preset: {field: value}}`` or ``{preset: {concept_type: {field: value}}}``.
        default_preset: used when none is named.
        summary: one line for ``erasekit methods``.
    """

    name: str
    config_cls: type
    fn: EraseFn
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default_preset: str = "paper"
    summary: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    config_cls: type,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    default_preset: str = "paper",
    summary: str = "",
) -> Callable[[EraseFn], EraseFn]:
    """Decorator registering ``fn`` under ``name``."""
    if name != name.lower() or not name:
        raise ValueError(f"method names are lowercase and non-empty: {name!r}")

    def deco(fn: EraseFn) -> EraseFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        presets_ = dict(presets or {"paper": {}})
        if default_preset not in presets_:
            raise ValueError(f"{name}: default preset {default_preset!r} is not among {sorted(presets_)}")
        _REGISTRY[name] = MethodSpec(
            name,
            config_cls,
            fn,
            presets_,
            default_preset,
            summary or (fn.__doc__ or "").strip().split("\n")[0],
        )
        return fn

    return deco


def _ensure_loaded() -> None:
    for mod in METHOD_MODULES:
        importlib.import_module(mod)


def list_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ErasekitError(
            f"unknown method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}"
        ) from None


def preset_overrides(spec: MethodSpec, preset: str | None, concept_type: str) -> dict[str, Any]:
    """The overrides a preset gives for one concept type."""
    preset = preset or spec.default_preset
    if preset not in spec.presets:
        raise ErasekitError(
            f"method {spec.name} has no preset {preset!r}; choose one of {', '.join(spec.presets)}"
        )
    entry = spec.presets[preset]
    if any(k in CONCEPT_TYPES for k in entry):
        common = {k: v for k, v in entry.items() if k not in CONCEPT_TYPES}
        return {**common, **entry.get(concept_type, {})}
    return dict(entry)


def make_config(method: str, preset: str | None = None, concept_type: str = "style", **overrides: Any) -> Any:
    """Build a method's config: dataclass defaults, then the preset for ``concept_type``, then ``overrides``."""
    if concept_type not in CONCEPT_TYPES:
        raise ErasekitError(
            f"unknown concept type {concept_type!r}; choose one of {', '.join(CONCEPT_TYPES)}"
        )
    spec = get_method(method)
    values = preset_overrides(spec, preset, concept_type)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    if "concept_type" in names:
        values.setdefault("concept_type", concept_type)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ErasekitError(f"method {method} has no option(s) {unknown}")
    try:
        return spec.config_cls(**values)
    except (TypeError, ValueError) as e:
        raise ErasekitError(f"invalid {method} config: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-ready data (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def config_from_dict(method: str, data: Mapping[str, Any]) -> Any:
    """Rebuild a config saved by :func:`config_to_dict`; unknown keys are an error."""
    spec = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ErasekitError(f"{method} config has unknown keys {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return spec.config_cls(**values)


def json_ready(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def erase(
    model: Any,
    concepts: Sequence[str],
    method: str,
    preset: str | None = None,
    concept_type: str = "style",
    config: Any | None = None,
    **overrides: Any,
) -> Any:
    """Run a registered method and return its Patch, with ``erase_seconds`` and provenance filled in.

    Args:
        model: a :class:`~erasekit.LoadedModel`.
        concepts: the concept strings to erase (non-empty, each non-blank).
        method: registry name.
        preset: preset name (the method's default when ``None``).
        concept_type: ``style``, ``object`` or ``nsfw``.
        config: a ready config; when given, ``preset`` and ``overrides`` are ignored.
    """
    concepts = check_concepts(model, concepts)
    spec = get_method(method)
    config = config or make_config(method, preset, concept_type, **overrides)
    start = time.perf_counter()
    patch = spec.fn(model, concepts, config)
    seconds = time.perf_counter() - start
    from erasekit.provenance import provenance

    return dataclasses.replace(
        patch,
        method=method,
        config=config_to_dict(config),
        concepts=tuple(concepts),
        base_model=getattr(model, "source", ""),
        erase_seconds=round(seconds, 4),
        provenance={**provenance(), "family": getattr(getattr(model, "family", None), "name", None)},
    )


def check_concepts(model: Any, concepts: Sequence[str]) -> list[str]:
    """Strip concepts and refuse empty ones, or ones the model's CLIP tokenizers would truncate."""
    concepts = [c.strip() for c in concepts]
    if not concepts or any(not c for c in concepts):
        raise ErasekitError("a concept must be a non-empty string")
    encoders = model.clip_encoders() if model is not None else []
    for _, _, tok in encoders:
        if tok is None:
            continue
        limit = tok.model_max_length
        for c in concepts:
            n = len(tok(c, truncation=False).input_ids)
            if n > limit:
                raise ErasekitError(
                    f"concept {c[:40]!r}... is {n} tokens; the text encoder reads {limit}, so it would be truncated"
                )
    return concepts
