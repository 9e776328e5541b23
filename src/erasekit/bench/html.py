"""The leaderboard's one-page HTML report: tables, bar charts, attack sheets and image grids (embedded PNGs)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.bench.aggregate import (
    COLUMNS,
    KINDS,
    PERCENT,
    Board,
    aggregate,
    attack_budgets,
    attack_header,
    attack_rows,
    attack_title,
    table_rows,
)
from erasekit.bench.markdown import MEANINGS
from erasekit.bench.sheets import SHEET_NOTE, attack_sheet
from erasekit.evaluation.report import data_uri, figure_png, html_page, html_table, img_tag, spread
from erasekit.io import atomic_write_text

if TYPE_CHECKING:
    from erasekit.bench.timing import Timing

IMAGES_PER_SET = 4


def write_html(
    board: Board,
    out_dir: Path,
    path: Path,
    title: str = "MiniCanvas leaderboard",
    sheets: Mapping[str, bytes] | None = None,
) -> Path:
    """Write the one-page HTML report: tables, bar charts, and image grids for the first style and object.

    ``sheets``: the attack columns' image sheets by attack label, where the caller has made them already
    (:func:`~erasekit.bench.sheets.attack_sheet`); made here otherwise.
    """
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(n)}</p>" for n in board.notes)]
    missing = board.missing()
    if missing:
        body.append(f"<p><b>Partial:</b> {len(missing)} cell(s) missing.</p>")
    for kind in KINDS:
        if board.concepts.get(kind):
            body += _kind_section(board, kind)
    if sheets is None:
        sheets = {a: png for a in board.attacks if (png := attack_sheet(board, out_dir, a))}
    for attack, png in sheets.items():
        body += [f"<h2>Attack images: {html.escape(attack)}</h2><p>{html.escape(SHEET_NOTE)}</p>",
                 f'<img alt="{html.escape(attack)} images" src="{data_uri(png)}">']  # fmt: skip
    for kind in KINDS:
        if board.concepts.get(kind):
            body.append(_images(board, out_dir, board.concepts[kind][0]))
    body += [f"<h2>Reproduce</h2><pre>{html.escape(board.command)}</pre>",
             "<ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in MEANINGS) + "</ul>"]  # fmt: skip
    atomic_write_text(path, html_page(title, body))
    return path


def _kind_section(board: Board, kind: str, prefix: str = "", chart: bool = True) -> list[str]:
    """The table, the chart and the attack table of one concept type."""
    header = ["method", "n", *(html.escape(h) for _, h, _ in COLUMNS)]
    rows = [[html.escape(c) for c in r] for r in table_rows(board, kind)]
    out = [f"<h2>{prefix}{kind.title()}s: {html.escape(', '.join(board.concepts[kind]))}</h2>",
           html_table(header, rows), _chart(board, kind) if chart else ""]  # fmt: skip
    if board.attacks:
        head = [html.escape(h) for h in attack_header(board)]
        attack_table = [[html.escape(c) for c in r] for r in attack_rows(board, kind)]
        out += [f"<h3>Attacks on the {kind}s ({html.escape(attack_title(board))})</h3>", f"<p>{html.escape(attack_budgets(board))}</p>",
                html_table(head, attack_table)]  # fmt: skip
    return out


def _chart(board: Board, kind: str) -> str:
    """Grouped bars of the mean percentages per entry, with the 95% intervals as error bars."""
    stats = aggregate(board)
    labels = [label for label in board.run_labels() if stats[label][kind]["n"]]
    if not labels:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) * len(PERCENT) / 2 + 3), 3.6), dpi=100)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        est = [stats[label][kind][k] for k in PERCENT]
        means = [e.mean or 0.0 for e in est]
        errs = [[max(0.0, (e.mean or 0) - e.lo) if e.lo is not None else 0.0 for e in est],
                [max(0.0, e.hi - (e.mean or 0)) if e.hi is not None else 0.0 for e in est]]  # fmt: skip
        ax.bar([k + i * width for k in range(len(PERCENT))], means, width, yerr=errs, label=label, capsize=2)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(PERCENT))], [h for k, h, _ in COLUMNS[:4]])
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"percent (mean over {kind}s)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return f'<img class="chart" alt="bar chart of {kind} metrics" src="{data_uri(figure_png(fig))}">'


def _images(board: Board, out_dir: Path, concept: str) -> str:
    """One row per entry: a few of the target's grid images, then a few retained ones (same prompts, seeds)."""
    from erasekit.evaluation.runner import read_manifest

    runs = [(label, board.cell(label, concept)) for label in board.labels]
    runs = [(label, out_dir / cell.run) for label, cell in runs if cell is not None]
    runs = [
        (label, run) for label, run in runs if read_manifest(run)
    ]  # cells from a results copy have no images
    if not runs:
        return ""
    grid = [e for e in read_manifest(runs[0][1]) if e.get("meta", {}).get("set") == "grid"]
    hit = [e for e in grid if concept in (e["meta"].get("object"), e["meta"].get("style"))]
    kept = [e for e in grid if e not in hit]
    shown: list[dict[str, Any]] = spread(hit, IMAGES_PER_SET) + spread(kept, IMAGES_PER_SET)
    rows = []
    for label, run in runs:
        files = {e["key"]: run / e["file"] for e in read_manifest(run)}
        row = [html.escape(label)]
        row += [
            img_tag(files[e["key"]]) if e["key"] in files and files[e["key"]].is_file() else "" for e in shown
        ]
        rows.append(row)
    header = ["method", *(html.escape(f"{e['prompt']} (seed {e['seed']})") for e in shown)]
    title = f"Images: erasing {concept} (the first {len(spread(hit, IMAGES_PER_SET))} show the target)"
    return f"<h2>{html.escape(title)}</h2>" + html_table(header, rows)


def write_protocol_html(
    sweep: Board,
    test: Board,
    tuned: dict[str, Any],
    split: Any,
    timing: Timing | None,
    out_dir: Path,
    frontier: bytes | None,
    sheets: Mapping[str, bytes],
    title: str = "MiniCanvas leaderboard",
) -> Path:
    """The protocol page (as :func:`~erasekit.bench.markdown.protocol_markdown`), with the frontier plot, the
    attack sheets and image grids of the first test style and object."""
    from erasekit.bench.markdown import protocol_lines
    from erasekit.bench.protocol import RULE, tuned_setting

    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(n)}</p>" for n in test.notes)]
    if timing is not None:
        body.append(
            f"<p>Time of the whole bench (sweep, test and attacks): {html.escape(timing.describe())}.</p>"
        )
    missing = len(test.missing()) + len(sweep.missing())
    if missing:
        body.append(f"<p><b>Partial:</b> {missing} cell(s) missing.</p>")
    items = [
        *(line.removeprefix("- ") for line in protocol_lines(split, sweep)),
        f"Operating point (tuned): {RULE}.",
    ]
    body.append("<h2>Protocol</h2><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
    for kind in KINDS:
        if test.concepts.get(kind):
            body += _kind_section(test, kind, "Test ")
    if tuned:
        rows = [[html.escape(m), html.escape(tuned_setting(p))] for m, p in sorted(tuned.items())]
        body += ["<h2>Tuned settings (chosen on dev)</h2>", html_table(["method", "setting"], rows)]
    body.append("<h2>Dev sweep: UA–retention frontiers</h2>")
    if frontier is not None:
        body.append(f'<img class="chart" alt="UA against retention per method" src="{data_uri(frontier)}">')
    for kind in KINDS:
        if sweep.concepts.get(kind):
            body += _kind_section(sweep, kind, "Dev ", chart=False)
    for attack, png in sheets.items():
        body += [f"<h2>Attack images: {html.escape(attack)}</h2><p>{html.escape(SHEET_NOTE)}</p>",
                 f'<img alt="{html.escape(attack)} images" src="{data_uri(png)}">']  # fmt: skip
    for kind in KINDS:
        if test.concepts.get(kind):
            body.append(_images(test, out_dir, test.concepts[kind][0]))
    body += [f"<h2>Reproduce</h2><pre>{html.escape(test.command)}</pre>",
             "<ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in MEANINGS) + "</ul>"]  # fmt: skip
    path = out_dir / "report.html"
    atomic_write_text(path, html_page(title, body))
    return path
