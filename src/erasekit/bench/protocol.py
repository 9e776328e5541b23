"""The leaderboard's protocol: a dev/test split of the concepts, strength sweeps on dev, and the operating point.

- **Split.** All 24 MiniCanvas concepts, split once by a seeded draw (:func:`split_concepts`): per kind, the names
  are ordered by SHA-256 of ``"{seed}:{name}"`` and the first :data:`DEV_PER_KIND` go to *dev*, the rest to
  *test*. Hyper-parameters are chosen on dev only; the leaderboard reports test.
- **Sweep.** Each method names its strength knob (:class:`erasekit.registry.Strength`): a config field and a grid
  of values. Every grid point runs on every dev concept.
- **Operating point** (:func:`operating_point`, fixed before any run), per concept type, on the means over that
  type's dev concepts: among a method's grid points, the highest dev UA whose dev IRA and CRA are each within
  :data:`TOLERANCE` points of the base model's; when no point keeps both, the point with the highest
  UA + (IRA + CRA) / 2. Ties go to the weaker end of the grid (listed first). The chosen points are the method's
  ``tuned`` setting (one value per concept type, as the authors' presets differ per type), written to
  ``DIR/tuned.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.bench.entries import TUNED, Entry, Part, sample_concepts
from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_json

DEV_PER_KIND = 4
TOLERANCE = 5.0
TUNED_FILE = "tuned.json"
RULE = (
    f"per concept type, the highest dev UA with dev IRA and CRA each within {TOLERANCE:g} points of the base "
    "model; if no grid point keeps both, the highest UA + (IRA + CRA) / 2; ties go to the weaker end of the grid"
)


@dataclass(frozen=True)
class Split:
    """The concepts of each half, styles first."""

    seed: int
    dev: tuple[str, ...]
    test: tuple[str, ...]


def split_concepts(seed: int = 0, dev_per_kind: int = DEV_PER_KIND) -> Split:
    """The dev/test split of the 24 MiniCanvas concepts drawn by ``seed`` (see the module docstring)."""
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

    styles = sample_concepts(seed, len(STYLE_NAMES), 0, STYLE_NAMES, OBJECT_NAMES)
    objects = sample_concepts(seed, 0, len(OBJECT_NAMES), STYLE_NAMES, OBJECT_NAMES)
    dev = (*styles[:dev_per_kind], *objects[:dev_per_kind])
    test = (*styles[dev_per_kind:], *objects[dev_per_kind:])
    return Split(seed, dev, test)


def sweep_parts(method: str) -> list[Part]:
    """One part per value of the method's strength grid (none when the method names no knob)."""
    from erasekit.registry import METHODS

    spec = METHODS.get(method)
    knob = spec.strength
    if knob is None:
        return []
    return [Part(spec.name, knob.preset, (*knob.fixed, (knob.field, v))) for v in knob.grid]


@dataclass(frozen=True)
class Point:
    """One sweep point's dev means."""

    part: Part
    UA: float
    IRA: float
    CRA: float

    @property
    def retention(self) -> float:
        return (self.IRA + self.CRA) / 2


def operating_point(points: Sequence[Point], base_ira: float, base_cra: float) -> Point:
    """The rule of the module docstring (points in grid order, weakest first)."""
    if not points:
        raise ErasekitError("no finished sweep point to choose an operating point from")
    keep = [p for p in points if min(p.IRA - base_ira, p.CRA - base_cra) >= -TOLERANCE]
    if keep:
        return max(keep, key=lambda p: (p.UA, -points.index(p)))
    return max(points, key=lambda p: (p.UA + p.retention, -points.index(p)))


def write_tuned(
    root: Path,
    chosen: Mapping[str, Mapping[str, tuple[Point, Sequence[Point]]]],
    base: Mapping[str, Mapping[str, float]],
) -> None:
    """``DIR/tuned.json``: per method and concept type, the operating point, its dev numbers, the grid it came from
    and the base model's dev numbers, with the rule."""
    methods = {m: {kind: {"part": p.part.to_json(), "dev": _means(p), "grid": [_means(q) for q in grid]}
                   for kind, (p, grid) in kinds.items()} for m, kinds in chosen.items()}  # fmt: skip
    atomic_write_json(root / TUNED_FILE, {"rule": RULE, "base": {k: dict(v) for k, v in base.items()},
                                          "methods": methods})  # fmt: skip


def read_tuned(root: Path) -> dict[str, Part]:
    """``{method: Part}`` of ``DIR/tuned.json`` (aliased ``tuned``, one override set per concept type); empty when
    the sweep has not run."""
    file = root / TUNED_FILE
    if not file.is_file():
        return {}
    data = json.loads(file.read_text("utf-8"))
    out = {}
    for method, kinds in data["methods"].items():
        parts = {kind: Part.from_json(row["part"]) for kind, row in kinds.items()}
        preset = next(iter(parts.values())).preset
        typed = tuple((kind, p.overrides) for kind, p in parts.items())
        out[method] = Part(method, preset, (), TUNED, typed)
    return out


def tuned_setting(part: Part) -> str:
    """How a tuned part reads in the page: ``style: alpha=10; object: alpha=3 (from paper)``."""
    text = "; ".join(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in ov) for kind, ov in part.typed)
    return f"{text} (from {part.preset})" if text else part.preset


def _means(p: Point) -> dict[str, Any]:
    return {"label": p.part.label, "UA": p.UA, "IRA": p.IRA, "CRA": p.CRA}


def sweep_entries(methods: Sequence[str]) -> list[Entry]:
    """Every sweep point of every method that names a strength knob, as single-part entries."""
    return [Entry((part,)) for m in methods for part in sweep_parts(m)]
