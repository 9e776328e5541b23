"""EraseEval's four metrics and its combined score, from image features and detector verdicts (no models here).

Fuchi & Takagi, "Erasing with Precision" (arXiv 2502.13989), released as fmp453/erase-eval. Read: ``eval.py``,
``cmmd.py`` and ``evaluator/protocol{1,2}.py`` at commit fab9900 (against the paper's own hash, a3fc6d5, only the
GPT versions moved from GPT-4o to GPT-4.1; no formula below changed). Each metric is in [0, 1], higher is better:

- **M1** (the target prompt is still reflected, minus the concept): the mean, over every pair (base image i,
  erased image j) of the same target prompt, of cos(e_i, e_j), where e_j is the zero vector (cosine 0) when the
  detector sees the concept in erased image j. The release embeds GPT captions with ModernBERT and detects
  with PaliGemma.
- **M2** (related prompts do not bring it back): the same on prompts that evoke the concept without naming it;
  the release embeds the images with EVA02-CLIP and detects with PaliGemma and a GPT mini model.
- **M3** (other concepts are kept): ``min(1, CS_erased / CS_base)``; the release's ``min(1, 1 − (CS_b − CS_e) /
  CS_b)`` with CS the CLIP score on 1000 COCO captions.
- **M4** (the distribution is kept): ``clip(2 − CMMD_erased / CMMD_base, 0, 1)``, the release's ``max(0, min(1,
  1 − (CMMD_e − CMMD_b) / CMMD_b))``, CMMD against real COCO images: the biased MMD² of L2-normalised
  embeddings under a Gaussian kernel with σ = 10, times 1000.

**The combined score.** The paper integrates the four into one score "such that a lower score is given if any
of the evaluations are low". The released code never combines them (``eval.py`` keeps ``self.scores`` and
prints each), and the paper's formula could not be read from the sources available here, so ours is documented
instead: the geometric mean (M1·M2·M3·M4)^(1/4) by default, or the harmonic mean; parts are clipped to [0, 1]
first (a cosine can be negative). Both are 0 when any part is 0 and fall strictly when any part falls while the
others are positive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

COMBINE = ("geometric", "harmonic")
CMMD_SIGMA = 10.0  # cmmd.py's _SIGMA
CMMD_SCALE = 1000.0  # cmmd.py's _SCALE


def paired_similarity(base: torch.Tensor, erased: torch.Tensor, shows_concept: Sequence[bool]) -> float:
    """M1/M2 for one prompt: mean cosine over all (base, erased) pairs, 0 for an erased image showing the concept.

    Args:
        base: ``[n, D]`` features of the base model's images of the prompt.
        erased: ``[m, D]`` features of the erased model's images of the same prompt.
        shows_concept: ``m`` detector verdicts on the erased images.
    """
    if len(shows_concept) != erased.shape[0] or base.shape[0] == 0 or erased.shape[0] == 0:
        raise ValueError("need base and erased images, and one verdict per erased image")
    keep = ~torch.tensor([bool(v) for v in shows_concept])  # [m]
    cos = torch.nn.functional.cosine_similarity(
        base[:, None].double(), erased[None].double(), dim=-1
    )  # [n, m]
    return float((cos * keep.double()[None]).mean())


def ratio_score(base: float, erased: float) -> float:
    """M3: ``min(1, erased / base)`` (1 when the base scores 0: nothing to keep)."""
    return min(1.0, erased / base) if base > 0 else 1.0


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD between feature sets ``x`` ``[n, D]`` and ``y`` ``[m, D]``: ``scale`` × the biased MMD² of the
    L2-normalised rows under ``exp(−‖a − b‖² / (2σ²))`` (cmmd.py's estimator, in any feature space)."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    y = torch.nn.functional.normalize(y.double(), dim=-1)
    gamma = 1.0 / (2.0 * sigma**2)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).square()).mean()

    return float(scale * (k(x, x) + k(y, y) - 2.0 * k(x, y)))


def distance_score(base: float, erased: float) -> float:
    """M4: ``clip(2 − erased / base, 0, 1)`` for CMMDs to the same reference (1 or 0 when the base's is 0)."""
    if base <= 0:
        return 1.0 if erased <= 0 else 0.0
    return max(0.0, min(1.0, 2.0 - erased / base))


def combined_score(parts: Sequence[float], rule: str = "geometric") -> float:
    """The single EraseEval score of ``parts`` (M1..M4), each clipped to [0, 1]; see the module docstring."""
    if rule not in COMBINE:
        raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {rule!r}")
    if not parts:
        raise ValueError("need at least one part")
    clipped = [min(1.0, max(0.0, float(p))) for p in parts]
    if min(clipped) == 0.0:
        return 0.0
    if rule == "geometric":
        return math.exp(sum(math.log(p) for p in clipped) / len(clipped))
    return len(clipped) / sum(1.0 / p for p in clipped)
