"""Leaderboard entries (``method``, ``method:preset``, stacks ``a+b``) and concept sampling."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from erasekit.concepts import slug
from erasekit.errors import ErasekitError

BASE = "base"


@dataclass(frozen=True)
class Entry:
    """One leaderboard row: the (method, preset) parts whose patches are composed (none for ``base``)."""

    parts: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        return "+".join(f"{m}:{p}" for m, p in self.parts) or BASE

    @property
    def slug(self) -> str:
        return slug(self.label)


# ---- choosing what to run ------------------------------------------------------------------------------


def parse_entries(methods: Sequence[str], presets: Sequence[str] = ()) -> list[Entry]:
    """Entries from ``method``, ``method:preset`` and ``a+b`` strings, checked against the registry.

    Args:
        methods: the entries as written on the command line.
        presets: for a single method written without a preset, one entry per listed preset the method has
            (its default preset when it has none of them). Stacked parts without a preset take the default.

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
            chosen = [p for p in presets if p in spec.presets] or [spec.default_preset]
            candidates = [Entry(((spec.name, p),)) for p in chosen]
        else:
            candidates = [Entry(tuple(METHODS.parse(n) for n in names))]
        out += [e for e in candidates if e not in out]
    return out


def check_stack(entry: Entry) -> None:
    """Refuse a stack that names one method twice (its parts would change the same tensors)."""
    methods = [m for m, _ in entry.parts]
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
