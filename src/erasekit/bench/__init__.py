"""``erasekit bench``: every method on the same sampled MiniCanvas concepts, evaluated the same way.

A leaderboard is a directory that fills up cell by cell, so a run cut short resumes where it stopped; its layout
is :mod:`erasekit.bench.layout`. An entry is one row of the leaderboard: ``method``, ``method:preset``, or a
stack ``hirm-r+uce`` whose patches (touching disjoint tensors) are composed and measured as a method of its own.
``base`` is the unpatched model.

Modules, by job: ``entries`` (rows, concept sampling), ``layout`` (the directory, typed cells and their I/O),
``cells`` (erase, evaluate, attack: filling the directory), ``attacks`` (attack columns), ``memory`` (peak RSS),
``aggregate`` (means and spreads), ``markdown``, ``html`` and ``sheets`` (the page's parts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.bench.attacks import BenchAttack, parse_attacks
from erasekit.bench.cells import Bench, BenchSettings, Log
from erasekit.bench.entries import BASE, Entry, check_stack, parse_entries, sample_concepts
from erasekit.bench.layout import Layout
from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from erasekit.bench.aggregate import Board
    from erasekit.models.loading import LoadedModel

__all__ = ["BASE", "Bench", "BenchAttack", "BenchSettings", "Entry", "Layout", "check_stack", "parse_attacks",
           "parse_entries", "run_bench", "sample_concepts"]  # fmt: skip


def run_bench(
    model: LoadedModel,
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
    shard: tuple[int, int] = (0, 1),
    run: bool = True,
    log: Log | None = None,
    attacks: Sequence[BenchAttack] = (),
    results: str | Path | None = None,
) -> Board:
    """Run every entry (and the base model) on every concept, then write the leaderboard and the report.

    Args:
        model: a :class:`~erasekit.models.loading.LoadedModel` with a MiniCanvas-like pipeline.
        out: the leaderboard directory (an unfinished one of the same model and settings is resumed).
        entries: the rows to run (see :func:`parse_entries`).
        concepts: MiniCanvas styles and objects to erase, one at a time.
        settings: the evaluation settings.
        classifier: the two-head classifier (``None``: the built-in MiniCanvas one).
        batch_size: images per pipeline call (runtime only).
        not_run: ``{label: reason}``: rows shown as "not run: reason" instead of being run (labels as
            :attr:`Entry.label` writes them, e.g. ``advunlearn:paper``).
        concept_seed: the seed the concepts were sampled with, for the page (``None``: given by hand).
        command: the exact command that reproduces the leaderboard.
        overwrite: delete an existing leaderboard at ``out`` first.
        shard: ``(k, n)``: run only concepts ``k, k + n, ...`` (runtime only: n processes may fill one
            directory together; each writes the table of whatever is finished when it ends).
        run: ``False`` only rewrites the table and the page from the cells already finished.
        log: receives one line per step.
        attacks: attack columns, run on every finished cell's patch (and on the base model).
        results: a results copy (:mod:`erasekit.bench.layout`): its finished cells are taken first, and this
            directory's results are written back into it at the end.

    Returns:
        The :class:`~erasekit.bench.aggregate.Board` written to ``out/leaderboard.md`` and ``out/report.html``.
    """
    from dataclasses import asdict

    from erasekit.bench.aggregate import Board
    from erasekit.bench.html import write_html
    from erasekit.bench.markdown import markdown
    from erasekit.bench.sheets import attack_sheet
    from erasekit.evaluation.classifiers import load_classifier
    from erasekit.evaluation.record import model_fingerprint

    not_run = dict(not_run or {})
    classifier = classifier or load_classifier(None, device=getattr(model.pipeline, "device", "cpu"))
    by_kind = check_concepts(concepts, settings, classifier)
    for entry in entries:
        check_stack(entry)
    if not 0 <= shard[0] < shard[1]:
        raise ErasekitError(f"shard {shard[0]} of {shard[1]} does not exist")
    # Content, not names: the same weights read from another folder resume the same leaderboard.
    identity = {"model_sha256": model_fingerprint(model.components),
                "classifier_sha256": model_fingerprint({"classifier": classifier.module}),
                "settings": asdict(settings), "sampling": asdict(settings.sampling(model))}  # fmt: skip
    layout = Layout(Path(out)).open(identity, overwrite, results)
    labels = [e.label for e in entries]
    labels += [label for label in not_run if label not in labels]
    layout.write_bench_file(identity, {"model": model.source, "classifier": classifier.source, "entries": labels,
                                       "concepts": list(concepts), "not_run": not_run, "concept_seed": concept_seed,
                                       "attacks": [a.label for a in attacks], "command": command})  # fmt: skip
    bench = Bench(model, layout, settings, classifier, batch_size, log, attacks=attacks)
    if run:
        bench.run([e for e in entries if e.label not in not_run], list(concepts)[shard[0] :: shard[1]])
    rows = [BASE, *labels]
    parts = {e.label: e.parts for e in entries}
    board = Board(labels=tuple(rows), concepts=by_kind, cells=layout.cells(rows, concepts, parts), not_run=not_run,
                  command=command, failed=bench.failures, notes=notes_for(settings, concept_seed, model),
                  attacks=tuple(a.label for a in attacks),
                  attack_cells=layout.attack_cells(attacks, rows, concepts, parts))  # fmt: skip
    atomic_write_text(layout.root / "leaderboard.md", markdown(board))
    sheets = {a.label: png for a in attacks if (png := attack_sheet(board, layout.root, a.label))}
    for attack in attacks:
        if attack.label in sheets:
            atomic_write_bytes(layout.sheet_file(attack.key), sheets[attack.label])
    write_html(board, layout.root, layout.root / "report.html", sheets=sheets)
    if results is not None:
        layout.give_results(Path(results), identity)
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


def notes_for(
    settings: BenchSettings, concept_seed: int | None, model: LoadedModel, stage: str | None = None
) -> tuple[str, ...]:
    """The lines under a board's title: model, concepts, evaluation settings, hardware, commit."""
    from erasekit.provenance import git_commit, hardware

    hw = hardware()
    if stage is not None:
        chosen = f"the {stage} concepts of the split"
    else:
        chosen = (
            f"chosen at random with seed {concept_seed}" if concept_seed is not None else "chosen by hand"
        )
    sampling = settings.sampling(model)
    extra = "" if settings.generality else " (no generality images)"
    return (
        f"Model `{model.source}`; {chosen}; each erased alone, then the full grid evaluated with "
        f"{settings.seeds} seed(s) per cell{extra}, {sampling.steps} denoising steps, guidance {sampling.guidance:g}.",
        f"Measured on {hw['cpus']} CPU core(s), {hw['torch_threads']} torch thread(s), {hw['machine']}; "
        f"erasekit commit {(git_commit() or 'unknown')[:10]}.",
    )
