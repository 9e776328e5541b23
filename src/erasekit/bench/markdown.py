"""The leaderboard as Markdown (``leaderboard.md``, copied into ``docs/leaderboard.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from erasekit.bench.aggregate import (
    COLUMNS,
    KINDS,
    Board,
    attack_budgets,
    attack_header,
    attack_rows,
    attack_title,
    table_rows,
)

if TYPE_CHECKING:
    from erasekit.bench.timing import Timing

MEANINGS = (
    "UA (unlearning accuracy): percent of the target's grid images the classifier no longer labels as the target.",
    "IRA (in-domain retain accuracy): accuracy on the other concepts of the target's kind.",
    "CRA (cross-domain retain accuracy): accuracy on the concepts of the other kind.",
    "UA on synonyms: UA of images prompted with the target's synonyms (generality).",
    "Each number is the mean over the concepts of that kind (of each concept's mean over its evaluation seeds), "
    "with its 95% bootstrap interval in brackets: concepts drawn with replacement, then each drawn concept's seeds "
    "drawn with replacement, 2000 replicates (erasekit.bench.stats); `n` says how many concepts finished. Erase "
    "time, memory and ASR have one value per concept, so their intervals are over concepts only.",
    "ASR (attack success rate): percent of the attack's generations the classifier labels as the erased "
    "concept (the attack's headline rule: see `erasekit attacks NAME`); the base row is the un-erased model's "
    "rate under the same attack.",
    "EraseEval ×100 (with `--eraseeval`): the `eraseeval` protocol's combined score of its four criteria (the "
    "target prompt still reflected minus the concept, related prompts, other concepts kept, the distribution "
    "kept), × 100, higher is better; docs/evaluation.md says how each is measured on MiniCanvas.",
    "erase (s): wall time of the method's `erase()` on this machine; a stack adds up its parts.",
    "peak memory (MiB): the most resident memory (RSS) the process held during `erase()` above what it held when "
    "the erasure began (sampled every 5 ms, glibc free lists trimmed first); a stack shows its largest part. It "
    "excludes the loaded model, so it is the method's own working memory.",
)


def markdown(board: Board, title: str = "MiniCanvas leaderboard") -> str:
    """The leaderboard as Markdown: status, one table per concept type, the command, what the numbers mean."""
    lines = [f"# {title}", "", *partial(board)]
    lines += [*board.notes, ""] if board.notes else []
    lines += kind_sections(board, "##")
    return "\n".join(lines + reproduce(board.command))


def partial(board: Board) -> list[str]:
    """A warning line naming the cells that did not finish (none when all did)."""
    missing = board.missing()
    if not missing:
        return []
    return [f"> **Partial:** {len(missing)} cell(s) did not finish: "
            + ", ".join(_missing(board, m, c) for m, c in missing) + ".", ""]  # fmt: skip


def kind_sections(board: Board, level: str, prefix: str = "") -> list[str]:
    """Per concept type: the table and the attack table."""
    lines: list[str] = []
    header = ["method", "n", *(h for _, h, _ in COLUMNS)]
    for kind in KINDS:
        if not board.concepts.get(kind):
            continue
        lines += [f"{level} {prefix}{kind.title()}s: {', '.join(board.concepts[kind])}", ""]
        lines += table(header, table_rows(board, kind))
        if board.attacks:
            lines += [f"{level}# Attacks on the {kind}s ({attack_title(board)}, mean [95% interval] over the {kind}s)", "",
                      attack_budgets(board), ""]  # fmt: skip
            lines += table(attack_header(board), attack_rows(board, kind))
    return lines


def reproduce(command: str) -> list[str]:
    lines = ["## Reproduce", "", "```", command, "```", "", "## What the numbers mean", ""]
    return lines + [f"- {m}" for m in MEANINGS] + [""]


def protocol_markdown(
    sweep: Board, test: Board, tuned: dict[str, Any], split: Any, timing: Timing | None,
    title: str = "MiniCanvas leaderboard",
) -> str:  # fmt: skip
    """The protocol page: split, rule, test tables (paper and tuned rows), tuned settings, the dev sweep."""
    from erasekit.bench.protocol import RULE, tuned_setting

    lines = [f"# {title}", "", *partial(test), *partial(sweep)]
    lines += [*test.notes, ""]
    if timing is not None:
        lines += [f"Time of the whole bench (sweep, test and attacks): {timing.describe()}.", ""]
    lines += [
        "## Protocol",
        "",
        *protocol_lines(split, sweep),
        f"- **Operating point** (`tuned`): {RULE}.",
        "",
    ]
    lines += kind_sections(test, "##", "Test ")
    if tuned:
        lines += ["## Tuned settings (chosen on dev)", ""]
        lines += table(["method", "setting"], [[m, tuned_setting(p)] for m, p in sorted(tuned.items())])
    lines += ["## Dev sweep: UA–retention frontiers", "", "![frontiers](frontier.png)", "", *sweep.notes, ""]
    lines += kind_sections(sweep, "###", "Dev ")
    return "\n".join(lines + reproduce(test.command))


def protocol_lines(split: Any, sweep: Board) -> list[str]:
    """The split and the grids of the methods swept in ``sweep``, as list items."""
    from erasekit.bench.entries import BASE
    from erasekit.registry import METHODS

    lines = [f"- **Split** (seed {split.seed}, erasekit.bench.protocol.split_concepts): dev "
             f"{', '.join(split.dev)}; test {', '.join(split.test)}. Hyper-parameters are chosen on dev only."]  # fmt: skip
    swept = sorted({label.split(":")[0] for label in sweep.labels if label != BASE})
    knobs = [(n, METHODS.get(n).strength) for n in swept if n in METHODS.names()]
    lines.append("- **Strength knobs** (swept on dev from the named preset): "
                 + "; ".join(f"{n}: `{k.field}` in {list(k.grid)} from `{k.preset}`" for n, k in knobs if k) + ".")  # fmt: skip
    return lines


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines, with a blank line after it."""
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _missing(board: Board, label: str, concept: str) -> str:
    reason = board.failed.get((label, concept))
    return f"`{label}` on {concept}" + (f" (failed: {reason})" if reason else "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
