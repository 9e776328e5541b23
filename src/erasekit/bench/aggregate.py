"""What a leaderboard shows, and the arithmetic over its cells: means and 95% bootstrap intervals per entry and
concept type (:mod:`erasekit.bench.stats`: over concepts, and over each concept's evaluation seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from erasekit.bench.layout import AttackCell, Cell
from erasekit.bench.stats import Estimate, estimate

KINDS = ("style", "object")
# (column key, header, decimals); the first four are percentages from the evaluation.
COLUMNS = (
    ("UA", "UA ↑", 1),
    ("IRA", "IRA ↑", 1),
    ("CRA", "CRA ↑", 1),
    ("UA_synonyms", "UA on synonyms ↑", 1),
    ("erase_seconds", "erase (s)", 1),
    ("peak_memory_mb", "peak memory (MiB)", 0),
)
PERCENT = ("UA", "IRA", "CRA", "UA_synonyms")


@dataclass(frozen=True, kw_only=True)
class Board:
    """Everything a leaderboard page shows.

    Attributes:
        labels: the entries in row order, ``base`` first.
        concepts: ``{kind: [concept, ...]}`` for ``style`` and ``object``.
        cells: the finished cells.
        not_run: ``{label: reason}`` for entries deliberately not run (shown as such).
        failed: ``{(label, concept): reason}`` of cells that failed (they count as missing).
        command: the exact command that reproduces the board.
        notes: extra lines for the page (settings, hardware).
        attacks: the attack columns' labels, in order.
        attack_cells: the finished attack cells.
    """

    labels: tuple[str, ...]
    concepts: dict[str, list[str]]
    cells: list[Cell]
    not_run: dict[str, str] = field(default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    command: str = ""
    notes: tuple[str, ...] = ()
    attacks: tuple[str, ...] = ()
    attack_cells: list[AttackCell] = field(default_factory=list)

    def cell(self, label: str, concept: str) -> Cell | None:
        return next((c for c in self.cells if c.entry == label and c.concept == concept), None)

    def attack_cell(self, attack: str, label: str, concept: str) -> AttackCell | None:
        return next(
            (c for c in self.attack_cells if (c.attack, c.entry, c.concept) == (attack, label, concept)), None
        )

    def run_labels(self) -> list[str]:
        return [label for label in self.labels if label not in self.not_run]

    def all_concepts(self) -> list[str]:
        return [c for kind in KINDS for c in self.concepts.get(kind, [])]

    def missing(self) -> list[tuple[str, str]]:
        """``(label, concept)`` of every cell that should exist and does not (not-run entries excluded)."""
        labels, concepts = self.run_labels(), self.all_concepts()
        cells = [(label, c) for label in labels for c in concepts if self.cell(label, c) is None]
        attacks = [(f"{label} / {attack}", c) for attack in self.attacks for label in labels for c in concepts
                   if self.attack_cell(attack, label, c) is None]  # fmt: skip
        return cells + attacks


def cell_values(cell: Cell, key: str) -> list[float]:
    """A column's values in one cell: a score on each evaluation seed (the pooled score for cells without
    per-seed numbers), or the erase cost."""
    if key in PERCENT:
        seeds = [v for v in (s.get(key) for s in cell.per_seed.values()) if v is not None]
        pooled = cell.scores.get(key)
        return seeds or ([float(pooled)] if pooled is not None else [])
    value = getattr(cell, key)
    return [float(value)] if isinstance(value, (int, float)) else []


def aggregate(board: Board) -> dict[str, dict[str, dict[str, Any]]]:
    """``{label: {kind: {"n": finished, "of": total, key: Estimate}}}`` over each kind's concepts."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label in board.labels:
        out[label] = {}
        for kind in KINDS:
            concepts = board.concepts.get(kind, [])
            cells = [c for c in (board.cell(label, x) for x in concepts) if c is not None]
            row: dict[str, Any] = {"n": len(cells), "of": len(concepts)}
            for key, _, _ in COLUMNS:
                row[key] = estimate([cell_values(c, key) for c in cells])
            out[label][kind] = row
    return out


def table_rows(board: Board, kind: str, stats: dict[str, Any] | None = None) -> list[list[str]]:
    """One row per entry for one concept type: label, concepts done, then every column."""
    stats = stats or aggregate(board)
    rows = []
    for label in board.labels:
        if label in board.not_run:
            rows.append([label, f"not run: {board.not_run[label]}"] + ["–"] * len(COLUMNS))
            continue
        row = stats[label][kind]
        rows.append([label, f"{row['n']}/{row['of']}"] + [row[k].fmt(d) for k, _, d in COLUMNS])
    return rows


def attack_estimate(board: Board, attack: str, label: str, concepts: list[str]) -> tuple[Estimate, int]:
    """The column's number (ASR; EraseEval × 100) over ``concepts`` (with its interval over concepts) and how many
    of their cells finished."""
    cells = [board.attack_cell(attack, label, c) for c in concepts]
    values = [[float(c.value)] for c in cells if c is not None and c.value is not None]
    return estimate(values), sum(c is not None for c in cells)


def attack_rows(board: Board, kind: str) -> list[list[str]]:
    """One row per entry: each attack's mean ASR over the kind's concepts with its interval, and ``(n/of)``."""
    concepts = board.concepts.get(kind, [])
    rows = []
    for label in board.run_labels():
        row = [label]
        for attack in board.attacks:
            est, done = attack_estimate(board, attack, label, concepts)
            row.append(est.fmt(1) + ("" if done == len(concepts) else f" ({done}/{len(concepts)})"))
        rows.append(row)
    return rows


def attack_header(board: Board) -> list[str]:
    """The attack tables' header: ``name:preset ASR ↓`` (the whole label where two columns share a name);
    ``EraseEval ×100 ↑`` for the EraseEval column."""
    from erasekit.bench.attacks import is_eraseeval

    short = [a.split(" (")[0] for a in board.attacks]
    names = short if len(set(short)) == len(short) else list(board.attacks)
    return [
        "method",
        *("EraseEval ×100 ↑" if is_eraseeval(a) else f"{n} ASR ↓" for n, a in zip(names, board.attacks)),
    ]


def attack_budgets(board: Board) -> str:
    """One line naming each attack column's budget overrides (the full budgets are in every cell's JSON)."""
    return "Attack budgets, the same for every method: " + "; ".join(f"`{a}`" for a in board.attacks) + "."


def attack_title(board: Board) -> str:
    """What the attack table's numbers are."""
    from erasekit.bench.attacks import is_eraseeval

    if any(is_eraseeval(a) for a in board.attacks):
        return "ASR %; EraseEval's combined score × 100"
    return "ASR %"
