"""The protocol leaderboard in one resumable directory: sweep on dev, choose ``tuned``, report test, attack.

Stages (each skips what is finished, so a restart resumes):

1. **Sweep** every method that names a strength knob over its grid on the dev concepts (base model included);
   the evaluation leaves out the generality images there (the frontier needs UA, IRA and CRA).
2. **Operating point**: the rule of :mod:`erasekit.bench.protocol` picks each method's ``tuned`` setting per
   concept type from the dev means; ``DIR/tuned.json``.
3. **Test**: every method at ``paper`` and at ``tuned`` (and the stacks, made of tuned parts unless they name a
   preset), on the test concepts, with the full evaluation; intervals over concepts and seeds.
4. **Attacks**: every test row faces every attack column, with the same budget.

``DIR/leaderboard.md`` and ``DIR/report.html`` show the split, the rule, the dev frontiers (``DIR/frontier.png``),
the test tables and the attack tables; ``DIR/timing.json`` records every invocation (:mod:`erasekit.bench.timing`),
and the pages give the elapsed time (shards side by side counted once) and the time summed over invocations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.bench.cells import Bench, BenchSettings, Log
from erasekit.bench.entries import BASE, TUNED, Entry, Part, check_stack, parse_entries
from erasekit.bench.layout import Layout
from erasekit.bench.protocol import Point, Split, operating_point, sweep_entries, write_tuned
from erasekit.bench.timing import TIMING_FILE, Timing, record_session
from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from erasekit.bench.aggregate import Board
    from erasekit.bench.attacks import BenchAttack
    from erasekit.models.loading import LoadedModel


@dataclass(frozen=True)
class Leaderboard:
    """What one invocation produced: the dev sweep's board, the test board, and the tuned parts."""

    sweep: Board
    test: Board
    tuned: dict[str, Part]


def run_leaderboard(
    model: LoadedModel,
    out: str | Path,
    methods: Sequence[str],
    split: Split,
    *,
    settings: BenchSettings,
    stacks: Sequence[str] = (),
    attacks: Sequence[BenchAttack] = (),
    classifier: Any = None,
    batch_size: int = 32,
    not_run: dict[str, str] | None = None,
    command: str = "",
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    run: bool = True,
    log: Log | None = None,
    results: str | Path | None = None,
) -> Leaderboard:
    """Run the four stages of the module docstring and write the page.

    Args:
        methods: registry names; each gets a ``paper`` and a ``tuned`` row (a method without a strength knob:
            ``paper`` only).
        split: the dev/test split.
        settings: the test evaluation (the sweep uses the same without generality images).
        stacks: ``a+b`` entries; parts without a preset are the methods' ``tuned`` settings.
        not_run: ``{label: reason}``: test rows shown as "not run" instead of being run.
        shard: ``(k, n)``: run only concepts ``k, k + n, ...`` of each stage (runtime only).
        run: ``False`` only rewrites the page from the finished cells (and the tuned file from the sweep).
        results: a results copy (:mod:`erasekit.bench.layout`): its finished cells are taken first, and this
            directory's results are written back into it at the end.
    """
    from erasekit.bench import check_concepts
    from erasekit.evaluation.classifiers import load_classifier
    from erasekit.evaluation.record import model_fingerprint

    started = time.time()
    classifier = classifier or load_classifier(None, device=getattr(model.pipeline, "device", "cpu"))
    sweep_settings = replace(settings, generality=False)
    dev, test = (
        check_concepts(split.dev, settings, classifier),
        check_concepts(split.test, settings, classifier),
    )
    if not 0 <= shard[0] < shard[1]:
        raise ErasekitError(f"shard {shard[0]} of {shard[1]} does not exist")
    from dataclasses import asdict

    identity = {"model_sha256": model_fingerprint(model.components),
                "classifier_sha256": model_fingerprint({"classifier": classifier.module}),
                "settings": asdict(settings), "sweep_settings": asdict(sweep_settings),
                "sampling": asdict(settings.sampling(model)), "split_seed": split.seed}  # fmt: skip
    layout = Layout(Path(out)).open(identity, overwrite, results)
    layout.write_bench_file(identity, {"model": model.source, "classifier": classifier.source, "methods": list(methods),
                                       "stacks": list(stacks), "dev": list(split.dev), "test": list(split.test),
                                       "attacks": [a.label for a in attacks], "command": command})  # fmt: skip
    not_run = dict(not_run or {})
    swept = sweep_entries(methods)
    sweeper = Bench(model, layout, sweep_settings, classifier, batch_size, log, joint=True)
    if run:
        sweeper.run(swept, list(split.dev)[shard[0] :: shard[1]])
    sweep_board = _board(layout, swept, dev, sweeper, (), {}, model, settings, "dev sweep")
    tuned = choose_tuned(layout, methods, sweep_board)
    rows = leaderboard_rows(methods, stacks, tuned)
    for entry in rows:
        check_stack(entry)
    tester = Bench(model, layout, settings, classifier, batch_size, log, attacks=attacks)
    if run:
        tester.run([e for e in rows if e.label not in not_run], list(split.test)[shard[0] :: shard[1]])
    test_board = _board(layout, rows, test, tester, attacks, not_run, model, settings, "test", command)
    _record_time(layout, started, run)
    write_page(layout, sweep_board, test_board, tuned, split, attacks)
    if results is not None:
        layout.give_results(Path(results), identity)
    return Leaderboard(sweep_board, test_board, tuned)


def leaderboard_rows(methods: Sequence[str], stacks: Sequence[str], tuned: dict[str, Part]) -> list[Entry]:
    """``m:paper`` and ``m:tuned`` for every method (``tuned`` once chosen), then the stacks.

    A stack's part without a preset is the method's ``tuned`` setting when the method is swept here (the stack
    waits until it is chosen), else the method's default preset.
    """
    from erasekit.registry import METHODS

    rows = parse_entries(list(methods), ["paper"])
    rows += [e for e in parse_entries([m for m in methods if m in tuned], [TUNED], tuned) if e not in rows]
    for text in stacks:
        names = [p.strip() for p in text.split("+")]
        if any(
            ":" not in n and METHODS.get(n).name in methods and METHODS.get(n).name not in tuned
            for n in names
        ):
            continue
        parts = [n if ":" in n or METHODS.get(n).name not in tuned else f"{n}:{TUNED}" for n in names]
        rows += [e for e in parse_entries(["+".join(parts)], (), tuned) if e not in rows]
    return rows


def choose_tuned(layout: Layout, methods: Sequence[str], board: Board) -> dict[str, Part]:
    """Apply the operating-point rule to every method whose dev sweep is complete; write ``DIR/tuned.json``."""
    from erasekit.bench.aggregate import KINDS, aggregate
    from erasekit.bench.protocol import read_tuned, sweep_parts

    stats = aggregate(board)
    base = {kind: {k: stats[BASE][kind][k].mean for k in ("UA", "IRA", "CRA")} for kind in KINDS}
    chosen: dict[str, dict[str, tuple[Point, list[Point]]]] = {}
    for method in methods:
        parts = sweep_parts(method)
        if not parts or any(stats[Entry((p,)).label][k]["n"] < stats[Entry((p,)).label][k]["of"]
                            for p in parts for k in KINDS):  # fmt: skip
            continue
        if None in (base[k]["IRA"] for k in KINDS):
            continue
        chosen[method] = {}
        for kind in KINDS:
            row = [stats[Entry((p,)).label][kind] for p in parts]
            points = [Point(p, r["UA"].mean, r["IRA"].mean, r["CRA"].mean) for p, r in zip(parts, row)]
            chosen[method][kind] = (operating_point(points, base[kind]["IRA"], base[kind]["CRA"]), points)
    if chosen:
        write_tuned(layout.root, chosen, base)
    return read_tuned(layout.root)


def _board(
    layout: Layout, entries: Sequence[Entry], by_kind: dict[str, list[str]], bench: Bench,
    attacks: Sequence[BenchAttack], not_run: dict[str, str], model: LoadedModel, settings: BenchSettings,
    stage: str, command: str = "",
) -> Board:  # fmt: skip
    """The board of ``entries`` (and the ``not_run`` labels) from the cells on disk; cells made with another
    setting of a label (a ``tuned`` row whose choice has changed) are left out."""
    from erasekit.bench import notes_for
    from erasekit.bench.aggregate import Board

    labels = [e.label for e in entries]
    rows = [BASE, *labels, *(label for label in not_run if label not in labels)]
    parts = {e.label: e.parts for e in entries}
    concepts = [c for kind in ("style", "object") for c in by_kind.get(kind, [])]
    return Board(labels=tuple(rows), concepts=by_kind, cells=layout.cells(rows, concepts, parts), not_run=not_run,
                 command=command, failed=bench.failures, notes=notes_for(settings, None, model, stage),
                 attacks=tuple(a.label for a in attacks),
                 attack_cells=layout.attack_cells(attacks, rows, concepts, parts))  # fmt: skip


def _record_time(layout: Layout, started: float, ran: bool) -> None:
    """Append this invocation to ``DIR/timing.json`` (a table-only invocation is recorded as such)."""
    record_session(layout.root / TIMING_FILE, started, time.time() - started, ran)


def write_page(
    layout: Layout,
    sweep: Board,
    test: Board,
    tuned: dict[str, Part],
    split: Split,
    attacks: Sequence[BenchAttack],
) -> None:
    """``leaderboard.md``, ``report.html``, ``frontier.png`` and the attack sheets."""
    from erasekit.bench.frontier import frontier_png
    from erasekit.bench.html import write_protocol_html
    from erasekit.bench.markdown import protocol_markdown
    from erasekit.bench.sheets import attack_sheet

    frontier = frontier_png(sweep, tuned)
    if frontier is not None:
        atomic_write_bytes(layout.root / "frontier.png", frontier)
    timing = Timing.read(layout.root / TIMING_FILE)
    atomic_write_text(layout.root / "leaderboard.md", protocol_markdown(sweep, test, tuned, split, timing))
    sheets = {a.label: png for a in attacks if (png := attack_sheet(test, layout.root, a.label))}
    for attack in attacks:
        if attack.label in sheets:
            atomic_write_bytes(layout.sheet_file(attack.key), sheets[attack.label])
    write_protocol_html(sweep, test, tuned, split, timing, layout.root, frontier, sheets)
