"""``erasekit bench``: every method on the same sampled MiniCanvas concepts, evaluated the same way.

A leaderboard is a directory that fills up cell by cell, so a run cut short resumes where it stopped::

    DIR/bench.json                          what identifies the results (model, sampling, grid) and the last command
    DIR/patches/<method-preset>/<concept>/  each single method's patch (reused by stacked entries)
    DIR/patches/<method-preset>/<concept>.json  its cost: erase seconds and peak memory
    DIR/runs/<entry>/<concept>/             the evaluation run (images, manifest, metrics, record)
    DIR/cells/<entry>/<concept>.json        the cell's result; its presence marks the cell finished
    DIR/attacks/<attack>/<entry>/<concept>.json, DIR/attack-runs/...   attack columns (:mod:`.attacks`)
    DIR/leaderboard.md, DIR/report.html     the tables and the page (:mod:`erasekit.bench.board`)
    DIR/attack-sheets/<attack>.png          each attack column's first images per entry and concept

An entry is one row of the leaderboard: ``method``, ``method:preset``, or a stack ``hirm-r+uce`` whose patches
(touching disjoint tensors) are composed and measured as a method of its own. ``base`` is the unpatched model.

Modules: ``entries`` (rows, stacking, concept sampling), ``memory`` (peak RSS), ``cells`` (the directory and
its cells), ``board`` (means, spreads, Markdown and HTML).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erasekit.bench.attacks import BenchAttack, parse_attacks
from erasekit.bench.cells import (
    Bench,
    BenchSettings,
    Log,
    open_bench,
    read_attack_cells,
    read_cells,
    write_bench_file,
)
from erasekit.bench.entries import BASE, Entry, check_stack, parse_entries, sample_concepts, stack
from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_bytes, atomic_write_text

__all__ = ["BASE", "Bench", "BenchAttack", "BenchSettings", "Entry", "parse_attacks", "check_stack", "parse_entries", "run_bench",
           "sample_concepts", "stack"]  # fmt: skip


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
    shard: tuple[int, int] = (0, 1),
    run: bool = True,
    log: Log | None = None,
    attacks: Sequence[BenchAttack] = (),
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

    Returns:
        The :class:`~erasekit.bench.board.Board` written to ``out/leaderboard.md`` and ``out/report.html``.
    """
    from dataclasses import asdict

    from erasekit.bench.board import Board, attack_sheet, markdown, write_html
    from erasekit.evaluation.classifiers import builtin_classifier
    from erasekit.evaluation.record import model_fingerprint

    not_run = dict(not_run or {})
    classifier = classifier or builtin_classifier(device=getattr(model.pipeline, "device", "cpu"))
    by_kind = check_concepts(concepts, settings, classifier)
    for entry in entries:
        check_stack(entry)
    if not 0 <= shard[0] < shard[1]:
        raise ErasekitError(f"shard {shard[0]} of {shard[1]} does not exist")
    # Content, not names: the same weights read from another folder resume the same leaderboard.
    identity = {"model_sha256": model_fingerprint(model.components),
                "classifier_sha256": model_fingerprint({"classifier": classifier.module}),
                "settings": asdict(settings)}  # fmt: skip
    out = open_bench(out, identity, overwrite)
    labels = [e.label for e in entries]
    labels += [label for label in not_run if label not in labels]
    write_bench_file(out, identity, {"model": model.source, "classifier": classifier.source, "entries": labels,
                                     "concepts": list(concepts), "not_run": not_run, "concept_seed": concept_seed,
                                     "attacks": [a.label for a in attacks], "command": command})  # fmt: skip
    bench = Bench(model, out, settings, classifier, batch_size, log, attacks=attacks)
    if run:
        bench.run([e for e in entries if e.label not in not_run], list(concepts)[shard[0] :: shard[1]])
    cells = read_cells(out, [BASE, *labels], concepts)
    board = Board(labels=(BASE, *labels), concepts=by_kind, cells=cells, not_run=not_run, command=command,
                  failed=bench.failures, notes=_notes(settings, concept_seed, model.source),
                  attacks=tuple(a.label for a in attacks),
                  attack_cells=read_attack_cells(out, attacks, [BASE, *labels], concepts))  # fmt: skip
    atomic_write_text(out / "leaderboard.md", markdown(board))
    sheets = {a.label: png for a in attacks if (png := attack_sheet(board, out, a.label))}
    for attack in attacks:
        if attack.label in sheets:
            atomic_write_bytes(out / "attack-sheets" / f"{attack.key}.png", sheets[attack.label])
    write_html(board, out, out / "report.html", sheets=sheets)
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
