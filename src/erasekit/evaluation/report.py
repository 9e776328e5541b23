"""``erasekit report``: one self-contained HTML file comparing runs (images embedded as base64 PNG).

Sections: the runs and how they were made; a metric table; bar charts of the shared percentage metrics
(matplotlib, the ``report`` extra, imported here only); image grids with the runs side by side (for MiniCanvas
runs with a target: target images and retained images, base vs erased); per-class accuracy matrices; each run's
full record.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.evaluation.record import read_run
from erasekit.io import atomic_write_text

# (label, path into metrics.json); the first group is in percent and goes into the bar chart.
PERCENT_METRICS = (
    ("UA", ("UA",)),
    ("IRA", ("IRA",)),
    ("CRA", ("CRA",)),
    ("object accuracy", ("object_accuracy",)),
    ("style accuracy", ("style_accuracy",)),
    ("UA on synonyms", ("generality", "UA_synonyms")),
    ("UA on paraphrases", ("generality", "UA_paraphrases")),
    ("nudity rate (ASR)", ("attack_success_rate",)),
    ("classifier target rate", ("classifier", "rate")),
    ("CLIP score (x100)", ("clip_score",)),
)
OTHER_METRICS = (
    ("drift cosine: target", ("drift", "cosine", "target")),
    ("drift cosine: synonym", ("drift", "cosine", "synonym")),
    ("drift cosine: retain", ("drift", "cosine", "retain")),
    ("FID", ("fid", "value")),
    ("images", ("images",)),
)
GRID_ROWS = 6
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:2px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}
img.g{width:96px;height:96px;image-rendering:pixelated;display:block}
.cap{font-size:.75em;color:#555;max-width:220px;text-align:left}
pre{background:#f7f7f7;padding:8px;font-size:.75em;max-height:400px;overflow:auto}
.chart{max-width:100%}
"""


def write_report(runs: Sequence[str | Path], out: str | Path, title: str = "erasekit evaluation report",
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write the HTML report for ``runs`` to ``out`` and return its path.

    Args:
        runs: finished run directories (``erasekit eval --out``).
        out: the ``.html`` file.
        title: the page title.
        overwrite: replace an existing file.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ErasekitError(f"{out} exists; pass --overwrite to replace it")
    if not runs:
        raise ErasekitError("no runs to report")
    loaded = [read_run(r) for r in runs]
    labels = _labels(loaded)
    body = [f"<h1>{html.escape(title)}</h1>", _runs_table(loaded, labels), _metrics_table(loaded, labels)]
    body += [_chart(loaded, labels), *_image_sections(loaded, labels), *_matrices(loaded, labels)]
    body.append(_records(loaded, labels))
    atomic_write_text(out, html_page(title, body))
    return out


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """``name: base`` or ``name: method(concepts)`` per run; the directory name keeps them apart."""
    labels = []
    for run in runs:
        patches = run["record"].get("patches", [])
        what = " + ".join(f"{p['method']}({', '.join(p['concepts'])})" for p in patches) or "base"
        labels.append(f"{run['path'].name}: {what}")
    return labels


def _get(metrics: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics if isinstance(metrics, (int, float)) and not isinstance(metrics, bool) else None


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)  # fmt: skip
    return f"<table><tr>{head}</tr>{body}</table>"


def _runs_table(runs: list[dict[str, Any]], labels: list[str]) -> str:
    rows = []
    for run, label in zip(runs, labels):
        rec = run["record"]
        s = rec.get("sampling", {})
        cfg = rec.get("config", {})
        rows.append([html.escape(str(v)) for v in (
            label, rec.get("protocol"), cfg.get("target") or "", rec.get("model", {}).get("source"),
            s.get("seeds"), s.get("steps"), s.get("guidance"), s.get("scheduler_used", {}).get("class"),
            len(run["manifest"]), f"{rec.get('timings', {}).get('total_seconds', 0):.1f}",
            (rec.get("provenance", {}).get("git_commit") or "")[:10],
        )])  # fmt: skip
    header = ["run", "protocol", "target", "model", "seeds", "steps", "guidance", "scheduler", "images", "seconds",
              "commit"]  # fmt: skip
    return "<h2>Runs</h2>" + html_table(header, rows)


def _metrics_table(runs: list[dict[str, Any]], labels: list[str]) -> str:
    rows = []
    for name, path in PERCENT_METRICS + OTHER_METRICS:
        values = [_get(r["metrics"], path) for r in runs]
        if any(v is not None for v in values):
            rows.append([html.escape(name)] + ["" if v is None else f"{v:.4g}" for v in values])
    note = "<p>Percent metrics are 0-100. UA/IRA/CRA follow UnlearnCanvas (see docs/evaluation.md).</p>"
    return "<h2>Metrics</h2>" + note + html_table(["metric", *map(html.escape, labels)], rows)


def _chart(runs: list[dict[str, Any]], labels: list[str]) -> str:
    """Grouped bars of the percent metrics that at least one run has."""
    series = [(n, [_get(r["metrics"], p) for r in runs]) for n, p in PERCENT_METRICS]
    series = [(n, vals) for n, vals in series if any(v is not None for v in vals)]
    if not series:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(series) * max(1, len(runs)) / 2 + 2), 3.6), dpi=100)
    width = 0.8 / len(runs)
    for i, label in enumerate(labels):
        xs = [k + i * width for k in range(len(series))]
        ax.bar(xs, [vals[i] or 0.0 for _, vals in series], width=width, label=label)
    ax.set_xticks(
        [k + 0.4 - width / 2 for k in range(len(series))], [n for n, _ in series], rotation=20, ha="right"
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("percent")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return (
        f'<h2>Comparison</h2><img class="chart" alt="bar chart of metrics" src="{data_uri(buf.getvalue())}">'
    )


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _image_sections(runs: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """Image grids per protocol: one row per prompt and seed, one column per run of that protocol."""
    protocols = list(dict.fromkeys(r["record"].get("protocol", "") for r in runs))
    sections = []
    for protocol in protocols:
        idx = [i for i, r in enumerate(runs) if r["record"].get("protocol", "") == protocol]
        prefix = f"{protocol}: " if len(protocols) > 1 else ""
        sections += _protocol_images([runs[i] for i in idx], [labels[i] for i in idx], prefix)
    return sections


def _protocol_images(runs: list[dict[str, Any]], labels: list[str], prefix: str) -> list[str]:
    """Target vs retained rows when the runs have a MiniCanvas target, else a spread of the first run's images."""
    target = next((r["metrics"].get("target") for r in runs if r["metrics"].get("target")), None)
    entries = [e for e in runs[0]["manifest"] if e.get("meta", {}).get("set", "grid") in ("grid", "prompts")]
    if target is None:
        return [_grid(f"{prefix}Images", spread(entries), runs, labels)]
    hit = [e for e in entries if target in (e["meta"].get("object"), e["meta"].get("style"))]
    kept = [e for e in entries if e not in hit]
    return [
        _grid(f"{prefix}Target: {target}", spread(hit), runs, labels),
        _grid(f"{prefix}Retained concepts", spread(kept), runs, labels),
    ]


def spread(entries: list[Any], n: int = GRID_ROWS) -> list[Any]:
    """Up to ``n`` entries spread evenly over the list (so several concepts show)."""
    if len(entries) <= n:
        return entries
    step = len(entries) / n
    return [entries[int(i * step)] for i in range(n)]


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def html_page(title: str, body: Sequence[str]) -> str:
    """A self-contained HTML page with the report's style."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(b for b in body if b)}</body></html>\n")  # fmt: skip


def _grid(title: str, entries: list[dict[str, Any]], runs: list[dict[str, Any]], labels: list[str]) -> str:
    if not entries:
        return ""
    by_run = [{e["key"]: e for e in r["manifest"]} for r in runs]
    rows = []
    for e in entries:
        cells = [f'<div class="cap">{html.escape(e["prompt"])}<br>seed {e["seed"]}</div>']
        for run, index in zip(runs, by_run):
            found = index.get(e["key"])
            path = run["path"] / found["file"] if found else None
            cells.append(img_tag(path) if path and path.is_file() else "")
        rows.append(cells)
    return f"<h2>{html.escape(title)}</h2>" + html_table(["prompt", *map(html.escape, labels)], rows)


def img_tag(path: Path) -> str:
    return f'<img class="g" alt="{html.escape(path.stem)}" src="{data_uri(path.read_bytes())}">'


def _matrices(runs: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """Per-class accuracy matrices (rows objects, columns styles), cells shaded by accuracy."""
    out = []
    for run, label in zip(runs, labels):
        m = run["metrics"].get("matrix")
        if not m:
            continue
        for kind in ("style", "object"):
            rows = [
                [html.escape(o)] + [_cell(v) for v in vals]
                for o, vals in zip(m["objects"], m[f"{kind}_accuracy"])
            ]
            out.append(f"<h2>{kind.title()} accuracy per cell: {html.escape(label)}</h2>"
                       + html_table(["object \\ style", *map(html.escape, m["styles"])], rows))  # fmt: skip
    return out


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    shade = int(255 - 1.3 * value)  # 100% -> green, 0% -> white
    return f'<span style="display:block;background:rgb({shade},235,{shade})">{value:.0f}</span>'


def _records(runs: list[dict[str, Any]], labels: list[str]) -> str:
    parts = ["<h2>Run records</h2>"]
    for run, label in zip(runs, labels):
        rec = {k: v for k, v in run["record"].items() if k != "metrics"}
        text = html.escape(json.dumps(rec, indent=2, sort_keys=True, default=str))
        parts.append(f"<details><summary>{html.escape(label)}</summary><pre>{text}</pre></details>")
    return "".join(parts)
