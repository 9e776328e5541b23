"""Leaderboard entries (``method``, ``method:preset``, stacks ``a+b``), stacking, and concept sampling."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


def slug(text: str) -> str:
    """A file-name-safe form of an entry label or concept (``hirm-r:paper+uce:paper`` -> ``hirm-r_paper+uce_paper``)."""
    return re.sub(r"[^A-Za-z0-9+.-]+", "_", text).strip("_").lower() or "x"


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
    from erasekit.registry import get_method

    out: list[Entry] = []
    for text in methods:
        names = [p.strip() for p in text.split("+")]
        if not text.strip() or any(not n for n in names):
            raise ErasekitError(f"empty method in {text!r}")
        if len(names) == 1 and ":" not in names[0] and presets:
            spec = get_method(names[0])
            chosen = [p for p in presets if p in spec.presets] or [spec.default_preset]
            candidates = [Entry(((spec.name, p),)) for p in chosen]
        else:
            candidates = [Entry(tuple(_part(n) for n in names))]
        out += [e for e in candidates if e not in out]
    return out


def _part(text: str) -> tuple[str, str]:
    from erasekit.registry import get_method

    method, _, preset = text.partition(":")
    spec = get_method(method.strip())
    preset = preset.strip() or spec.default_preset
    if preset not in spec.presets:
        raise ErasekitError(
            f"method {spec.name} has no preset {preset!r}; choose one of {', '.join(spec.presets)}"
        )
    return spec.name, preset


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


def stack(patches: Sequence[Any], label: str = "") -> Any:
    """Compose patches that change disjoint tensors; overlapping ones are refused with a one-line error."""
    from erasekit.patch import Patch

    try:
        return Patch.compose(patches, merge=None)
    except ErasekitError as e:
        raise ErasekitError(f"cannot stack {label or 'these patches'}: {e}") from None
