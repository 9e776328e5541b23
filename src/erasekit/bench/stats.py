"""Means and 95% bootstrap intervals over concepts and seeds: the leaderboard's uncertainty.

A leaderboard number is the mean over concepts of each concept's mean over evaluation seeds. Its interval
resamples both levels, as a two-stage (hierarchical) bootstrap does: draw the concepts with replacement, then for
each drawn concept draw its seeds with replacement, and take the estimate; the 2.5th and 97.5th percentiles of
:data:`REPLICATES` such estimates bound the interval. The generator is seeded, so a table is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A mean and its bootstrap interval (``lo``/``hi`` are ``None`` with a single value)."""

    mean: float | None
    lo: float | None = None
    hi: float | None = None
    n: int = 0

    def fmt(self, decimals: int = 1) -> str:
        """``72.2 [48.1, 93.5]``, ``72.2`` (one value) or ``–`` (none)."""
        if self.mean is None:
            return "–"
        text = f"{self.mean:.{decimals}f}"
        if self.lo is not None and self.hi is not None:
            text += f" [{self.lo:.{decimals}f}, {self.hi:.{decimals}f}]"
        return text


def estimate(groups: Sequence[Sequence[float]], replicates: int = REPLICATES, seed: int = SEED) -> Estimate:
    """The mean over groups (concepts) of the group means (over seeds), with its two-stage bootstrap interval.

    Args:
        groups: per concept, its per-seed values (empty groups are dropped).
        replicates: bootstrap replicates.
        seed: the generator's seed.
    """
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        return Estimate(None)
    mean = float(np.mean([g.mean() for g in groups]))
    if len(groups) == 1 and len(groups[0]) == 1:
        return Estimate(mean, n=1)
    rng = np.random.default_rng(seed)
    k = len(groups)
    picked = rng.integers(0, k, size=(replicates, k))  # [R, k] concepts drawn
    sizes = {len(g) for g in groups}
    if len(sizes) == 1:  # the usual case: every concept has the same seeds
        table = np.stack(groups)  # [k, s]
        s = sizes.pop()
        draws = rng.integers(0, s, size=(replicates, k, s))  # [R, k, s] seeds drawn per drawn concept
        stats = table[picked[..., None], draws].mean(axis=(1, 2))
    else:
        stats = np.array([np.mean([groups[i][rng.integers(0, len(groups[i]), size=len(groups[i]))].mean()
                                   for i in row]) for row in picked])  # fmt: skip
    tail = (1.0 - LEVEL) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return Estimate(mean, float(lo), float(hi), k)
