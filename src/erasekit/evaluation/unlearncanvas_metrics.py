"""UnlearnCanvas's metrics (UA, IRA, CRA) and the per-class accuracy matrix, from classifier verdicts.

Definitions (Zhang et al., NeurIPS 2024 D&B), in percent, for a target style ``s``:

- **UA** (unlearning accuracy) = 100 - style accuracy on the images prompted with style ``s``, over all objects;
- **IRA** (in-domain retain accuracy) = the mean, over every *other* style of the evaluated grid, of that style's
  accuracy (per-class accuracies averaged with equal weight);
- **CRA** (cross-domain retain accuracy) = object accuracy over all images of the grid, target style included.

For a target object the roles of style and object swap. Choices where the paper is ambiguous:

- "Other styles" are the styles *in the evaluated grid* except the target: 49 on the real benchmark's 50
  fine-tuned styles, 11 on MiniCanvas's 12. The classifier's extra classes (UnlearnCanvas's 51st, "photo") are
  never averaged over, but a prediction of one counts as wrong.
- Per-class accuracies are averaged with equal weight (with a balanced grid this equals the image average).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from erasekit.errors import ErasekitError

KINDS = ("object", "style")


def _other(kind: str) -> str:
    return "style" if kind == "object" else "object"


def _pct(hits: Sequence[bool]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else float("nan")


def accuracy(records: Sequence[dict[str, Any]], kind: str) -> float:
    """Percent of ``records`` whose predicted ``kind`` equals the prompted one.

    Args:
        records: dicts with ``object``, ``style`` (prompted) and ``pred_object``, ``pred_style`` (classified).
        kind: ``"object"`` or ``"style"``.
    """
    return _pct([r[f"pred_{kind}"] == r[kind] for r in records])


def per_class(records: Sequence[dict[str, Any]], kind: str, classes: Sequence[str]) -> dict[str, float]:
    """``{class: accuracy of kind on the images prompted with that class}`` for every class with images."""
    return {
        c: accuracy([r for r in records if r[kind] == c], kind)
        for c in classes
        if any(r[kind] == c for r in records)
    }


def matrix(
    records: Sequence[dict[str, Any]], objects: Sequence[str], styles: Sequence[str]
) -> dict[str, Any]:
    """The per-cell accuracy matrix: rows are objects, columns styles; ``None`` where a cell has no images."""
    out: dict[str, Any] = {"objects": list(objects), "styles": list(styles)}
    for kind in KINDS:
        rows = []
        for o in objects:
            cells = [[r for r in records if r["object"] == o and r["style"] == s] for s in styles]
            rows.append([accuracy(c, kind) if c else None for c in cells])
        out[f"{kind}_accuracy"] = rows
    return out


def unlearncanvas_metrics(
    records: Sequence[dict[str, Any]],
    objects: Sequence[str],
    styles: Sequence[str],
    target: str | None = None,
    target_type: str | None = None,
) -> dict[str, Any]:
    """All UnlearnCanvas numbers for one grid of classified images.

    Args:
        records: one dict per image (see :func:`accuracy`).
        objects: the grid's objects (matrix rows).
        styles: the grid's styles (matrix columns).
        target: the erased concept, or ``None`` for accuracies only.
        target_type: ``"object"`` or ``"style"`` (required with ``target``).

    Returns:
        ``object_accuracy``, ``style_accuracy``, ``per_class``, ``matrix`` and, with a target, ``UA``, ``IRA``,
        ``CRA``, ``target``, ``target_type``.
    """
    if not records:
        raise ErasekitError("no classified images to score")
    out: dict[str, Any] = {
        "images": len(records),
        "object_accuracy": accuracy(records, "object"),
        "style_accuracy": accuracy(records, "style"),
        "per_class": {
            "object": per_class(records, "object", objects),
            "style": per_class(records, "style", styles),
        },
        "matrix": matrix(records, objects, styles),
    }
    if target is not None:
        out.update(unlearning_scores(records, target, target_type, out["per_class"]))
    return out


def unlearning_scores(
    records: Sequence[dict[str, Any]],
    target: str,
    target_type: str | None,
    classes: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """UA, IRA and CRA for one target (see the module docstring)."""
    if target_type not in KINDS:
        raise ErasekitError(f"target type must be 'object' or 'style', not {target_type!r}")
    accs = classes[target_type]
    if target not in accs:
        raise ErasekitError(f"no images of the target {target_type} {target!r} in the grid")
    others = [a for c, a in accs.items() if c != target]
    if not others:
        raise ErasekitError(f"IRA needs at least one {target_type} besides {target!r} in the grid")
    return {
        "target": target,
        "target_type": target_type,
        "UA": 100.0 - accs[target],
        "IRA": sum(others) / len(others),
        "CRA": accuracy(records, _other(target_type)),
        "retained": sorted(c for c in accs if c != target),
    }


def target_rate(records: Sequence[dict[str, Any]], target: str, target_type: str) -> float:
    """Percent of images classified as ``target``: 100 - UA when they were all prompted with the target."""
    return _pct([r[f"pred_{target_type}"] == target for r in records])
