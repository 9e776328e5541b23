"""R-LACE: Relaxed Linear Adversarial Concept Erasure (Ravfogel et al., ICML 2022), fitted on the conditioning
rows and folded into the UNet's cross-attention.

A minimax game over the rows x [D] with binary labels y (a row of an erased concept or of a contrast one)::

    min_{P ∈ F_k} max_{w, b}  −BCE(y, wᵀ (I − P) x + b),     F_k = {P = Pᵀ, 0 ⪯ P ⪯ I, tr P = k}

(the rank-k Fantope, the convex hull of rank-k orthogonal projections), played by alternating SGD steps: one
ascent step on P followed by the Euclidean projection back onto F_k (eigenvalues λ ↦ clip(λ − θ, 0, 1), θ
found by bisection so that they sum to k), then one descent step on the linear classifier (w [D], b). Every
``evaluate_every`` rounds a fresh logistic classifier is fitted on the rows projected by I − U Uᵀ (U [D, k]:
the top-k eigenvectors of P); the P whose classifier has the highest log loss is kept, and the game stops once
the best accuracy seen is within ``epsilon`` of the majority-class rate. The eraser is the orthogonal
projection I − U Uᵀ of that P, folded into every attn2 ``to_k``/``to_v`` as W (I − U Uᵀ); it has no mean term,
so the fold is exact (:mod:`erasekit.methods._projection`, which also defines the rows).

The ``paper`` preset follows ``solve_adv_game`` in ``rlace.py`` of shauli-ravfogel/rlace-icml at commit
2d9b6d03f65416172b4a2ca7f6da10e374002e5f: rank 1, SGD lr 0.005 and weight decay 1e-4 for both players,
batches of 128, P initialised as 0.1·N(0, 1), at most 75000 rounds, an evaluation every 1000 (on the training
rows, as released), stop within 0.15% of the majority accuracy. The release scores each evaluation with three
sklearn ``SGDClassifier`` fits (log loss, α 1e-4) and keeps the lowest loss; here one L2-regularised logistic
regression (the same objective, α 1e-4) is fitted by L-BFGS, which is deterministic. No maintained package
implements R-LACE (the release is a script, not a package), so this is our own implementation of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from erasekit.methods._closed_form import check_family
from erasekit.methods._projection import RowsConfig, fold, labelled_rows
from erasekit.methods.common import check_positive, generator
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

BISECTION_STEPS = 25  # as released


@dataclass(frozen=True, kw_only=True)
class RLACEConfig(RowsConfig):
    """R-LACE's settings; defaults are the release's ``solve_adv_game`` defaults."""

    rank: int = field(default=1, metadata={"help": "k: dimensions removed (the strength knob)"})
    lr: float = field(default=0.005, metadata={"help": "SGD learning rate of both players"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay of both players"})
    batch_size: int = field(default=128, metadata={"help": "rows per SGD step"})
    max_iterations: int = field(default=75000, metadata={"help": "at most this many rounds of the game"})
    evaluate_every: int = field(default=1000, metadata={"help": "rounds between evaluations of P"})
    epsilon: float = field(
        default=0.0015, metadata={"help": "stop once the best accuracy is this close to the majority rate"}
    )
    eval_l2: float = field(default=1e-4, metadata={"help": "α: L2 weight of the evaluation classifier"})
    seed: int = field(
        default=0, metadata={"help": "seed of P's initialisation, the classifier's and the batches"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(
            rank=self.rank,
            lr=self.lr,
            batch_size=self.batch_size,
            max_iterations=self.max_iterations,
            evaluate_every=self.evaluate_every,
            epsilon=self.epsilon,
        )
        if self.weight_decay < 0 or self.eval_l2 < 0:
            raise ValueError("weight_decay and eval_l2 must be >= 0")


def fantope_projection(p: torch.Tensor, rank: int) -> torch.Tensor:
    """The Euclidean projection of a symmetric ``p`` [D, D] onto the rank-``rank`` Fantope."""
    lam, u = torch.linalg.eigh(p)
    lo, hi = lam.min() - 1, lam.max()  # Σ clip(λ − θ, 0, 1) is D at lo and 0 at hi
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if (lam - mid).clamp(0, 1).sum() > rank:
            lo = mid
        else:
            hi = mid
    return (u * (lam - (lo + hi) / 2).clamp(0, 1)) @ u.T


def top_subspace(p: torch.Tensor, rank: int) -> torch.Tensor:
    """``U Uᵀ`` [D, D] of the top-``rank`` eigenvectors of a symmetric ``p``: what the eraser removes."""
    u = torch.linalg.eigh(p).eigenvectors[:, -rank:]  # eigh sorts ascending
    return u @ u.T


def logistic_fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[float, float]:
    """Fit an L2-regularised logistic regression by L-BFGS; ``(log loss, accuracy)`` on the same rows.

    Args:
        x: ``[n, D]`` rows; y: ``[n]`` labels in {0, 1} (float).
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 / 2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = x @ w + b
        loss = F.binary_cross_entropy_with_logits(logits, y).item()
        accuracy = ((logits > 0).to(torch.float64) == y).to(torch.float64).mean().item()
    return loss, accuracy


def score(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, rank: int, l2: float) -> tuple[float, float]:
    """``(log loss, accuracy)`` of a logistic classifier fitted on ``x`` [n, D] projected by I − U Uᵀ."""
    x = x.to(torch.float64)
    kept = torch.eye(x.shape[1], dtype=torch.float64) - top_subspace(p.to(torch.float64), rank)
    return logistic_fit(x @ kept, y, l2)


def players(d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P [D, D], w [D], b)``: P ~ 0.1·N(0, 1) as released; w, b as ``nn.Linear`` initialises them."""
    p = 0.1 * torch.randn(d, d, generator=g)
    bound = d**-0.5
    w = (torch.rand(d, generator=g) * 2 - 1) * bound
    b = (torch.rand((), generator=g) * 2 - 1) * bound
    return p.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)


def solve_game(
    x: torch.Tensor, y: torch.Tensor, config: RLACEConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Play R-LACE's game on rows ``x`` [n, D] with labels ``y`` [n] in {0, 1}.

    Returns:
        ``(U Uᵀ [D, D] float64, {"rounds", "best_accuracy", "majority"})``.
    """
    g = generator(config.seed)
    x, y = x.to(torch.float32), y.to(torch.float32)
    eye = torch.eye(x.shape[1])
    p, w, b = players(x.shape[1], g)
    opt_p = torch.optim.SGD([p], lr=config.lr, weight_decay=config.weight_decay)
    opt_clf = torch.optim.SGD([w, b], lr=config.lr, weight_decay=config.weight_decay)
    majority = max(y.mean().item(), 1 - y.mean().item())

    def step(opt: torch.optim.Optimizer, sign: float, proj: torch.Tensor) -> None:
        idx = torch.randperm(x.shape[0], generator=g)[: config.batch_size]
        opt.zero_grad()
        (sign * F.binary_cross_entropy_with_logits(x[idx] @ (eye - proj) @ w + b, y[idx])).backward()
        opt.step()

    best_p, best_loss, best_acc, rounds = p.detach().clone(), -1.0, 1.0, 0
    for i in track(range(config.max_iterations), desc="rlace", total=config.max_iterations):
        rounds = i + 1
        with torch.no_grad():
            p.copy_((p + p.T) / 2)
        step(opt_p, -1.0, p)  # the eraser ascends the classifier's loss, then returns to the Fantope
        with torch.no_grad():
            p.copy_(fantope_projection((p + p.T) / 2, config.rank))
        step(opt_clf, 1.0, p.detach())
        if i % config.evaluate_every == 0:
            loss, acc = score(x, y, p.detach(), config.rank, config.eval_l2)
            if loss > best_loss:
                best_p, best_loss = p.detach().clone(), loss
            if abs(acc - majority) < abs(best_acc - majority):
                best_acc = acc
        if i > 1 and abs(best_acc - majority) < config.epsilon:
            break
    info = {"rounds": rounds, "best_accuracy": best_acc, "majority": majority}
    return top_subspace(best_p.to(torch.float64), config.rank), info


def erase_rlace(model: LoadedModel, concepts: list[str], config: RLACEConfig) -> Patch:
    """R-LACE: fold the rank-k adversarially learned projection of the conditioning rows into attn2."""
    pipe = check_family(model, "rlace")
    rows = labelled_rows(pipe, concepts, config, "rlace")
    removed, _ = solve_game(rows.x, rows.z.amax(dim=1), config)
    return fold(model, removed, None, config.projections)


register(
    "rlace",
    RLACEConfig,
    presets={"paper": {}},
    strength=Strength("rank", (1, 2, 4, 8, 16)),
    summary="R-LACE: rank-k adversarial linear concept erasure of the conditioning rows, folded into attn2",
)(erase_rlace)
