"""Attack image sheets: per attack column, the first attacked images of every entry and concept, framed by verdict."""

from __future__ import annotations

import io
import json
from pathlib import Path

from erasekit.bench.aggregate import Board

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
    concepts = board.all_concepts()
    rows = []
    for label in board.labels:
        shots = [_shots(board, out_dir, attack, label, c, per_concept) for c in concepts]
        if any(shots):
            rows.append((label, shots))
    first = next((p for _, shots in rows for cell in shots for p, _ in cell if p.is_file()), None)
    if first is None:
        return None
    return _draw(rows, concepts, first, per_concept)


def _shots(
    board: Board, out_dir: Path, attack: str, label: str, concept: str, n: int
) -> list[tuple[Path, bool]]:
    """The first ``n`` attacked images of one attack cell and their verdicts (none when it is missing)."""
    cell = board.attack_cell(attack, label, concept)
    scores = out_dir / cell.run / "scores.jsonl" if cell else None
    if scores is None or not scores.is_file():
        return []
    lines = [json.loads(line) for line in scores.read_text().splitlines() if line.strip()]
    picked = [e for e in lines if e.get("phase", "attack") == "attack"][:n]
    return [(scores.parent / e["file"], bool(e["success"])) for e in picked]


def _draw(rows: list, concepts: list[str], first: Path, per_concept: int) -> bytes:
    from PIL import Image, ImageDraw

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
