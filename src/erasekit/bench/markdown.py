"""The leaderboard as Markdown (``leaderboard.md``, copied into ``docs/leaderboard.md``)."""

from __future__ import annotations

from collections.abc import Sequence

from erasekit.bench.aggregate import (
    COLUMNS,
    KINDS,
    Board,
    attack_budgets,
    attack_header,
    attack_rows,
    table_rows,
)

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
        lines += table(header, table_rows(board, kind))
        if board.attacks:
            lines += [
                f"### Attacks on the {kind}s (ASR %, mean ± std over the {kind}s)",
                "",
                attack_budgets(board),
                "",
            ]
            lines += table(attack_header(board), attack_rows(board, kind))
    lines += ["## Reproduce", "", "```", board.command, "```", "", "## What the numbers mean", ""]
    lines += [f"- {m}" for m in MEANINGS] + [""]
    return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines, with a blank line after it."""
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _missing(board: Board, label: str, concept: str) -> str:
    reason = board.failed.get((label, concept))
    return f"`{label}` on {concept}" + (f" (failed: {reason})" if reason else "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
