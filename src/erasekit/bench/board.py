"""The leaderboard's tables and page, built from the cell JSONs of an ``erasekit bench`` directory.

:func:`aggregate` turns cells into means and spreads per entry and concept type; :func:`markdown` writes the
table for ``docs/leaderboard.md``; :func:`write_html` the one-page report with bar charts and image grids
(embedded PNGs, reusing :mod:`erasekit.evaluation.report`'s table and image helpers).
"""

from __future__ import annotations

import html
import io
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasekit.io import atomic_write_text

KINDS = ("style", "object")
# (cell key, column header, decimals); the first four are percentages from the evaluation.
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
        cells: the finished cells (dicts as written by :mod:`erasekit.bench`).
        not_run: ``{label: reason}`` for entries deliberately not run (shown as such).
        failed: ``{(label, concept): reason}`` of cells that failed (they count as missing).
        command: the exact command that reproduces the board.
        notes: extra lines for the page (settings, hardware).
        attacks: the attack columns' labels, in order.
        attack_cells: the finished attack cells (``"attack"``, ``"entry"``, ``"concept"``, ``"metrics"``).
    """

    labels: tuple[str, ...]
    concepts: dict[str, list[str]]
    cells: list[dict[str, Any]]
    not_run: dict[str, str] = field(default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    command: str = ""
    notes: tuple[str, ...] = ()
    attacks: tuple[str, ...] = ()
    attack_cells: list[dict[str, Any]] = field(default_factory=list)

    def cell(self, label: str, concept: str) -> dict[str, Any] | None:
        return next((c for c in self.cells if c["entry"] == label and c["concept"] == concept), None)

    def attack_cell(self, attack: str, label: str, concept: str) -> dict[str, Any] | None:
        return next(
            (
                c
                for c in self.attack_cells
                if (c["attack"], c["entry"], c["concept"]) == (attack, label, concept)
            ),
            None,
        )

    def missing(self) -> list[tuple[str, str]]:
        """``(label, concept)`` of every cell that should exist and does not (not-run entries excluded)."""
        return [
            (label, c)
            for label in self.labels
            if label not in self.not_run
            for kind in KINDS
            for c in self.concepts.get(kind, [])
            if self.cell(label, c) is None
        ] + [
            (f"{label} / {attack}", c)
            for attack in self.attacks
            for label in self.labels
            if label not in self.not_run
            for kind in KINDS
            for c in self.concepts.get(kind, [])
            if self.attack_cell(attack, label, c) is None
        ]


def cell_value(cell: Mapping[str, Any], key: str) -> float | None:
    """A column's value in one cell: a metric, or the erase cost."""
    value = cell["metrics"].get(key) if key in PERCENT else cell.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the spread is ``None`` below two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(board: Board) -> dict[str, dict[str, dict[str, Any]]]:
    """``{label: {kind: {"n": finished, "of": total, key: (mean, std)}}}`` over each kind's concepts."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label in board.labels:
        out[label] = {}
        for kind in KINDS:
            concepts = board.concepts.get(kind, [])
            cells = [c for c in (board.cell(label, x) for x in concepts) if c is not None]
            row: dict[str, Any] = {"n": len(cells), "of": len(concepts)}
            for key, _, _ in COLUMNS:
                row[key] = mean_std([v for v in (cell_value(c, key) for c in cells) if v is not None])
            out[label][kind] = row
    return out


def fmt(stat: tuple[float | None, float | None], decimals: int) -> str:
    """``12.3 ± 4.5``, ``12.3`` (one value) or ``–`` (none)."""
    mean, std = stat
    if mean is None:
        return "–"
    return f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")


def table_rows(board: Board, kind: str) -> list[list[str]]:
    """One row per entry for one concept type: label, concepts done, then every column."""
    stats = aggregate(board)
    rows = []
    for label in board.labels:
        if label in board.not_run:
            rows.append([label, f"not run: {board.not_run[label]}"] + ["–"] * len(COLUMNS))
            continue
        row = stats[label][kind]
        rows.append([label, f"{row['n']}/{row['of']}"] + [fmt(row[k], d) for k, _, d in COLUMNS])
    return rows


def attack_rows(board: Board, kind: str) -> list[list[str]]:
    """One row per entry: the mean ± spread of each attack's ASR over the kind's concepts, with ``(n/of)``."""
    concepts = board.concepts.get(kind, [])
    rows = []
    for label in board.labels:
        if label in board.not_run:
            continue
        row = [label]
        for attack in board.attacks:
            cells = [board.attack_cell(attack, label, c) for c in concepts]
            values = [float(c["metrics"]["ASR"]) for c in cells if c and c["metrics"].get("ASR") is not None]
            done = sum(c is not None for c in cells)
            row.append(
                fmt(mean_std(values), 1) + ("" if done == len(concepts) else f" ({done}/{len(concepts)})")
            )
        rows.append(row)
    return rows


def attack_header(board: Board) -> list[str]:
    """The attack tables' header: ``name:preset ASR ↓`` (the whole label where two columns share a name)."""
    short = [a.split(" (")[0] for a in board.attacks]
    names = short if len(set(short)) == len(short) else list(board.attacks)
    return ["method", *(f"{n} ASR ↓" for n in names)]


def attack_budgets(board: Board) -> str:
    """One line naming each attack column's budget overrides (the full budgets are in every cell's JSON)."""
    return "Attack budgets, the same for every method: " + "; ".join(f"`{a}`" for a in board.attacks) + "."


# ---- Attack image sheets ----------------------------------------------------------------------------------

SHEET_SCALE = 3
SHEET_LABEL_WIDTH = 190
SHEET_HEAD = 18
SUCCESS_RGB, FAILURE_RGB = (220, 40, 40), (200, 200, 200)
SHEET_NOTE = (
    "The first attacked images per concept; red frame: the erased concept came back, grey: it did not."
)


def attack_sheet(board: Board, out_dir: Path, attack: str, per_concept: int = 2) -> bytes | None:
    """A PNG: one row per entry, the first ``per_concept`` attacked images of each concept side by side.

    A red frame marks an image the detector read as the erased concept (the attack succeeded), a grey one an
    image it did not. Images are upscaled without smoothing. ``None`` when no cell of ``attack`` is finished.
    """
    import json

    from PIL import Image, ImageDraw

    concepts = [c for kind in KINDS for c in board.concepts.get(kind, [])]
    rows: list[tuple[str, list[list[tuple[Path, bool]]]]] = []
    for label in board.labels:
        shots = []
        for concept in concepts:
            cell = board.attack_cell(attack, label, concept)
            scores = out_dir / cell["run"] / "scores.jsonl" if cell else None
            if scores is None or not scores.is_file():
                shots.append([])
                continue
            lines = [json.loads(line) for line in scores.read_text().splitlines() if line.strip()]
            picked = [e for e in lines if e.get("phase", "attack") == "attack"][:per_concept]
            shots.append([(scores.parent / e["file"], bool(e["success"])) for e in picked])
        if any(shots):
            rows.append((label, shots))
    if not rows:
        return None
    first = next((p for _, shots in rows for cell in shots for p, _ in cell if p.is_file()), None)
    if first is None:
        return None
    with Image.open(first) as im:
        side = im.width * SHEET_SCALE
    tile, pad = side + 4, 6
    width = SHEET_LABEL_WIDTH + len(concepts) * (per_concept * tile + pad)
    sheet = Image.new("RGB", (width, SHEET_HEAD + len(rows) * (tile + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, concept in enumerate(concepts):
        draw.text((SHEET_LABEL_WIDTH + j * (per_concept * tile + pad), 3), concept, fill="black")
    for i, (label, shots) in enumerate(rows):
        y = SHEET_HEAD + i * (tile + 2)
        draw.text((4, y + tile // 2 - 6), label, fill="black")
        for j, cell in enumerate(shots):
            for k, (path, success) in enumerate(cell):
                x = SHEET_LABEL_WIDTH + j * (per_concept * tile + pad) + k * tile
                draw.rectangle(
                    (x, y, x + tile - 1, y + tile - 1), fill=SUCCESS_RGB if success else FAILURE_RGB
                )
                if path.is_file():  # a deleted image leaves its frame empty rather than losing the page
                    with Image.open(path) as im:
                        sheet.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (x + 2, y + 2))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


# ---- Markdown ----------------------------------------------------------------------------------------------

MEANINGS = (
    "UA (unlearning accuracy): percent of the target's grid images the classifier no longer labels as the target.",
    "IRA (in-domain retain accuracy): accuracy on the other concepts of the target's kind.",
    "CRA (cross-domain retain accuracy): accuracy on the concepts of the other kind.",
    "UA on synonyms: UA of images prompted with the target's synonyms (generality).",
    "Each number is the mean ± sample standard deviation (n − 1) over the concepts of that kind; `n` says how "
    "many of them finished.",
    "ASR (attack success rate): percent of the attack's generations the classifier labels as the erased "
    "concept (the attack's headline rule: see `erasekit attacks NAME`); the base row is the un-erased model's "
    "rate under the same attack.",
    "erase (s): wall time of the method's `erase()` on this machine; a stack adds up its parts.",
    "peak memory (MiB): the most resident memory (RSS) the process held during `erase()` above what it held when "
    "the erasure began (sampled every 5 ms, glibc free lists trimmed first); a stack shows its largest part. It "
    "excludes the loaded model, so it is the method's own working memory.",
)


def markdown(board: Board, title: str = "MiniCanvas leaderboard") -> str:
    """The leaderboard as Markdown: status, one table per concept type, the command, what the numbers mean."""
    lines = [f"# {title}", ""]
    missing = board.missing()
    if missing:
        lines += [f"> **Partial:** {len(missing)} cell(s) did not finish: "
                  + ", ".join(_missing(board, m, c) for m, c in missing) + ".", ""]  # fmt: skip
    lines += [*board.notes, ""] if board.notes else []
    header = ["method", "n", *(h for _, h, _ in COLUMNS)]
    for kind in KINDS:
        if not board.concepts.get(kind):
            continue
        lines += [f"## {kind.title()}s: {', '.join(board.concepts[kind])}", ""]
        lines += [_md_row(header), _md_row(["---"] * len(header))]
        lines += [_md_row(r) for r in table_rows(board, kind)] + [""]
        if board.attacks:
            head = attack_header(board)
            lines += [
                f"### Attacks on the {kind}s (ASR %, mean ± std over the {kind}s)",
                "",
                attack_budgets(board),
                "",
            ]
            lines += [_md_row(head), _md_row(["---"] * len(head))]
            lines += [_md_row(r) for r in attack_rows(board, kind)] + [""]
    lines += ["## Reproduce", "", "```", board.command, "```", "", "## What the numbers mean", ""]
    lines += [f"- {m}" for m in MEANINGS] + [""]
    return "\n".join(lines)


def _missing(board: Board, label: str, concept: str) -> str:
    reason = board.failed.get((label, concept))
    return f"`{label}` on {concept}" + (f" (failed: {reason})" if reason else "")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


# ---- HTML ------------------------------------------------------------------------------------------------

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
    (:func:`attack_sheet`); made here otherwise.
    """
    from erasekit.evaluation.report import CSS, _data_uri, _table

    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f"<p>{html.escape(n)}</p>" for n in board.notes]
    missing = board.missing()
    if missing:
        body.append(f"<p><b>Partial:</b> {len(missing)} cell(s) missing.</p>")
    header = ["method", "n", *(html.escape(h) for _, h, _ in COLUMNS)]
    for kind in KINDS:
        if board.concepts.get(kind):
            rows = [[html.escape(c) for c in r] for r in table_rows(board, kind)]
            body += [f"<h2>{kind.title()}s: {html.escape(', '.join(board.concepts[kind]))}</h2>",
                     _table(header, rows), _chart(board, kind)]  # fmt: skip
            if board.attacks:
                head = [html.escape(h) for h in attack_header(board)]
                attack_table = [[html.escape(c) for c in r] for r in attack_rows(board, kind)]
                body += [f"<h3>Attacks on the {kind}s (ASR %)</h3>", f"<p>{html.escape(attack_budgets(board))}</p>",
                         _table(head, attack_table)]  # fmt: skip
    if sheets is None:
        sheets = {a: png for a in board.attacks if (png := attack_sheet(board, out_dir, a))}
    for attack, png in sheets.items():
        body += [f"<h2>Attack images: {html.escape(attack)}</h2><p>{html.escape(SHEET_NOTE)}</p>",
                 f'<img alt="{html.escape(attack)} images" src="{_data_uri(png)}">']  # fmt: skip
    for kind in KINDS:
        if board.concepts.get(kind):
            body.append(_images(board, out_dir, board.concepts[kind][0]))
    body += [f"<h2>Reproduce</h2><pre>{html.escape(board.command)}</pre>",
             "<ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in MEANINGS) + "</ul>"]  # fmt: skip
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(b for b in body if b)}</body></html>\n")  # fmt: skip
    atomic_write_text(path, page)
    return path


def _chart(board: Board, kind: str) -> str:
    """Grouped bars of the mean percentages per entry, with the spread as error bars."""
    stats = aggregate(board)
    labels = [label for label in board.labels if label not in board.not_run and stats[label][kind]["n"]]
    if not labels:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) * len(PERCENT) / 2 + 3), 3.6), dpi=100)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        means = [stats[label][kind][k][0] or 0.0 for k in PERCENT]
        errs = [stats[label][kind][k][1] or 0.0 for k in PERCENT]
        ax.bar([k + i * width for k in range(len(PERCENT))], means, width, yerr=errs, label=label, capsize=2)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(PERCENT))], [h for k, h, _ in COLUMNS[:4]])
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"percent (mean over {kind}s)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from erasekit.evaluation.report import _data_uri

    return f'<img class="chart" alt="bar chart of {kind} metrics" src="{_data_uri(buf.getvalue())}">'


def _images(board: Board, out_dir: Path, concept: str) -> str:
    """One row per entry: a few of the target's grid images, then a few retained ones (same prompts, seeds)."""
    from erasekit.evaluation.report import _img, _table
    from erasekit.evaluation.runner import read_manifest

    runs = [(label, board.cell(label, concept)) for label in board.labels]
    runs = [(label, out_dir / cell["run"]) for label, cell in runs if cell is not None]
    if not runs:
        return ""
    grid = [e for e in read_manifest(runs[0][1]) if e.get("meta", {}).get("set") == "grid"]
    hit = [e for e in grid if concept in (e["meta"].get("object"), e["meta"].get("style"))]
    kept = [e for e in grid if e not in hit]
    shown = _spread(hit, IMAGES_PER_SET) + _spread(kept, IMAGES_PER_SET)
    rows = []
    for label, run in runs:
        files = {e["key"]: run / e["file"] for e in read_manifest(run)}
        row = [html.escape(label)]
        row += [
            _img(files[e["key"]]) if e["key"] in files and files[e["key"]].is_file() else "" for e in shown
        ]
        rows.append(row)
    header = ["method", *(html.escape(f"{e['prompt']} (seed {e['seed']})") for e in shown)]
    title = f"Images: erasing {concept} (the first {len(_spread(hit, IMAGES_PER_SET))} show the target)"
    return f"<h2>{html.escape(title)}</h2>" + _table(header, rows)


def _spread(entries: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` entries spread evenly over the list."""
    if len(entries) <= n:
        return entries
    return [entries[int(i * len(entries) / n)] for i in range(n)]
