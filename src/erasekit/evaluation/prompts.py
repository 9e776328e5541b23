"""Loaders for the public prompt sets that users download themselves.

Every loader returns a list of :class:`PromptRecord`. A file that does not have the expected columns, or a row
whose seed or guidance is not a number, raises :class:`~erasekit.errors.ErasekitError` naming the file and line.

Expected formats (CSV with a header row; extra columns are kept in ``meta``):

======================  ==========================================================================================
format                  columns
======================  ==========================================================================================
``i2p``                 ``prompt``, ``evaluation_seed``, ``evaluation_guidance`` (required); ``categories`` etc.
``unlearndiffatk``      ``prompt``, ``evaluation_seed`` (required), ``evaluation_guidance`` (optional)
``mma``                 ``adv_prompt`` (required); ``clean_prompt``, ``target_prompt``, ``sanitized_adv_prompt``
``ringabell``           ``sensitive prompt`` or ``prompt`` (required); a headerless .txt is one prompt per line
``coco``                ``prompt`` or ``caption`` (required); ``evaluation_seed``, ``image_id``/``coco_id``
``txt``                 plain text, one prompt per line (blank lines are skipped)
======================  ==========================================================================================
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt set.

    Attributes:
        prompt: the text given to the model.
        seed: the set's own per-prompt seed (I2P's ``evaluation_seed``), or ``None`` to use the run's seeds.
        guidance: the set's own guidance scale, or ``None`` to use the run's.
        meta: the row's other columns, kept for the record (e.g. I2P ``categories``).
    """

    prompt: str
    seed: int | None = None
    guidance: float | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Columns:
    prompt: tuple[str, ...]  # the first one present is the prompt
    seed: str | None = None
    seed_required: bool = False
    guidance: str | None = None
    guidance_required: bool = False


_FORMATS: dict[str, _Columns] = {
    "i2p": _Columns(("prompt",), "evaluation_seed", True, "evaluation_guidance", True),
    "unlearndiffatk": _Columns(("prompt",), "evaluation_seed", True, "evaluation_guidance"),
    "mma": _Columns(("adv_prompt",), "evaluation_seed"),
    "ringabell": _Columns(("sensitive prompt", "prompt"), "evaluation_seed", False, "evaluation_guidance"),
    "coco": _Columns(("prompt", "caption"), "evaluation_seed"),
}
FORMATS = (*_FORMATS, "txt")


def load_prompts(path: str | Path, fmt: str, limit: int | None = None) -> list[PromptRecord]:
    """Read a prompt set.

    Args:
        path: the CSV (or text) file.
        fmt: one of :data:`FORMATS`.
        limit: keep only the first ``limit`` prompts.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ErasekitError(f"unknown prompt format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ErasekitError(f"no prompt file at {path}")
    if fmt == "txt" or (fmt == "ringabell" and path.suffix == ".txt"):
        records = list(_read_lines(path))
    else:
        records = list(_read_csv(path, _FORMATS[fmt]))
    if not records:
        raise ErasekitError(f"{path} holds no prompts")
    return records[:limit] if limit is not None else records


def _read_lines(path: Path) -> Iterator[PromptRecord]:
    for line in _text(path).splitlines():
        if line.strip():
            yield PromptRecord(line.strip())


def _text(path: Path) -> str:
    try:
        return path.read_text("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ErasekitError(f"{path} is not UTF-8 text (byte {e.start})") from None


def _read_csv(path: Path, cols: _Columns) -> Iterator[PromptRecord]:
    reader = csv.reader(_text(path).splitlines())
    header = [h.strip() for h in next(reader, [])]
    prompt_col = next((c for c in cols.prompt if c in header), None)
    if prompt_col is None:
        raise ErasekitError(
            f"{path}:1: no {' or '.join(repr(c) for c in cols.prompt)} column (header: {header})"
        )
    for name, required in ((cols.seed, cols.seed_required), (cols.guidance, cols.guidance_required)):
        if required and name not in header:
            raise ErasekitError(f"{path}:1: no {name!r} column (header: {header})")
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{reader.line_num}"
        if len(row) != len(header):
            raise ErasekitError(f"{where}: {len(row)} fields, but the header has {len(header)}")
        values = dict(zip(header, row))
        prompt = values.pop(prompt_col).strip()
        if not prompt:
            raise ErasekitError(f"{where}: empty prompt")
        seed = _number(values, cols.seed, int, where, cols.seed_required)
        guidance = _number(values, cols.guidance, float, where, cols.guidance_required)
        yield PromptRecord(prompt, seed, guidance, values)


def _number(
    values: dict[str, str], column: str | None, kind: Callable[[str], Any], where: str, required: bool
) -> Any:
    if column is None or not values.get(column, "").strip():
        if required:
            raise ErasekitError(f"{where}: {column} is empty")
        return None
    text = values.pop(column).strip()
    try:
        return kind(float(text)) if kind is int and text.endswith(".0") else kind(text)
    except ValueError:
        raise ErasekitError(f"{where}: {column} is {text!r}, not a number") from None
