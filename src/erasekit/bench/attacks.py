"""Attacks in the leaderboard: every entry's patch, on every concept, faces the same attacks and budgets.

An attack column is one :class:`BenchAttack` (attack, budget preset, budget overrides, images per candidate).
Its cells live beside the evaluation cells::

    DIR/attacks/<attack-key>/<entry>/<concept>.json   the cell: ASR and the run it came from
    DIR/attack-runs/<attack-key>/<entry>/<concept>/   the attack run (prompts/embeddings, images, metrics)

``<attack-key>`` names the attack and preset and hashes the resolved budget and seeds, so a rerun with another
budget never mixes with the old cells.

One column is not an attack: **EraseEval** (``--eraseeval``; :mod:`erasekit.evaluation.protocols.eraseeval`)
runs the ``eraseeval`` protocol on each cell's patch and shows its combined score × 100 (higher is better). It
lives among the attack columns because it is computed the same way: once per entry and concept, on the patch,
resumable, and shared by entries with the very same patch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from erasekit.errors import ErasekitError


@dataclass(frozen=True)
class BenchAttack:
    """One attack column of the leaderboard.

    Attributes:
        name: registry name (``erasekit attacks``).
        preset: budget preset.
        budget: field overrides, as ``(key, value)`` pairs.
        seeds: images per adversarial candidate.
    """

    name: str
    preset: str = "paper"
    budget: tuple[tuple[str, Any], ...] = ()
    seeds: int = 2

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.budget)
        return f"{self.name}:{self.preset}" + (f" ({extra})" if extra else "")

    def resolved(self, concept_type: str) -> dict[str, Any]:
        """The full budget this column runs with for one concept type (EraseEval: its protocol's options)."""
        from erasekit.attacks import budget_dict, make_budget

        if self.name == ERASEEVAL:
            return dict(self.budget)
        return budget_dict(make_budget(self.name, self.preset, concept_type, dict(self.budget)))

    @property
    def key(self) -> str:
        """A folder name: attack, preset, and a hash of the resolved budgets (both types) and seeds."""
        from erasekit.concepts import slug

        text = json.dumps(
            {"style": self.resolved("style"), "object": self.resolved("object"), "seeds": self.seeds},
            sort_keys=True,
            default=str,
        )
        return f"{slug(self.name)}-{slug(self.preset)}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


ERASEEVAL = "eraseeval"


def eraseeval_column(seeds: int = 2, grid_seeds: int = 1, combine: str = "geometric") -> BenchAttack:
    """The EraseEval column: the ``eraseeval`` protocol with these options (its defaults) on every cell."""
    from erasekit.evaluation.protocols.eraseeval import EraseEvalProtocol

    EraseEvalProtocol(target="x", seeds=seeds, grid_seeds=grid_seeds, combine=combine)  # checks the options
    budget = (("combine", combine), ("grid_seeds", grid_seeds), ("seeds", seeds))
    return BenchAttack(ERASEEVAL, "minicanvas", budget, seeds)


def is_eraseeval(label: str) -> bool:
    """Whether a column label is the EraseEval column's."""
    return label.split(":")[0] == ERASEEVAL


def parse_attacks(names: Sequence[str], budget: Sequence[str] = (), seeds: int = 2) -> list[BenchAttack]:
    """Attack columns from ``name`` / ``name:preset`` strings and shared budget overrides.

    ``KEY=VALUE`` applies to every listed attack whose budget has that field, and must fit at least one;
    ``NAME.KEY=VALUE`` applies only to the attack ``NAME`` and wins over an unscoped ``KEY=VALUE``.
    """
    from erasekit.attacks import ATTACKS, get_attack, make_budget
    from erasekit.overrides import override_key, parse_overrides

    if seeds < 1:
        raise ErasekitError("--attack-seeds must be >= 1")
    specs = []
    for text in names:
        name, preset = ATTACKS.parse(text)
        specs.append((get_attack(name), preset))
    shared, scoped = _split_budget(budget, {spec.name for spec, _ in specs})
    used: set[str] = set()
    out = []
    for spec, preset in specs:
        fields = set(spec.config_cls.__dataclass_fields__)
        mine = [item for item in shared if override_key(item) in fields]
        used.update(mine)
        overrides = parse_overrides(mine, spec.config_cls, "--attack-budget")
        overrides.update(parse_overrides(scoped.get(spec.name, []), spec.config_cls, "--attack-budget"))
        for kind in ("style", "object"):
            make_budget(spec.name, preset, kind, overrides)  # every budget error before any run
        out.append(BenchAttack(spec.name, preset, tuple(sorted(overrides.items())), seeds))
    unused = [item for item in shared if item not in used]
    if unused:
        raise ErasekitError(f"--attack-budget {unused[0]!r} fits none of the attacks {', '.join(names)}")
    if len({a.key for a in out}) != len(out):
        raise ErasekitError("an attack is listed twice with the same budget")
    return out


def _split_budget(budget: Sequence[str], listed: set[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Unscoped ``KEY=VALUE`` items, and ``NAME.KEY=VALUE`` items by attack name (``NAME.`` removed)."""
    shared: list[str] = []
    scoped: dict[str, list[str]] = {}
    for item in budget:
        head, sep, value = item.partition("=")
        name, dot, key = head.partition(".")
        if not dot:
            shared.append(item)
            continue
        name = name.strip()
        if name not in listed:
            raise ErasekitError(
                f"--attack-budget {item!r} names attack {name!r}, which is not among --attacks "
                f"({', '.join(sorted(listed))})"
            )
        scoped.setdefault(name, []).append(key + sep + value)
    return shared, scoped
