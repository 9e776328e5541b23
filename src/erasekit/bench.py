"""``erasekit bench``: every method on the same sampled MiniCanvas concepts, evaluated the same way.

A leaderboard is a directory that fills up cell by cell, so a run cut short resumes where it stopped::

    DIR/bench.json                          what identifies the results (model, sampling, grid) and the last command
    DIR/patches/<method-preset>/<concept>/  each single method's patch (reused by stacked entries)
    DIR/patches/<method-preset>/<concept>.json  its cost: erase seconds and peak memory
    DIR/runs/<entry>/<concept>/             the evaluation run (images, manifest, metrics, record)
    DIR/cells/<entry>/<concept>.json        the cell's result; its presence marks the cell finished
    DIR/leaderboard.md, DIR/report.html     written by :mod:`erasekit.leaderboard`

An entry is one row of the leaderboard: ``method``, ``method:preset``, or a stack ``hirm-r+uce`` whose patches
(touching disjoint tensors) are composed and measured as a method of its own. ``base`` is the unpatched model.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_json, atomic_write_text

BASE = "base"
BENCH_FILE = "bench.json"
Log = Callable[[str], None]


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


# ---- measuring an erasure --------------------------------------------------------------------------------


class PeakMemory:
    """Peak resident memory (RSS) of this process above its level at the start, sampled in a thread.

    glibc's free lists are trimmed first, so memory freed by earlier work is given back to the system rather
    than silently reused. ``peak_mb`` is ``None`` where ``/proc/self/statm`` does not exist.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        _trim_malloc()
        self.start_mb = self.peak_mb = _rss_mb()
        if self.start_mb is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start_mb is not None:
            self._stop.set()
            self._thread.join()
            self._update()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        now = _rss_mb()
        if now is not None and self.peak_mb is not None:
            self.peak_mb = max(self.peak_mb, now)

    @property
    def extra_mb(self) -> float | None:
        """Peak RSS minus RSS at the start, in MiB."""
        return None if self.start_mb is None or self.peak_mb is None else self.peak_mb - self.start_mb


def _rss_mb() -> float | None:
    import os

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trim_malloc() -> None:
    # Not glibc: the measurement then includes whatever the allocator kept from earlier work.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---- the run ---------------------------------------------------------------------------------------------


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
    """

    model: Any
    out: Path
    settings: BenchSettings
    classifier: Any = None
    batch_size: int = 32
    log: Log | None = None

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def cell_file(self, entry: Entry, concept: str) -> Path:
        return self.out / "cells" / entry.slug / f"{slug(concept)}.json"

    def run_dir(self, entry: Entry, concept: str) -> Path:
        return self.out / "runs" / entry.slug / slug(concept)

    def patch_dir(self, part: tuple[str, str], concept: str) -> Path:
        return self.out / "patches" / slug(f"{part[0]}:{part[1]}") / slug(concept)

    # ---- patches -----------------------------------------------------------------------------------

    def part_patch(self, part: tuple[str, str], concept: str, kind: str) -> tuple[Any, dict[str, Any]]:
        """The patch of one (method, preset) for ``concept`` and its cost; erased once, then read back."""
        from erasekit.patch import Patch
        from erasekit.registry import erase

        where = self.patch_dir(part, concept)
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
        metrics = self.evaluate(entry, concept, [patch] if patch is not None else [])
        cell = {
            "entry": entry.label,
            "parts": [list(p) for p in entry.parts],
            "concept": concept,
            "concept_type": kind,
            "metrics": pick_metrics(metrics),
            **cost,
            "patch": patch.summary() if patch is not None else None,
            "run": str(self.run_dir(entry, concept).relative_to(self.out)),
            "cell_seconds": round(time.perf_counter() - start, 2),
        }
        atomic_write_json(cell_file, cell)
        self.say(f"done {entry.label} {concept!r}: {_brief(cell)}")
        return cell

    def evaluate(self, entry: Entry, concept: str, patches: list[Any]) -> dict[str, Any]:
        """The evaluation run's metrics (a finished run is read back, an unfinished one resumed)."""
        from erasekit.evaluation.canvas import evaluate_minicanvas
        from erasekit.evaluation.record import read_run

        run = self.run_dir(entry, concept)
        if (run / "metrics.json").is_file():
            return read_run(run)["metrics"]
        self.say(f"evaluate {entry.label} {concept!r}")
        s = self.settings
        return evaluate_minicanvas(
            self.model, run, target=concept, patches=patches, seeds=s.seeds, steps=s.steps,
            batch_size=self.batch_size, classifier=self.classifier, objects=s.objects, styles=s.styles,
        )  # fmt: skip

    def run(self, entries: Sequence[Entry], concepts: Sequence[str]) -> list[dict[str, Any]]:
        """Every entry on every concept, the base model first; cells that fail are logged and left unfinished.

        Returns:
            The finished cells (base cells included).
        """
        from erasekit.minicanvas.world import concept_kind

        cells, order = [], [Entry(()), *entries]
        for entry in order:
            for concept in concepts:
                try:
                    cells.append(self.run_cell(entry, concept, concept_kind(concept)))
                except ErasekitError as e:
                    self.say(f"FAILED {entry.label} {concept!r}: {e}")
        return cells


def stack(patches: Sequence[Any], label: str = "") -> Any:
    """Compose patches that change disjoint tensors; overlapping ones are refused with a one-line error."""
    from erasekit.patch import Patch

    try:
        return Patch.compose(patches, merge=None)
    except ErasekitError as e:
        raise ErasekitError(f"cannot stack {label or 'these patches'}: {e}") from None


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


def _brief(cell: dict[str, Any]) -> str:
    m = cell["metrics"]
    parts = [f"{k} {m[k]:.1f}" for k in ("UA", "IRA", "CRA", "UA_synonyms") if m.get(k) is not None]
    if cell.get("erase_seconds") is not None:
        parts.append(f"erase {cell['erase_seconds']:.1f} s")
    return ", ".join(parts) + f" ({cell['cell_seconds']:.0f} s)"


def _read_json(path: Path) -> dict[str, Any]:
    import json

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
    import json

    return json.loads(json.dumps(obj, sort_keys=True))


# ---- the whole leaderboard -------------------------------------------------------------------------------


def run_bench(
    model: Any,
    out: str | Path,
    entries: Sequence[Entry],
    concepts: Sequence[str],
    *,
    settings: BenchSettings,
    classifier: Any = None,
    batch_size: int = 32,
    not_run: dict[str, str] | None = None,
    concept_seed: int | None = None,
    command: str = "",
    overwrite: bool = False,
    log: Log | None = None,
) -> Any:
    """Run every entry (and the base model) on every concept, then write the leaderboard and the report.

    Args:
        model: a :class:`~erasekit.models.loading.LoadedModel` with a MiniCanvas-like pipeline.
        out: the leaderboard directory (an unfinished one of the same model and settings is resumed).
        entries: the rows to run (see :func:`parse_entries`).
        concepts: MiniCanvas styles and objects to erase, one at a time.
        settings: the evaluation settings.
        classifier: the two-head classifier (``None``: the built-in MiniCanvas one).
        batch_size: images per pipeline call (runtime only).
        not_run: ``{label: reason}``: rows shown as "not run: reason" instead of being run.
        concept_seed: the seed the concepts were sampled with, for the page (``None``: given by hand).
        command: the exact command that reproduces the leaderboard.
        overwrite: delete an existing leaderboard at ``out`` first.
        log: receives one line per step.

    Returns:
        The :class:`~erasekit.leaderboard.Board` written to ``out/leaderboard.md`` and ``out/report.html``.
    """
    from dataclasses import asdict

    from erasekit.evaluation.classifiers import builtin_classifier
    from erasekit.evaluation.record import model_fingerprint
    from erasekit.leaderboard import Board, markdown, write_html

    not_run = dict(not_run or {})
    classifier = classifier or builtin_classifier(device=getattr(model.pipeline, "device", "cpu"))
    by_kind = check_concepts(concepts, settings, classifier)
    for entry in entries:
        check_stack(entry)
    identity = {"model": model.source, "model_sha256": model_fingerprint(model.components),
                "classifier": classifier.source, "settings": asdict(settings)}  # fmt: skip
    out = open_bench(out, identity, overwrite)
    labels = [e.label for e in entries]
    write_bench_file(out, identity, {"entries": labels, "concepts": list(concepts), "not_run": not_run,
                                     "concept_seed": concept_seed, "command": command})  # fmt: skip
    bench = Bench(model, out, settings, classifier, batch_size, log)
    cells = bench.run([e for e in entries if e.label not in not_run], concepts)
    board = Board(labels=(BASE, *labels), concepts=by_kind, cells=cells, not_run=not_run, command=command,
                  notes=_notes(settings, concept_seed, model.source))  # fmt: skip
    atomic_write_text(out / "leaderboard.md", markdown(board))
    write_html(board, out, out / "report.html")
    return board


def check_concepts(concepts: Sequence[str], settings: BenchSettings, classifier: Any) -> dict[str, list[str]]:
    """``{"style": [...], "object": [...]}``; unknown, repeated or off-grid concepts are refused."""
    from erasekit.minicanvas.world import concept_kind

    if not concepts:
        raise ErasekitError("no concepts to erase")
    if len(set(concepts)) != len(concepts):
        raise ErasekitError(f"a concept is listed twice in {', '.join(concepts)}")
    grid = {
        "style": settings.styles or classifier.style_names,
        "object": settings.objects or classifier.object_names,
    }
    by_kind: dict[str, list[str]] = {"style": [], "object": []}
    for concept in concepts:
        kind = concept_kind(concept)
        if concept not in grid[kind]:
            raise ErasekitError(
                f"{concept!r} is not a {kind} of the evaluation grid ({', '.join(grid[kind])})"
            )
        by_kind[kind].append(concept)
    return by_kind


def _notes(settings: BenchSettings, concept_seed: int | None, model: str) -> tuple[str, ...]:
    from erasekit.minicanvas.evaluate import DEFAULT_STEPS
    from erasekit.provenance import git_commit, hardware

    hw = hardware()
    chosen = f"chosen at random with seed {concept_seed}" if concept_seed is not None else "chosen by hand"
    return (
        f"Model `{model}`; concepts {chosen}; each erased alone, then the full grid evaluated with "
        f"{settings.seeds} seed(s) per cell and {settings.steps or DEFAULT_STEPS} denoising steps.",
        f"Measured on {hw['cpus']} CPU core(s), {hw['torch_threads']} torch thread(s), {hw['machine']}; "
        f"erasekit commit {(git_commit() or 'unknown')[:10]}.",
    )
