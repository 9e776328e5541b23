"""Leaderboard entries (``method``, ``method:preset``, stacks ``a+b``) and concept sampling."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from erasekit.concepts import slug
from erasekit.errors import ErasekitError

BASE = "base"
TUNED = "tuned"  # the preset name of a method's operating point, chosen on the dev concepts (bench.protocol)


@dataclass(frozen=True)
class Part:
    """One method's setting in an entry: a preset, optionally with config overrides (a sweep point).

    Attributes:
        method: registry name.
        preset: the preset the config starts from.
        overrides: ``((field, value), ...)`` applied on top of the preset.
        alias: the name shown instead of the preset and overrides (``tuned``).
        typed: ``((concept_type, ((field, value), ...)), ...)``: overrides for one concept type only, applied
            after ``overrides`` (a tuned setting is chosen per concept type).
    """

    method: str
    preset: str
    overrides: tuple[tuple[str, Any], ...] = ()
    alias: str | None = None
    typed: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    @property
    def label(self) -> str:
        if self.alias:
            return f"{self.method}:{self.alias}"
        extra = ",".join(f"{k}={v}" for k, v in self.overrides)
        return f"{self.method}:{self.preset}" + (f"[{extra}]" if extra else "")

    def config(self, concept_type: str) -> Any:
        """The method's config for one concept type."""
        from erasekit.registry import make_config

        own = dict(self.typed).get(concept_type, ())
        return make_config(self.method, self.preset, concept_type, **{**dict(self.overrides), **dict(own)})

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "preset": self.preset, "overrides": [list(o) for o in self.overrides],
                "alias": self.alias, "typed": {t: [list(o) for o in ov] for t, ov in self.typed}}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> Part:
        if isinstance(data, Mapping):
            typed = tuple((t, tuple(tuple(o) for o in ov)) for t, ov in (data.get("typed") or {}).items())
            return cls(data["method"], data["preset"], tuple(tuple(o) for o in data.get("overrides", ())),
                       data.get("alias"), typed)  # fmt: skip
        return cls(data[0], data[1])  # written as [method, preset] by older versions


@dataclass(frozen=True)
class Entry:
    """One leaderboard row: the parts whose patches are composed (none for ``base``)."""

    parts: tuple[Part, ...]

    @property
    def label(self) -> str:
        return "+".join(p.label for p in self.parts) or BASE

    @property
    def slug(self) -> str:
        return slug(self.label)


# ---- choosing what to run ------------------------------------------------------------------------------


def parse_entries(
    methods: Sequence[str], presets: Sequence[str] = (), tuned: Mapping[str, Part] | None = None
) -> list[Entry]:
    """Entries from ``method``, ``method:preset`` and ``a+b`` strings, checked against the registry.

    Args:
        methods: the entries as written on the command line.
        presets: for a single method written without a preset, one entry per listed preset the method has
            (its default preset when it has none of them; ``tuned`` when ``tuned`` has the method). Stacked parts
            without a preset take the default.
        tuned: ``{method: Part}``: the operating points ``method:tuned`` stands for.

    Returns:
        The entries in order, without duplicates.
    """
    from erasekit.registry import METHODS

    out: list[Entry] = []
    for text in methods:
        names = [p.strip() for p in text.split("+")]
        if not text.strip() or any(not n for n in names):
            raise ErasekitError(f"empty method in {text!r}")
        if len(names) == 1 and ":" not in names[0] and presets:
            spec = METHODS.get(names[0])
            have = set(spec.presets) | ({TUNED} if spec.name in (tuned or {}) else set())
            chosen = [p for p in presets if p in have] or [spec.default_preset]
            candidates = [Entry((_part(f"{spec.name}:{p}", tuned),)) for p in chosen]
        else:
            candidates = [Entry(tuple(_part(n, tuned) for n in names))]
        out += [e for e in candidates if e not in out]
    return out


def _part(text: str, tuned: Mapping[str, Part] | None) -> Part:
    from erasekit.registry import METHODS

    name, _, preset = text.partition(":")
    if preset.strip() == TUNED:
        spec = METHODS.get(name.strip())
        if spec.name not in (tuned or {}):
            raise ErasekitError(
                f"{spec.name} has no tuned setting yet: run the sweep first (erasekit bench --sweep)"
            )
        return tuned[spec.name]
    return Part(*METHODS.parse(text))


def check_stack(entry: Entry) -> None:
    """Refuse a stack that names one method twice (its parts would change the same tensors)."""
    methods = [p.method for p in entry.parts]
    if len(set(methods)) != len(methods):
        raise ErasekitError(f"cannot stack {entry.label}: it names a method twice")


def sample_concepts(
    seed: int, n_styles: int, n_objects: int, styles: Sequence[str], objects: Sequence[str]
) -> list[str]:
    """``n_styles`` styles then ``n_objects`` objects, chosen by ``seed`` (stable across versions and machines).

    Each pool is ordered by SHA-256 of ``"{seed}:{name}"`` and the first names are taken, so the choice depends
    on nothing but the seed and the names.
    """
    picked = []
    for pool, n, kind in ((styles, n_styles, "styles"), (objects, n_objects, "objects")):
        if not 0 <= n <= len(pool):
            raise ErasekitError(f"cannot choose {n} {kind} from the {len(pool)} there are")
        order = sorted(pool, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest())
        picked += order[:n]
    return picked
