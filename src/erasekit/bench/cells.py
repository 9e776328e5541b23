"""One leaderboard directory, filled cell by cell: erase, evaluate, write the cell's JSON; resumable."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasekit.bench.entries import Entry, check_stack, slug, stack
from erasekit.bench.memory import PeakMemory
from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_json

BENCH_FILE = "bench.json"
Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """What decides the numbers of every cell (saved in ``bench.json``; a resumed run must match).

    Attributes:
        seeds: seeds per grid cell (UnlearnCanvas's seeds first).
        steps: denoising steps (``None``: MiniCanvas's default).
        objects: restrict the evaluation grid to these objects (``None``: the classifier's).
        styles: restrict the evaluation grid to these styles (``None``: the classifier's).
    """

    seeds: int = 1
    steps: int | None = None
    objects: tuple[str, ...] | None = None
    styles: tuple[str, ...] | None = None


@dataclass
class Bench:
    """A leaderboard directory being filled.

    Attributes:
        model: the loaded MiniCanvas-like pipeline (never left patched).
        out: the leaderboard directory.
        settings: the evaluation settings.
        classifier: the two-head classifier (``None``: the built-in MiniCanvas one).
        batch_size: images per pipeline call (runtime only).
        log: receives one line per step (``None``: silent).
        attacks: the :class:`~erasekit.bench.attacks.BenchAttack` columns run on every cell's patch.
        failures: ``{(label, concept): reason}`` of the cells that failed in :meth:`run`.
    """

    model: Any
    out: Path
    settings: BenchSettings
    classifier: Any = None
    batch_size: int = 32
    log: Log | None = None
    attacks: Sequence[Any] = ()
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def cell_file(self, entry: Entry, concept: str) -> Path:
        return self.out / "cells" / entry.slug / f"{slug(concept)}.json"

    def run_dir(self, entry: Entry, concept: str) -> Path:
        return self.out / "runs" / entry.slug / slug(concept)

    def patch_dir(self, part: tuple[str, str], concept: str, kind: str) -> Path:
        """Keyed by the method's full config, so presets that agree (``paper`` = ``default``) share a patch."""
        from erasekit.registry import config_to_dict, make_config

        config = config_to_dict(make_config(part[0], part[1], kind))
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
        return self.out / "patches" / f"{slug(part[0])}-{key}" / slug(concept)

    # ---- patches -----------------------------------------------------------------------------------

    def part_patch(self, part: tuple[str, str], concept: str, kind: str) -> tuple[Any, dict[str, Any]]:
        """The patch of one (method, preset) for ``concept`` and its cost; erased once, then read back."""
        from erasekit.patch import Patch
        from erasekit.registry import erase

        where = self.patch_dir(part, concept, kind)
        cost_file = where.with_suffix(".json")
        if cost_file.is_file() and where.is_dir():
            return Patch.load(where), _read_json(cost_file)
        self.say(f"erase {part[0]}:{part[1]} {concept!r}")
        with PeakMemory() as mem:
            patch = erase(self.model, [concept], part[0], part[1], concept_type=kind)
        patch.save(where, overwrite=True)
        cost = {"erase_seconds": patch.erase_seconds, "peak_memory_mb": mem.extra_mb}
        atomic_write_json(cost_file, cost)
        return patch, cost

    def entry_patch(self, entry: Entry, concept: str, kind: str) -> tuple[Any, dict[str, Any]]:
        """The entry's (composed) patch and cost: seconds add up over the parts, peak memory is their maximum."""
        check_stack(entry)
        made = [self.part_patch(part, concept, kind) for part in entry.parts]
        patches, costs = [p for p, _ in made], [c for _, c in made]
        patch = stack(patches, entry.label) if len(patches) > 1 else patches[0]
        seconds = [c["erase_seconds"] for c in costs]
        peaks = [c["peak_memory_mb"] for c in costs if c["peak_memory_mb"] is not None]
        cost = {
            "erase_seconds": sum(seconds) if None not in seconds else None,
            "peak_memory_mb": max(peaks) if peaks else None,
        }
        return patch, cost

    # ---- cells -------------------------------------------------------------------------------------

    def run_cell(self, entry: Entry, concept: str, kind: str) -> dict[str, Any]:
        """Erase (unless ``base``), evaluate, and write the cell's JSON; a finished cell is read back."""
        cell_file = self.cell_file(entry, concept)
        if cell_file.is_file():
            return _read_json(cell_file)
        start = time.perf_counter()
        patch, cost = (None, {"erase_seconds": None, "peak_memory_mb": None})
        if entry.parts:
            patch, cost = self.entry_patch(entry, concept, kind)
        sha = patch.fingerprint() if patch is not None else None
        twin = self.twin(entry, concept, sha)
        run = self.out / twin["run"] if twin else self.run_dir(entry, concept)
        metrics = twin["metrics"] if twin else pick_metrics(self.evaluate(run, concept, patch))
        cell = {
            "entry": entry.label,
            "parts": [list(p) for p in entry.parts],
            "concept": concept,
            "concept_type": kind,
            "metrics": metrics,
            **cost,
            "patch": {**patch.summary(), "sha256": sha} if patch is not None else None,
            "same_patch_as": twin["entry"] if twin else None,
            "run": str(run.relative_to(self.out)),
            "cell_seconds": round(time.perf_counter() - start, 2),
        }
        atomic_write_json(cell_file, cell)
        self.say(f"done {entry.label} {concept!r}: {_brief(cell)}")
        return cell

    def attack_file(self, attack: Any, label: str, concept: str) -> Path:
        return self.out / "attacks" / attack.key / slug(label) / f"{slug(concept)}.json"

    def run_attack_cell(self, attack: Any, entry: Entry, concept: str, kind: str) -> dict[str, Any]:
        """Attack the entry's patch on ``concept`` and write the attack cell; a finished one is read back.

        An entry whose patch is another entry's (``same_patch_as``) takes that entry's finished attack cell.
        """
        from erasekit.attacks.run import run_attack

        cell_file = self.attack_file(attack, entry.label, concept)
        if cell_file.is_file():
            return _read_json(cell_file)
        twin = _read_json(self.cell_file(entry, concept)).get("same_patch_as")
        if twin and self.attack_file(attack, twin, concept).is_file():
            cell = {
                **_read_json(self.attack_file(attack, twin, concept)),
                "entry": entry.label,
                "same_patch_as": twin,
            }
        else:
            start = time.perf_counter()
            patches = [self.entry_patch(entry, concept, kind)[0]] if entry.parts else []
            run = self.out / "attack-runs" / attack.key / entry.slug / slug(concept)
            self.say(f"attack {attack.label} on {entry.label} {concept!r}")
            metrics = run_attack(
                self.model, concept, attack.name, run, concept_type=kind, patches=patches,
                preset=attack.preset, budget=dict(attack.budget), seeds=attack.seeds, steps=self.settings.steps,
                classifier=self.classifier, batch_size=self.batch_size, overwrite=True,
            )  # fmt: skip
            cell = {
                "entry": entry.label,
                "attack": attack.label,
                "concept": concept,
                "concept_type": kind,
                "metrics": {
                    k: metrics.get(k) for k in ("ASR", "ASR_pre", "ASR_post", "ASR_images", "ASR_any")
                },
                "asr_rule": metrics.get("asr_rule"),
                "budget": metrics.get("budget"),
                "run": str(run.relative_to(self.out)),
                "cell_seconds": round(time.perf_counter() - start, 2),
            }
        atomic_write_json(cell_file, cell)
        self.say(f"done {attack.label} on {entry.label} {concept!r}: ASR {_pct(cell['metrics']['ASR'])}")
        return cell

    def twin(self, entry: Entry, concept: str, sha: str | None) -> dict[str, Any] | None:
        """A finished cell of another entry on ``concept`` whose patch is the very same (its run is reused)."""
        if sha is None:
            return None
        for file in sorted((self.out / "cells").glob(f"*/{slug(concept)}.json")):
            cell = _read_json(file)
            if cell["entry"] != entry.label and (cell.get("patch") or {}).get("sha256") == sha:
                return cell if not cell.get("same_patch_as") else None
        return None

    def evaluate(self, run: Path, concept: str, patch: Any) -> dict[str, Any]:
        """The evaluation run's metrics (a finished run is read back, an unfinished one resumed)."""
        from erasekit.evaluation.canvas import evaluate_minicanvas
        from erasekit.evaluation.record import read_run

        if (run / "metrics.json").is_file():
            return read_run(run)["metrics"]
        self.say(f"evaluate {run.relative_to(self.out)}")
        s = self.settings
        return evaluate_minicanvas(
            self.model, run, target=concept, patches=[patch] if patch is not None else [], seeds=s.seeds,
            steps=s.steps, batch_size=self.batch_size, classifier=self.classifier, objects=s.objects,
            styles=s.styles,
        )  # fmt: skip

    def run(self, entries: Sequence[Entry], concepts: Sequence[str]) -> list[dict[str, Any]]:
        """Every entry on every concept, the base model first; a cell that fails is logged, recorded in
        :attr:`failures` and left unfinished (a restart tries it again).

        Returns:
            The finished cells (base cells included).
        """
        from erasekit.minicanvas.world import concept_kind

        cells = []
        for entry in [Entry(()), *entries]:
            for concept in concepts:
                kind = concept_kind(concept)
                try:
                    cells.append(self.run_cell(entry, concept, kind))
                except Exception as e:  # one broken method must not cost the other cells of a long run
                    self._failed(entry.label, concept, e)
                    continue
                for attack in self.attacks:
                    try:
                        self.run_attack_cell(attack, entry, concept, kind)
                    except Exception as e:
                        self._failed(f"{entry.label} / {attack.label}", concept, e)
        return cells

    def _failed(self, label: str, concept: str, e: Exception) -> None:
        reason = str(e) if isinstance(e, ErasekitError) else f"{type(e).__name__}: {e}"
        self.failures[(label, concept)] = reason
        self.say(f"FAILED {label} {concept!r}: {reason}")


def read_cells(out: Path, labels: Sequence[str], concepts: Sequence[str]) -> list[dict[str, Any]]:
    """The finished cells on disk for these entries and concepts (another process may have written them)."""
    files = [out / "cells" / slug(label) / f"{slug(c)}.json" for label in labels for c in concepts]
    return [_read_json(f) for f in files if f.is_file()]


METRIC_PATHS = {
    "UA": ("UA",),
    "IRA": ("IRA",),
    "CRA": ("CRA",),
    "UA_synonyms": ("generality", "UA_synonyms"),
    "UA_paraphrases": ("generality", "UA_paraphrases"),
    "object_accuracy": ("object_accuracy",),
    "style_accuracy": ("style_accuracy",),
}


def pick_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The leaderboard's numbers from an evaluation's metrics (``None`` where absent)."""
    out: dict[str, float | None] = {}
    for name, path in METRIC_PATHS.items():
        value: Any = metrics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out[name] = float(value) if isinstance(value, (int, float)) else None
    return out


def read_attack_cells(
    out: Path, attacks: Sequence[Any], labels: Sequence[str], concepts: Sequence[str]
) -> list:
    """The finished attack cells on disk, each with its column's label under ``"attack"``."""
    files = [(a, out / "attacks" / a.key / slug(label) / f"{slug(c)}.json") for a in attacks for label in labels
             for c in concepts]  # fmt: skip
    return [{**_read_json(f), "attack": a.label} for a, f in files if f.is_file()]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


def _brief(cell: dict[str, Any]) -> str:
    m = cell["metrics"]
    parts = [f"{k} {m[k]:.1f}" for k in ("UA", "IRA", "CRA", "UA_synonyms") if m.get(k) is not None]
    if cell.get("erase_seconds") is not None:
        parts.append(f"erase {cell['erase_seconds']:.1f} s")
    return ", ".join(parts) + f" ({cell['cell_seconds']:.0f} s)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ErasekitError(f"cannot read {path}: {e}") from None


# ---- the directory ---------------------------------------------------------------------------------------


def open_bench(out: str | Path, identity: dict[str, Any], overwrite: bool = False) -> Path:
    """Create or resume the leaderboard directory ``out`` for results identified by ``identity``.

    A directory holding results of another model or other evaluation settings is refused (unless
    ``overwrite``, which deletes it first); one that is not a leaderboard is always refused.
    """
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / BENCH_FILE).is_file():
            raise ErasekitError(f"output {out} is a non-empty directory that is not an erasekit leaderboard")
        if overwrite:
            shutil.rmtree(out)
        elif _read_json(out / BENCH_FILE).get("identity") != _normal(identity):
            raise ErasekitError(
                f"{out} holds a leaderboard of another model or settings; use another --out or --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_bench_file(out: Path, identity: dict[str, Any], run: dict[str, Any]) -> None:
    """Save the identity (checked on resume) and this invocation's entries, concepts and command."""
    from erasekit.provenance import provenance

    atomic_write_json(
        out / BENCH_FILE, {"identity": _normal(identity), "run": run, "provenance": provenance()}
    )


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))
