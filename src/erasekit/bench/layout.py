"""The leaderboard directory: where every file lives, and the typed cells read from and written to it.

::

    DIR/bench.json                                what identifies the results, and the last command
    DIR/patches/<method>-<config hash>/<concept>/  each single method's patch (reused by stacks and twins)
    DIR/patches/<method>-<config hash>/<concept>.json   its cost: erase seconds and peak memory
    DIR/runs/<entry>/<concept>/                   the evaluation run (images, manifest, metrics, record)
    DIR/cells/<entry>/<concept>.json              the cell; its presence marks the cell finished
    DIR/attacks/<attack key>/<entry>/<concept>.json    an attack cell
    DIR/attack-runs/<attack key>/<entry>/<concept>/    the attack run (prompts, images, metrics)
    DIR/attack-sheets/<attack key>.png            each attack column's first images per entry and concept
    DIR/leaderboard.md, DIR/report.html           the tables and the page

Every file is written atomically; a cell is written last, after everything it points to.

A **results copy** (``--results DIR``) holds the light part of a directory: ``bench.json``, ``tuned.json``,
``timing.json``, the cells, the attack cells, the erasure costs, ``leaderboard.md`` and ``frontier.png``: no
images and no patches, a few hundred kB that can be committed. A bench given one first takes every finished cell
it lacks from it (those cells are not recomputed), and at the end writes its own cells back, so results gathered
by different machines or sessions add up. Cells read back from a copy have no run directory: the page shows no
images for them, and a tuned row or an attack re-erases its patch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasekit.bench.entries import Part
from erasekit.bench.timing import TIMING_FILE, merge_timing
from erasekit.concepts import slug
from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_bytes, atomic_write_json, normal, read_json

BENCH_FILE = "bench.json"
# The files a results copy keeps (relative to the leaderboard directory); timing.json is merged, not copied.
RESULT_FILES = ("bench.json", "tuned.json", "cells/*/*.json", "attacks/*/*/*.json", "patches/*/*.json")
RESULT_PAGES = ("leaderboard.md", "frontier.png")
# The leaderboard's numbers and where each sits in an evaluation's metrics.
METRIC_PATHS = {
    "UA": ("UA",),
    "IRA": ("IRA",),
    "CRA": ("CRA",),
    "UA_synonyms": ("generality", "UA_synonyms"),
    "UA_paraphrases": ("generality", "UA_paraphrases"),
    "object_accuracy": ("object_accuracy",),
    "style_accuracy": ("style_accuracy",),
}


@dataclass(frozen=True, kw_only=True)
class Scores:
    """The leaderboard's numbers of one evaluation (percent; ``None`` where the run has none)."""

    UA: float | None = None
    IRA: float | None = None
    CRA: float | None = None
    UA_synonyms: float | None = None
    UA_paraphrases: float | None = None
    object_accuracy: float | None = None
    style_accuracy: float | None = None

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> Scores:
        """The numbers out of an evaluation's ``metrics.json``."""
        values: dict[str, float | None] = {}
        for name, path in METRIC_PATHS.items():
            value: Any = metrics
            for key in path:
                value = value.get(key) if isinstance(value, Mapping) else None
            values[name] = float(value) if isinstance(value, (int, float)) else None
        return cls(**values)

    @classmethod
    def per_seed(cls, metrics: Mapping[str, Any]) -> dict[str, Scores]:
        """``{seed: Scores}`` of an evaluation's ``per_seed`` numbers (empty for runs that have none)."""
        return {seed: cls.of(row) for seed, row in (metrics.get("per_seed") or {}).items()}

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Scores:
        """Scores from a flat ``{name: value}`` mapping (unknown names ignored)."""
        return cls(
            **{
                k: (float(v) if isinstance(v, (int, float)) else None)
                for k, v in row.items()
                if k in METRIC_PATHS
            }
        )

    def get(self, name: str) -> float | None:
        return getattr(self, name)


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One entry on one concept.

    Attributes:
        entry: the entry's label (``base``, ``uce:paper``, ``hirm-r:default+uce:paper``).
        parts: its :class:`~erasekit.bench.entries.Part` s (none for ``base``).
        concept: the erased concept.
        concept_type: ``style`` or ``object``.
        scores: the evaluation's numbers.
        per_seed: the same numbers on each evaluation seed's images alone (``{seed: Scores}``).
        erase_seconds: wall time of the erasure (a stack: the sum of its parts), ``None`` for ``base``.
        peak_memory_mb: peak RSS above the start of the erasure (a stack: its largest part).
        patch: the patch's summary and ``sha256``, ``None`` for ``base``.
        same_patch_as: another entry whose patch is this very one (its run was reused), or ``None``.
        run: the evaluation run, relative to the leaderboard directory.
        cell_seconds: wall time of the whole cell.
    """

    entry: str
    parts: tuple[Part, ...]
    concept: str
    concept_type: str
    scores: Scores
    per_seed: dict[str, Scores] = field(default_factory=dict)
    erase_seconds: float | None = None
    peak_memory_mb: float | None = None
    patch: dict[str, Any] | None = None
    same_patch_as: str | None = None
    run: str = ""
    cell_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["metrics"] = data.pop("scores")
        data["parts"] = [p.to_json() for p in self.parts]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Cell:
        values = {k: v for k, v in data.items() if k in _CELL_FIELDS}
        values["scores"] = Scores.of(data["metrics"])
        values["per_seed"] = {seed: Scores.of(row) for seed, row in (data.get("per_seed") or {}).items()}
        values["parts"] = tuple(Part.from_json(p) for p in data.get("parts", ()))
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class AttackCell:
    """One attack column on one entry and concept.

    Attributes:
        attack: the column's label (``ring-a-bell:quick (prompts=4)``).
        entry, concept, concept_type: as in :class:`Cell`.
        asr: ``{"ASR", "ASR_pre", "ASR_post", "ASR_images", "ASR_any"}`` (percent; ``None`` where not measured);
            for the EraseEval column ``{"EraseEval", "M1", "M2", "M3", "M4"}`` (× 100).
        asr_rule: which rate is the headline ``ASR`` (the EraseEval column: how its score combines).
        headline: the key of ``asr`` the column shows (``ASR``; ``EraseEval`` for that column).
        budget: the full resolved budget.
        run: the attack run, relative to the leaderboard directory.
        same_patch_as: the entry whose attack run this is (same patch), or ``None``.
        cell_seconds: wall time of the attack run.
        parts: the entry's parts when the cell was made (``None`` in cells written before they were recorded):
            a ``tuned`` entry whose setting has changed since is not this cell's any more.
    """

    attack: str
    entry: str
    concept: str
    concept_type: str
    asr: dict[str, float | None]
    asr_rule: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    run: str = ""
    same_patch_as: str | None = None
    cell_seconds: float = 0.0
    headline: str = "ASR"
    parts: tuple[Part, ...] | None = None

    @property
    def ASR(self) -> float | None:  # noqa: N802 (the field's name in every run's metrics.json)
        return self.asr.get("ASR")

    @property
    def value(self) -> float | None:
        """The number the column shows for this cell."""
        return self.asr.get(self.headline)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["metrics"] = data.pop("asr")
        data["parts"] = None if self.parts is None else [p.to_json() for p in self.parts]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttackCell:
        values = {k: v for k, v in data.items() if k in _ATTACK_FIELDS}
        parts = data.get("parts")
        return cls(asr=dict(data["metrics"]), parts=None if parts is None else tuple(map(Part.from_json, parts)),
                   **values)  # fmt: skip


_CELL_FIELDS = {f.name for f in dataclasses.fields(Cell)} - {"scores", "parts", "per_seed"}
_ATTACK_FIELDS = {f.name for f in dataclasses.fields(AttackCell)} - {"asr", "parts"}


def same_setting(made: Sequence[Part] | None, parts: Sequence[Part] | None) -> bool:
    """Whether a cell made with ``made`` belongs to an entry of ``parts`` now (``None`` on either side: not
    known, so it does). Labels alone cannot tell: ``hirm-s:tuned`` names whatever the dev sweep chose last."""
    if made is None or parts is None:
        return True
    return normal([p.to_json() for p in made]) == normal([p.to_json() for p in parts])


@dataclass(frozen=True)
class Layout:
    """Paths inside one leaderboard directory ``root``, and reading and writing its cells."""

    root: Path

    def bench_file(self) -> Path:
        return self.root / BENCH_FILE

    def cell_file(self, label: str, concept: str) -> Path:
        return self.root / "cells" / slug(label) / f"{slug(concept)}.json"

    def run_dir(self, label: str, concept: str) -> Path:
        return self.root / "runs" / slug(label) / slug(concept)

    def patch_dir(self, method: str, config_key: str, concept: str) -> Path:
        """Keyed by the method's full config (hashed), so presets that agree share a patch."""
        return self.root / "patches" / f"{slug(method)}-{config_key}" / slug(concept)

    def cost_file(self, method: str, config_key: str, concept: str) -> Path:
        return self.patch_dir(method, config_key, concept).with_suffix(".json")

    def attack_file(self, attack_key: str, label: str, concept: str) -> Path:
        return self.root / "attacks" / attack_key / slug(label) / f"{slug(concept)}.json"

    def attack_run_dir(self, attack_key: str, label: str, concept: str) -> Path:
        return self.root / "attack-runs" / attack_key / slug(label) / slug(concept)

    def sheet_file(self, attack_key: str) -> Path:
        return self.root / "attack-sheets" / f"{attack_key}.png"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    # ---- cells -------------------------------------------------------------------------------------

    def read_cell(self, label: str, concept: str, parts: Sequence[Part] | None = None) -> Cell | None:
        """The finished cell, or ``None``; also ``None`` when it was made with other ``parts`` (stale)."""
        file = self.cell_file(label, concept)
        if not file.is_file():
            return None
        cell = Cell.from_json(read_json(file))
        return cell if same_setting(cell.parts, parts) else None

    def write_cell(self, cell: Cell) -> None:
        atomic_write_json(self.cell_file(cell.entry, cell.concept), cell.to_json())

    def cells(
        self,
        labels: Sequence[str],
        concepts: Sequence[str],
        parts: Mapping[str, Sequence[Part]] | None = None,
    ) -> list[Cell]:
        """The finished cells on disk for these entries and concepts (another process may have written them);
        ``parts``: ``{label: parts}`` of the entries, whose stale cells are left out."""
        found = (self.read_cell(label, c, (parts or {}).get(label)) for label in labels for c in concepts)
        return [c for c in found if c is not None]

    def concept_cells(self, concept: str) -> list[Cell]:
        """Every finished cell on ``concept``, whatever its entry."""
        return [
            Cell.from_json(read_json(f))
            for f in sorted((self.root / "cells").glob(f"*/{slug(concept)}.json"))
        ]

    def read_attack_cell(
        self, attack_key: str, label: str, concept: str, parts: Sequence[Part] | None = None
    ) -> AttackCell | None:
        """The finished attack cell, or ``None``; also ``None`` when it was made with other ``parts``."""
        file = self.attack_file(attack_key, label, concept)
        if not file.is_file():
            return None
        cell = AttackCell.from_json(read_json(file))
        return cell if same_setting(cell.parts, parts) else None

    def write_attack_cell(self, attack_key: str, cell: AttackCell) -> None:
        atomic_write_json(self.attack_file(attack_key, cell.entry, cell.concept), cell.to_json())

    def attack_cells(
        self, attacks: Sequence[Any], labels: Sequence[str], concepts: Sequence[str],
        parts: Mapping[str, Sequence[Part]] | None = None,
    ) -> list:  # fmt: skip
        """The finished attack cells of these columns (:class:`~erasekit.bench.attacks.BenchAttack`), stale ones
        (``parts`` as in :meth:`cells`) left out."""
        parts = parts or {}
        found = (
            self.read_attack_cell(a.key, label, c, parts.get(label))
            for a in attacks for label in labels for c in concepts
        )  # fmt: skip
        return [c for c in found if c is not None]

    # ---- the directory -----------------------------------------------------------------------------

    def open(
        self, identity: dict[str, Any], overwrite: bool = False, results: str | Path | None = None
    ) -> Layout:
        """Create or resume the directory for results identified by ``identity``, then take the finished cells of
        the results copy ``results`` (:meth:`take_results`), if one is given.

        A directory holding results of another model or other evaluation settings is refused (unless
        ``overwrite``, which deletes it first); one that is not a leaderboard is always refused. ``overwrite``
        with a results copy that holds results is refused too (:func:`check_overwrite`).
        """
        import shutil

        check_overwrite(overwrite, results)
        out = self.root
        if out.exists() and not out.is_dir():
            raise ErasekitError(f"output {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not self.bench_file().is_file():
                raise ErasekitError(
                    f"output {out} is a non-empty directory that is not an erasekit leaderboard"
                )
            if overwrite:
                shutil.rmtree(out)
            elif read_json(self.bench_file()).get("identity") != normal(identity):
                raise ErasekitError(
                    f"{out} holds a leaderboard of another model or settings; use another --out or --overwrite"
                )
        out.mkdir(parents=True, exist_ok=True)
        if results is not None:
            self.take_results(Path(results), identity)
        return self

    def write_bench_file(self, identity: dict[str, Any], run: dict[str, Any]) -> None:
        """Save the identity (checked on resume) and this invocation's entries, concepts and command."""
        from erasekit.provenance import provenance

        atomic_write_json(
            self.bench_file(), {"identity": normal(identity), "run": run, "provenance": provenance()}
        )

    # ---- results copies ----------------------------------------------------------------------------

    def take_results(self, results: Path, identity: dict[str, Any]) -> int:
        """Copy into this directory every result file of ``results`` it lacks; the number of files copied.

        ``results`` that does not exist yet is fine (nothing to take); one of another model or other settings is
        refused, as :meth:`open` refuses such a directory.
        """
        if not results.exists():
            return 0
        _check_results(results, identity)
        taken = 0
        for pattern in RESULT_FILES:
            for src in sorted(results.glob(pattern)):
                dest = self.root / src.relative_to(results)
                if not dest.exists():
                    atomic_write_bytes(dest, src.read_bytes())
                    taken += 1
        merge_timing(self.root / TIMING_FILE, results / TIMING_FILE)
        return taken

    def give_results(self, results: Path, identity: dict[str, Any]) -> int:
        """Write this directory's result files and pages into ``results`` (created if absent); the number of
        files written. Cells are results of deterministic runs, so a cell present in both is this directory's."""
        if results.exists() and not results.is_dir():
            raise ErasekitError(f"results copy {results} exists and is not a directory")
        if results.is_dir() and any(results.iterdir()):
            _check_results(results, identity)
        given = 0
        for pattern in (*RESULT_FILES, *RESULT_PAGES):
            for src in sorted(self.root.glob(pattern)):
                dest = results / src.relative_to(self.root)
                data = src.read_bytes()
                if not dest.is_file() or dest.read_bytes() != data:
                    atomic_write_bytes(dest, data)
                    given += 1
        merge_timing(results / TIMING_FILE, self.root / TIMING_FILE)
        return given


def check_overwrite(overwrite: bool, results: str | Path | None) -> None:
    """Refuse ``overwrite`` with a results copy that holds results: it would put back the very cells
    ``overwrite`` asks to recompute (a new or empty copy is fine)."""
    if overwrite and results is not None and Path(results).is_dir() and any(Path(results).iterdir()):
        raise ErasekitError(
            f"--overwrite deletes --out, but --results {results} would copy its finished cells straight back: "
            "drop one of the two, or give --results a new directory"
        )


def _check_results(results: Path, identity: dict[str, Any]) -> None:
    file = results / BENCH_FILE
    if not results.is_dir() or not file.is_file():
        raise ErasekitError(f"{results} is not an erasekit results copy (no {BENCH_FILE})")
    if read_json(file).get("identity") != normal(identity):
        raise ErasekitError(f"results copy {results} holds a leaderboard of another model or settings")
