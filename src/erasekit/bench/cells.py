"""Filling a leaderboard directory cell by cell: erase, evaluate, attack, write the cell; resumable.

A finished cell is never recomputed: its JSON is read back. A cell whose JSON was lost is rebuilt from its saved
patch and its finished evaluation run. Presets whose configs agree share one patch, and entries whose patches are
the very same share one evaluation and one attack run (``same_patch_as``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.bench.attacks import ERASEEVAL
from erasekit.bench.entries import BASE, Entry, Part, check_stack
from erasekit.bench.layout import AttackCell, Cell, Layout, Scores
from erasekit.bench.memory import PeakMemory
from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from erasekit.bench.attacks import BenchAttack
    from erasekit.evaluation.classifiers import ImageClassifier
    from erasekit.generation import Sampling
    from erasekit.models.loading import LoadedModel
    from erasekit.patch import Patch

Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """What decides the numbers of every cell (saved in ``bench.json``; a resumed run must match).

    Attributes:
        seeds: seeds per grid cell (UnlearnCanvas's seeds first).
        steps: denoising steps (``None``: the model's default).
        objects: restrict the evaluation grid to these objects (``None``: the classifier's).
        styles: restrict the evaluation grid to these styles (``None``: the classifier's).
        generality: add the synonym and paraphrase images (the sweep leaves them out: its frontier needs UA,
            IRA and CRA only).
    """

    seeds: int = 1
    steps: int | None = None
    objects: tuple[str, ...] | None = None
    styles: tuple[str, ...] | None = None
    generality: bool = True

    def sampling(self, model: LoadedModel) -> Sampling:
        """The sampling every evaluation and attack of the bench uses: the model's, with these steps."""
        from erasekit.generation import Sampling

        return Sampling.for_model(model, steps=self.steps)


@dataclass
class Bench:
    """A leaderboard directory being filled.

    Attributes:
        model: the loaded MiniCanvas-like pipeline (never left patched).
        layout: the leaderboard directory.
        settings: the evaluation settings.
        classifier: the two-head classifier (``None``: the built-in MiniCanvas one).
        batch_size: images per pipeline call (runtime only).
        log: receives one line per step (``None``: silent).
        attacks: the attack columns run on every cell's patch.
        joint: erase a method's sweep points on one concept in one joint run where the method has a joint
            eraser (``Strength.joint``: ESD's η grid shares its x_t and frozen predictions); each patch is the
            one erased alone, and each point's ``erase (s)`` is its share of the joint run.
        failures: ``{(label, concept): reason}`` of the cells that failed in :meth:`run`.
    """

    model: LoadedModel
    layout: Layout
    settings: BenchSettings
    classifier: ImageClassifier | None = None
    batch_size: int = 32
    log: Log | None = None
    attacks: Sequence[BenchAttack] = ()
    joint: bool = False
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    # ---- patches -----------------------------------------------------------------------------------

    def part_patch(self, part: Part, concept: str, kind: str) -> tuple[Patch, dict[str, Any]]:
        """The patch of one part for ``concept`` and its cost; erased once, then read back.

        Keyed by the method's full config, so presets, sweep points and tuned settings that agree share a patch.
        """
        from erasekit.hooked import load_erasure
        from erasekit.registry import erase

        where, cost_file = self._patch_files(part, concept, kind)
        if not (cost_file.is_file() and where.is_dir()) and self.joint:
            self._erase_sweep_jointly(part, concept, kind)
        if cost_file.is_file() and where.is_dir():
            return load_erasure(where), read_json(cost_file)
        self.say(f"erase {part.label} {concept!r}")
        with PeakMemory() as mem:
            patch = erase(self.model, [concept], part.method, concept_type=kind, config=part.config(kind))
        patch.save(where, overwrite=True)
        if (
            cost_file.is_file()
        ):  # a results copy keeps costs, not patches: the first measurement stays the cost
            return patch, read_json(cost_file)
        cost = {"erase_seconds": patch.erase_seconds, "peak_memory_mb": mem.extra_mb}
        atomic_write_json(cost_file, cost)
        return patch, cost

    def _patch_files(self, part: Part, concept: str, kind: str) -> tuple[Path, Path]:
        """Where the part's patch for ``concept`` and its cost are kept (keyed by the full config)."""
        from erasekit.registry import config_to_dict

        config = config_to_dict(part.config(kind))
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
        return self.layout.patch_dir(part.method, key, concept), self.layout.cost_file(
            part.method, key, concept
        )

    def _erase_sweep_jointly(self, part: Part, concept: str, kind: str) -> None:
        """When ``part`` is a sweep point of a method with a joint eraser, erase every point of its grid not yet
        made for ``concept`` in one run, and keep each patch and its share of the cost."""
        from erasekit.bench.protocol import sweep_parts
        from erasekit.registry import METHODS, erase_jointly

        knob = METHODS.get(part.method).strength
        points = sweep_parts(part.method)
        if knob is None or knob.joint is None or part not in points:
            return
        files = {p: self._patch_files(p, concept, kind) for p in points}
        todo = [p for p in points if not files[p][0].is_dir()]
        self.say(f"erase {', '.join(p.label for p in todo)} {concept!r} jointly (one shared run)")
        with PeakMemory() as mem:
            patches = erase_jointly(self.model, [concept], part.method, [p.config(kind) for p in todo])
        for p, patch in zip(todo, patches, strict=True):
            where, cost_file = files[p]
            patch.save(where, overwrite=True)
            if cost_file.is_file():  # made again for a results copy: its first cost stays
                continue
            atomic_write_json(cost_file, {
                "erase_seconds": patch.erase_seconds, "peak_memory_mb": mem.extra_mb,
                "joint": {"settings": len(todo), "seconds": round(patch.erase_seconds * len(todo), 2)},
            })  # fmt: skip

    def entry_patch(self, entry: Entry, concept: str, kind: str) -> tuple[Patch, dict[str, Any]]:
        """The entry's (composed) patch and cost: seconds add up over the parts, peak memory is their maximum."""
        from erasekit.hooked import compose

        check_stack(entry)
        made = [self.part_patch(part, concept, kind) for part in entry.parts]
        patch = compose([p for p, _ in made], label=entry.label)
        seconds = [c["erase_seconds"] for _, c in made]
        peaks = [c["peak_memory_mb"] for _, c in made if c["peak_memory_mb"] is not None]
        cost = {
            "erase_seconds": sum(seconds) if None not in seconds else None,
            "peak_memory_mb": max(peaks) if peaks else None,
        }
        return patch, cost

    # ---- cells -------------------------------------------------------------------------------------

    def run_cell(self, entry: Entry, concept: str, kind: str) -> Cell:
        """Erase (unless ``base``), evaluate, and write the cell; a finished cell is read back."""
        done = self.layout.read_cell(entry.label, concept, entry.parts)
        if done is not None:
            return done
        if self.layout.cell_file(entry.label, concept).is_file():
            self.say(
                f"stale {entry.label} {concept!r}: made with another setting of {entry.label}; made again"
            )
        start = time.perf_counter()
        patch, cost = (None, {"erase_seconds": None, "peak_memory_mb": None})
        if entry.parts:
            patch, cost = self.entry_patch(entry, concept, kind)
        sha = patch.fingerprint() if patch is not None else None
        twin = self.twin(entry, concept, sha)
        if twin is not None:
            run, scores, per_seed = twin.run, twin.scores, twin.per_seed
        else:
            run_dir = self.layout.run_dir(entry.label, concept)
            metrics = self.evaluate(run_dir, concept, patch)
            run, scores, per_seed = (
                self.layout.relative(run_dir),
                Scores.from_metrics(metrics),
                Scores.per_seed(metrics),
            )
        cell = Cell(entry=entry.label, parts=entry.parts, concept=concept, concept_type=kind, scores=scores,
                    per_seed=per_seed, erase_seconds=cost["erase_seconds"], peak_memory_mb=cost["peak_memory_mb"],
                    patch={**patch.summary(), "sha256": sha} if patch is not None else None,
                    same_patch_as=twin.entry if twin else None, run=run,
                    cell_seconds=round(time.perf_counter() - start, 2))  # fmt: skip
        self.layout.write_cell(cell)
        self.say(f"done {entry.label} {concept!r}: {_brief(cell)}")
        return cell

    def twin(self, entry: Entry, concept: str, sha: str | None) -> Cell | None:
        """A finished cell of another entry on ``concept`` whose patch is the very same (its run is reused)."""
        if sha is None:
            return None
        for cell in self.layout.concept_cells(concept):
            if cell.entry != entry.label and (cell.patch or {}).get("sha256") == sha:
                return cell if not cell.same_patch_as else None
        return None

    def evaluate(self, run: Any, concept: str, patch: Patch | None) -> dict[str, Any]:
        """The evaluation run's metrics (a finished run is read back, an unfinished one resumed)."""
        from erasekit.evaluation.protocols import evaluate

        patches = [patch] if patch is not None else []
        finished, stale = self._finished(run, patches)
        if finished is not None:
            return finished
        self.say(f"evaluate {self.layout.relative(run)}")
        s = self.settings
        return evaluate(
            self.model, "minicanvas", run, patches=patches,
            sampling=s.sampling(self.model), batch_size=self.batch_size, classifier=self.classifier,
            reuse=_finished_sibling(run) if patch is None else None, overwrite=stale,
            target=concept, seeds=s.seeds, objects=s.objects, styles=s.styles, generality=s.generality,
        )  # fmt: skip

    def _finished(self, run: Path, patches: Sequence[Any]) -> tuple[dict[str, Any] | None, bool]:
        """``(metrics, stale)``: the metrics of ``run`` when it is finished and made with ``patches``, else
        ``None``; ``stale`` when it is finished but was made with other patches (a ``tuned`` setting that has
        changed since): that run is replaced."""
        from erasekit.evaluation.record import read_run

        if not (run / "metrics.json").is_file():
            return None, False
        done = read_run(run)
        made = [p.get("sha256") for p in done["record"].get("patches", [])]
        if made == [p.fingerprint() for p in patches]:
            return done["metrics"], False
        self.say(f"stale {self.layout.relative(run)}: made with another patch; made again")
        return None, True

    def run_attack_cell(self, attack: BenchAttack, entry: Entry, concept: str, kind: str) -> AttackCell:
        """Attack the entry's patch on ``concept`` and write the attack cell; a finished one is read back.

        An entry whose patch is another entry's (``same_patch_as``) takes that entry's finished attack cell.
        """
        from dataclasses import replace

        from erasekit.attacks.run import run_attack

        layout = self.layout
        done = layout.read_attack_cell(attack.key, entry.label, concept, entry.parts)
        if done is not None:
            return done
        twin_of = layout.read_cell(entry.label, concept, entry.parts)
        twin = twin_of.same_patch_as if twin_of else None
        found = layout.read_attack_cell(attack.key, twin, concept) if twin else None
        if found is not None:
            cell = replace(found, entry=entry.label, same_patch_as=twin, parts=entry.parts)
        elif attack.name == ERASEEVAL:
            cell = self.eraseeval_cell(attack, entry, concept, kind)
        else:
            start = time.perf_counter()
            patches = [self.entry_patch(entry, concept, kind)[0]] if entry.parts else []
            run = layout.attack_run_dir(attack.key, entry.label, concept)
            self.say(f"attack {attack.label} on {entry.label} {concept!r}")
            metrics = run_attack(
                self.model, concept, attack.name, run, concept_type=kind, patches=patches, preset=attack.preset,
                budget=dict(attack.budget), seeds=attack.seeds, sampling=self.settings.sampling(self.model),
                classifier=self.classifier, batch_size=self.batch_size, overwrite=True,
            )  # fmt: skip
            asr = {k: metrics.get(k) for k in ("ASR", "ASR_pre", "ASR_post", "ASR_images", "ASR_any")}
            cell = AttackCell(attack=attack.label, entry=entry.label, concept=concept, concept_type=kind, asr=asr,
                              asr_rule=metrics.get("asr_rule"), budget=metrics.get("budget") or {},
                              run=layout.relative(run), cell_seconds=round(time.perf_counter() - start, 2),
                              parts=entry.parts)  # fmt: skip
        layout.write_attack_cell(attack.key, cell)
        self.say(f"done {attack.label} on {entry.label} {concept!r}: {cell.headline} {_pct(cell.value)}")
        return cell

    def eraseeval_cell(self, attack: BenchAttack, entry: Entry, concept: str, kind: str) -> AttackCell:
        """The EraseEval column on one cell: the ``eraseeval`` protocol on the entry's patch (a finished run is
        read back); its combined score and M1..M4, × 100. The base model's images it compares with are linked
        from the base row's run of the same concept (the base row runs first), not generated again."""
        from erasekit.evaluation.protocols import evaluate

        start = time.perf_counter()
        run = self.layout.attack_run_dir(attack.key, entry.label, concept)
        patches = [self.entry_patch(entry, concept, kind)[0]] if entry.parts else []
        metrics, stale = self._finished(run, patches)
        if metrics is None:
            base = self.layout.attack_run_dir(attack.key, BASE, concept)  # the base row's run
            self.say(f"evaluate {attack.label} on {entry.label} {concept!r}")
            metrics = evaluate(
                self.model, ERASEEVAL, run, patches=patches, sampling=self.settings.sampling(self.model),
                batch_size=self.batch_size, classifier=self.classifier, target=concept, **dict(attack.budget),
                base_images=base if patches and (base / "metrics.json").is_file() else None, overwrite=stale,
            )  # fmt: skip
        scores = {k: 100 * float(metrics[k]) for k in ("EraseEval", "M1", "M2", "M3", "M4")}
        rule = f"EraseEval: the {dict(attack.budget)['combine']} mean of M1..M4, x 100"
        return AttackCell(attack=attack.label, entry=entry.label, concept=concept, concept_type=kind, asr=scores,
                          asr_rule=rule, budget=dict(attack.budget), run=self.layout.relative(run),
                          cell_seconds=round(time.perf_counter() - start, 2), headline="EraseEval",
                          parts=entry.parts)  # fmt: skip

    def run(self, entries: Sequence[Entry], concepts: Sequence[str]) -> list[Cell]:
        """Every entry on every concept, the base model first; a cell that fails is logged, recorded in
        :attr:`failures` and left unfinished (a restart tries it again).

        Returns:
            The finished cells (base cells included).
        """
        from erasekit.concepts import guess_type

        rows = [Entry(()), *entries]
        self.progress = Progress(len(rows) * len(concepts) * (1 + len(self.attacks)), self.log)
        cells = []
        for entry in rows:
            for concept in concepts:
                kind = guess_type(concept)
                try:
                    cells.append(self.run_cell(entry, concept, kind))
                except Exception as e:  # one broken method must not cost the other cells of a long run
                    self._failed(entry.label, concept, e)
                    self.progress.step(1 + len(self.attacks))
                    continue
                self.progress.step()
                for attack in self.attacks:
                    try:
                        self.run_attack_cell(attack, entry, concept, kind)
                    except Exception as e:
                        self._failed(f"{entry.label} / {attack.label}", concept, e)
                    self.progress.step()
        return cells

    def _failed(self, label: str, concept: str, e: Exception) -> None:
        reason = str(e) if isinstance(e, ErasekitError) else f"{type(e).__name__}: {e}"
        self.failures[(label, concept)] = reason
        self.say(f"FAILED {label} {concept!r}: {reason}")


class Progress:
    """Cells done out of all cells of a run, with the elapsed time and an estimate of the time left, logged."""

    def __init__(self, total: int, log: Log | None) -> None:
        self.total, self.done, self.log = total, 0, log
        self.start = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.log is None:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        self.log(f"[{self.done}/{self.total} cells, {elapsed / 60:.1f} min, about {left / 60:.1f} min left]")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


def _brief(cell: Cell) -> str:
    s = cell.scores
    parts = [f"{k} {v:.1f}" for k, v in (("UA", s.UA), ("IRA", s.IRA), ("CRA", s.CRA), ("UA_synonyms", s.UA_synonyms))
             if v is not None]  # fmt: skip
    if cell.erase_seconds is not None:
        parts.append(f"erase {cell.erase_seconds:.1f} s")
    return ", ".join(parts) + f" ({cell.cell_seconds:.0f} s)"


def _finished_sibling(run: Path) -> Path | None:
    """A finished base-model run on another concept: the grid images do not depend on the target, so a base run
    links that run's grid images and generates only its own (the target's synonym and paraphrase images)."""
    if not run.parent.is_dir():
        return None
    return next(
        (o for o in sorted(run.parent.iterdir()) if o != run and (o / "metrics.json").is_file()), None
    )
