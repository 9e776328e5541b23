"""The registries: methods, attacks and evaluation protocols are each a frozen config dataclass plus a function.

One :class:`Registry` class serves all three. An entry registers by a lowercase unique name with named presets;
a preset is a set of config overrides, optionally per concept type (``{"paper": {"style": {...}, "object":
{...}}}``), so ``paper`` can follow the authors' per-type settings. ``name:preset`` strings (the bench's rows, the
attack columns) are parsed and checked here. The CLI, the evaluation and the tests enumerate the registries.

This module also holds the method registry and :func:`erase`; the attack registry lives in
:mod:`erasekit.attacks`, the protocol registry in :mod:`erasekit.evaluation.protocols`.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from erasekit.concepts import CONCEPT_TYPES, check_type
from erasekit.errors import ErasekitError

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

__all__ = [
    "CONCEPT_TYPES",
    "Registry",
    "Spec",
    "erase",
    "erase_jointly",
    "get_method",
    "list_methods",
    "make_config",
    "register",
]


@dataclass(frozen=True)
class Strength:
    """A method's strength knob: the config field the leaderboard sweeps, and the values it tries.

    Attributes:
        field: the config field (steps, lr, η, λ, an erase scale...).
        grid: 4-6 values, weakest to strongest where that has a meaning.
        preset: the preset the sweep starts from (the knob is overridden on top of it).
        fixed: other ``(field, value)`` overrides every sweep point shares (e.g. RECE keeps its last round).
        joint: ``joint(model, concepts, configs) -> [Patch]``: erase several configs that differ only in
            :attr:`field` in one run that shares what they have in common (ESD's x_t and frozen predictions do
            not depend on η), each patch the one the method's own function makes for its config alone
            (:func:`erase_jointly`; the leaderboard's sweep uses it). ``None``: each setting is erased alone.
    """

    field: str
    grid: tuple[Any, ...]
    preset: str = "paper"
    fixed: tuple[tuple[str, Any], ...] = ()
    joint: Callable[..., list[Any]] | None = None

    def __post_init__(self) -> None:
        if not 2 <= len(self.grid) <= 8 or len(set(map(repr, self.grid))) != len(self.grid):
            raise ValueError(f"a strength grid needs 2 to 8 distinct values, got {self.grid!r}")


@dataclass(frozen=True)
class Spec:
    """A registered entry.

    Attributes:
        name: lowercase registry name (``hirm-r``).
        config_cls: frozen, keyword-only dataclass; each field has ``metadata={"help": ...}``.
        fn: the entry's function (a method's ``erase``, an attack, a protocol's run).
        presets: ``{preset: {field: value}}`` or ``{preset: {concept_type: {field: value}}}``.
        default_preset: used when none is named.
        summary: one line for the listings.
        strength: the knob the leaderboard's sweep varies (methods), or ``None``.
    """

    name: str
    config_cls: type
    fn: Callable[..., Any]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default_preset: str = "paper"
    summary: str = ""
    strength: Strength | None = None


S = TypeVar("S", bound=Spec)


class Registry(Generic[S]):
    """Entries of one kind (``method``, ``attack``, ``protocol``), loaded from an explicit list of modules.

    Args:
        kind: what the entries are (used in error messages).
        modules: the modules whose import registers the entries; imported on first lookup.
        spec_cls: the spec type (:class:`Spec` or a subclass with fields of its own).
        require_paper: every entry must have a ``paper`` preset (methods and attacks follow their authors).
        config_word: what a config is called in errors (an attack's is its ``budget``).
    """

    def __init__(
        self,
        kind: str,
        modules: Sequence[str],
        spec_cls: type[S] = Spec,
        require_paper: bool = True,
        config_word: str = "config",
    ) -> None:
        self.kind = kind
        self.modules = tuple(modules)
        self.spec_cls = spec_cls
        self.require_paper = require_paper
        self.config_word = config_word
        self._specs: dict[str, S] = {}

    def register(
        self,
        name: str,
        config_cls: type,
        presets: Mapping[str, Mapping[str, Any]] | None = None,
        default_preset: str = "paper",
        summary: str = "",
        **extra: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` as ``name``; ``extra`` fills the spec type's own fields."""
        if name != name.lower() or not name or ":" in name or "+" in name:
            raise ValueError(f"{self.kind} names are lowercase, non-empty, without ':' or '+': {name!r}")
        presets_ = {k: dict(v) for k, v in (presets or {default_preset: {}}).items()}
        if self.require_paper and "paper" not in presets_:
            raise ValueError(f"{self.kind} {name!r} needs a 'paper' preset")
        if default_preset not in presets_:
            raise ValueError(f"{name}: default preset {default_preset!r} is not among {sorted(presets_)}")

        knob = extra.get("strength")
        if knob is not None:
            names = {f.name for f in dataclasses.fields(config_cls)}
            if knob.field not in names or knob.preset not in presets_:
                raise ValueError(f"{name}: strength {knob} names no field or preset of the method")

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._specs:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            doc = summary or (fn.__doc__ or "").strip().split("\n")[0]
            self._specs[name] = self.spec_cls(name, config_cls, fn, presets_, default_preset, doc, **extra)
            return fn

        return deco

    def _load(self) -> None:
        for mod in self.modules:
            importlib.import_module(mod)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._specs)

    def get(self, name: str) -> S:
        """The spec called ``name``, or a one-line error listing the known names."""
        self._load()
        try:
            return self._specs[name.strip()]
        except KeyError:
            raise ErasekitError(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(sorted(self._specs))}"
            ) from None

    def check_preset(self, name: str, preset: str | None) -> str:
        """The preset's name (the default when ``None``), or an error listing the entry's presets."""
        spec = self.get(name)
        preset = preset or spec.default_preset
        if preset not in spec.presets:
            raise ErasekitError(
                f"{self.kind} {spec.name} has no preset {preset!r}; choose one of {', '.join(spec.presets)}"
            )
        return preset

    def parse(self, text: str) -> tuple[str, str]:
        """``name`` or ``name:preset`` -> ``(name, preset)``, both checked."""
        name, _, preset = text.partition(":")
        if not name.strip():
            raise ErasekitError(f"empty {self.kind} name in {text!r}")
        spec = self.get(name.strip())
        return spec.name, self.check_preset(spec.name, preset.strip() or None)

    def preset_values(self, name: str, preset: str | None, concept_type: str | None) -> dict[str, Any]:
        """The field values a preset gives for one concept type (shared values, then the type's own; only the
        shared ones when ``concept_type`` is ``None``)."""
        entry = self.get(name).presets[self.check_preset(name, preset)]
        common = {k: v for k, v in entry.items() if k not in CONCEPT_TYPES}
        own = entry.get(check_type(concept_type), {}) if concept_type is not None else {}
        return {**common, **own}

    def config(
        self,
        name: str,
        preset: str | None = None,
        concept_type: str | None = "style",
        overrides: Mapping[str, Any] | None = None,
    ) -> Any:
        """Build a config: dataclass defaults, then the preset for ``concept_type``, then ``overrides``.

        A config with a ``concept_type`` field gets ``concept_type`` unless the preset or overrides set it.
        """
        spec = self.get(name)
        values = self.preset_values(name, preset, concept_type)
        values.update(overrides or {})
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        if "concept_type" in fields and concept_type is not None:
            values.setdefault("concept_type", concept_type)
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ErasekitError(
                f"{self.kind} {spec.name} has no {self.config_word} key(s) {unknown}; "
                f"known: {', '.join(sorted(fields))}"
            )
        return build(spec.config_cls, values, f"{spec.name} {self.config_word}")

    def config_from_dict(self, name: str, data: Mapping[str, Any]) -> Any:
        """Rebuild a config saved by :func:`config_to_dict`; unknown keys are an error."""
        spec = self.get(name)
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ErasekitError(f"{name} config has unknown keys {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return build(spec.config_cls, values, f"{spec.name} {self.config_word}")


def build(config_cls: type, values: Mapping[str, Any], what: str) -> Any:
    """``config_cls(**values)``, with its validation errors as one-line user errors."""
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as e:
        raise ErasekitError(f"invalid {what}: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-ready data (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


# ---- methods ---------------------------------------------------------------------------------------------

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
    "erasekit.methods.race",
    "erasekit.methods.ant",
    "erasekit.methods.trce",
    "erasekit.methods.leace",
    "erasekit.methods.rlace",
    "erasekit.methods.all_but_one",
    "erasekit.methods.crce",
    "erasekit.methods.spm",
    "erasekit.methods.doco",
    "erasekit.methods.ace",
    "erasekit.methods.realera",
    "erasekit.methods.co_erasing",
    "erasekit.methods.receler",
    "erasekit.methods.itd",
    "erasekit.methods.unguide",
    "erasekit.methods.irece",
)
METHODS: Registry[Spec] = Registry("method", METHOD_MODULES)
register = METHODS.register
get_method = METHODS.get
list_methods = METHODS.names


def make_config(method: str, preset: str | None = None, concept_type: str = "style", **overrides: Any) -> Any:
    """A method's config: dataclass defaults, then the preset for ``concept_type``, then non-``None`` overrides."""
    return METHODS.config(method, preset, concept_type, {k: v for k, v in overrides.items() if v is not None})


def config_from_dict(method: str, data: Mapping[str, Any]) -> Any:
    """Rebuild a method config saved in a patch."""
    return METHODS.config_from_dict(method, data)


def erase(
    model: LoadedModel,
    concepts: Sequence[str],
    method: str,
    preset: str | None = None,
    concept_type: str = "style",
    config: Any | None = None,
    **overrides: Any,
) -> Any:
    """Run a registered method and return its Patch, with ``erase_seconds`` and provenance filled in.

    Args:
        model: a :class:`~erasekit.models.loading.LoadedModel`.
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
        method=spec.name,
        config=config_to_dict(config),
        concepts=tuple(concepts),
        base_model=getattr(model, "source", ""),
        erase_seconds=round(seconds, 4),
        provenance={**provenance(), "family": getattr(getattr(model, "family", None), "name", None)},
    )


def erase_jointly(
    model: LoadedModel, concepts: Sequence[str], method: str, configs: Sequence[Any]
) -> list[Any]:
    """Erase with each of ``configs`` (differing only in the method's strength knob) in one joint run.

    Each patch is the one :func:`erase` makes for its config alone (the method's ``Strength.joint`` is tested
    for it), with its provenance; its ``erase_seconds`` is the joint run's time divided by the number of
    configs (what a setting cost, shared).

    Raises:
        ErasekitError: the method has no joint eraser, or the configs differ in another field.
    """
    concepts = check_concepts(model, concepts)
    spec = get_method(method)
    knob = spec.strength
    if knob is None or knob.joint is None:
        raise ErasekitError(f"{spec.name} has no joint eraser: erase each setting alone")
    if not configs:
        raise ErasekitError("erase_jointly needs at least one config")
    rest = [{k: v for k, v in config_to_dict(c).items() if k != knob.field} for c in configs]
    if any(r != rest[0] for r in rest):
        raise ErasekitError(f"{spec.name}: jointly erased settings may differ only in {knob.field}")
    start = time.perf_counter()
    patches = knob.joint(model, concepts, list(configs))
    seconds = (time.perf_counter() - start) / len(configs)
    from erasekit.provenance import provenance

    made = {**provenance(), "family": getattr(getattr(model, "family", None), "name", None)}
    return [
        dataclasses.replace(
            p,
            method=spec.name,
            config=config_to_dict(c),
            concepts=tuple(concepts),
            base_model=getattr(model, "source", ""),
            erase_seconds=round(seconds, 4),
            provenance=made,
        )  # fmt: skip
        for p, c in zip(patches, configs, strict=True)
    ]


def check_concepts(model: LoadedModel | None, concepts: Sequence[str]) -> list[str]:
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
