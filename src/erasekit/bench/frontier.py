"""The dev sweep's UA–retention frontiers: per concept type, UA against mean(IRA, CRA), one curve per method."""

from __future__ import annotations

from erasekit.bench.aggregate import KINDS, Board, aggregate
from erasekit.bench.entries import BASE, Entry, Part
from erasekit.bench.protocol import sweep_parts


def frontier_points(board: Board, method: str, kind: str) -> list[tuple[str, float, float]]:
    """``(label, retention, UA)`` of each finished grid point of ``method`` on ``kind``, in grid order."""
    stats = aggregate(board)
    out = []
    for part in sweep_parts(method):
        label = Entry((part,)).label
        row = stats.get(label, {}).get(kind)
        if row and row["n"] and row["UA"].mean is not None and row["IRA"].mean is not None:
            out.append((label, (row["IRA"].mean + row["CRA"].mean) / 2, row["UA"].mean))
    return out


def frontier_png(board: Board, tuned: dict[str, Part]) -> bytes | None:
    """A PNG with one panel per concept type; the tuned point of each method is ringed. ``None`` when empty."""
    methods = list(dict.fromkeys(p.method for label in board.labels for p in _parts(label)))
    if not methods:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from erasekit.evaluation.report import figure_png

    stats = aggregate(board)
    style = frontier_styles(methods)
    fig, axes = plt.subplots(1, len(KINDS), figsize=(12, 5), dpi=100, sharey=True)
    for ax, kind in zip(axes, KINDS):
        for method in methods:
            pts = frontier_points(board, method, kind)
            if not pts:
                continue
            color, marker = style[method]
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=marker, ms=4, color=color, label=method)
            ringed = _tuned_label(tuned.get(method), kind)
            for label, x, y in pts:
                if label == ringed:
                    ax.plot([x], [y], marker="o", ms=11, mfc="none", mec=color, mew=2)
        base = stats[BASE][kind]
        if base["n"] and base["IRA"].mean is not None:
            ax.plot([(base["IRA"].mean + base["CRA"].mean) / 2], [base["UA"].mean], marker="*", ms=14, color="black",
                    ls="none", label="base")  # fmt: skip
        ax.set_title(f"{kind}s (dev): ringed = tuned")
        ax.set_xlabel("retention: mean(IRA, CRA), %")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("UA, %")
    axes[-1].legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    return figure_png(fig)


def frontier_styles(methods: list[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """One fixed (RGBA colour, marker) per method, distinct for up to 100 methods and the same in every panel.

    Set explicitly because the ring markers of the tuned points would otherwise advance matplotlib's colour
    cycle, and two methods would end up with one colour.
    """
    import matplotlib

    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: (tuple(palette(i % palette.N)), "osD^v"[i // palette.N % 5]) for i, m in enumerate(methods)}


def _parts(label: str) -> list[Part]:
    """The sweep part a dev-board label stands for (the base row has none)."""
    if label == BASE or "[" not in label:
        return []
    method = label.split(":", 1)[0]
    return [p for p in sweep_parts(method) if Entry((p,)).label == label]


def _tuned_label(part: Part | None, kind: str) -> str | None:
    """The grid point's label that ``part`` chose for ``kind``."""
    if part is None:
        return None
    overrides = dict(part.typed).get(kind)
    return Entry((Part(part.method, part.preset, overrides),)).label if overrides else None
