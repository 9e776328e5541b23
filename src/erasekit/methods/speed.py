"""SPEED (Li et al., 2025): a closed-form cross-attention edit confined to the null space of a retain set.

For every edited projection W (``attn2.to_v`` by default)::

    Σ_tt = mean c_t c_tᵀ,  Σ_at = mean c_a c_tᵀ,  M = (Σ_tt P + α I)⁻¹
    Δ = W (Σ_at − Σ_tt) P (I − M K2 (K2ᵀ P M K2 + λ I)⁺ K2ᵀ P) M

- c_t are the target prompt's rows 1..n+1 (its n tokens and the first EOS), c_a the anchor prompt's rows at the
  same positions (our alignment choice: by position).
- **IPF** keeps the retain rows c whose influence ‖E c‖, with E = W(Σ_at − Σ_tt)(I + Σ_tt)⁻¹, is above the mean.
- **DPA** adds, per retain row, copies plus Gaussian noise projected on W's ``dpa_rank`` smallest right-singular
  directions (so W barely sees the noise), then filters again with IPF.
- P = U_s U_sᵀ, U_s the eigenvectors of Σ_r c cᵀ (sum over the kept retain rows) with eigenvalue below
  ``null_threshold``; P = I when there is no retain set.
- **IEC**: K2 = [BOS row of ""; ``kmeans`` k-means centres of the other rows of ""], so Δ K2 = 0 exactly.
The inverse in the IEC term is a pseudo-inverse, because with λ = 0 it can be singular.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.methods._closed_form import (
    check_family,
    check_projections,
    kv_layers,
    n_tokens,
    sequence_embeddings,
    weight_patch,
    weights64,
)
from erasekit.methods.common import check_positive, generator
from erasekit.patch import Patch
from erasekit.registry import register


@dataclass(frozen=True, kw_only=True)
class SPEEDConfig:
    """SPEED's settings; defaults are the paper's (to_v, α = 1, λ = 0, threshold 0.1, 3 k-means centres)."""

    anchor: str = field(
        default="", metadata={"help": "the concept targets are moved toward ('art' for styles, '' otherwise)"}
    )
    retain: tuple[str, ...] = field(
        default=(), metadata={"help": "prior concepts whose outputs must not move"}
    )
    alpha: float = field(default=1.0, metadata={"help": "α: ridge term of M (0.05 for celebrities)"})
    lamb: float = field(default=0.0, metadata={"help": "λ of the IEC inverse"})
    null_threshold: float = field(
        default=0.1, metadata={"help": "eigenvalues of the retain Gram below this span P"}
    )
    ipf: bool = field(default=True, metadata={"help": "influence-based prior filtering of the retain rows"})
    dpa: bool = field(default=True, metadata={"help": "directed prior augmentation of the retain rows"})
    iec: bool = field(
        default=True, metadata={"help": "invariant equality constraints on the null text's rows"}
    )
    dpa_copies: int = field(default=3, metadata={"help": "DPA: noisy copies per retain row"})
    dpa_rank: int = field(
        default=1, metadata={"help": "DPA: how many smallest right-singular directions of W"}
    )
    dpa_scale: float = field(
        default=0.1, metadata={"help": "DPA: noise std relative to the retain rows' RMS norm"}
    )
    kmeans: int = field(default=3, metadata={"help": "IEC: k-means centres of the null text's non-BOS rows"})
    projections: tuple[str, ...] = field(
        default=("to_v",), metadata={"help": "which attn2 projections to edit"}
    )
    seed: int = field(default=0, metadata={"help": "seed of DPA's noise and the k-means initialisation"})

    def __post_init__(self) -> None:
        check_projections(self.projections)
        check_positive(alpha=self.alpha, null_threshold=self.null_threshold, dpa_copies=self.dpa_copies)
        check_positive(dpa_rank=self.dpa_rank, dpa_scale=self.dpa_scale, kmeans=self.kmeans)
        if self.lamb < 0:
            raise ValueError(f"lamb must be >= 0, got {self.lamb}")


def prompt_rows(pipe: Any, prompts: list[str], positions_of: list[str] | None = None) -> torch.Tensor:
    """Rows 1..n+1 of each prompt's conditioning, n from ``positions_of`` (default: the prompt itself).

    Returns:
        ``[Σ (n_i + 1), D]`` float64.
    """
    seq = sequence_embeddings(pipe, prompts)  # [B, 77, D]
    spans = [n_tokens(pipe, p) + 1 for p in (positions_of or prompts)]
    return torch.cat([seq[i, 1 : 1 + n] for i, n in enumerate(spans)])


def kmeans(x: torch.Tensor, k: int, g: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``x`` ``[n, D]``; returns ``[k, D]`` centres (seeded initialisation)."""
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(centres.shape[0]):
            if (assign == j).any():
                centres[j] = x[assign == j].mean(0)
    return centres


def influence_filter(e: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """IPF: the rows ``[n, D]`` whose ‖E c‖ is at least the mean over rows (E ``[out, D]``)."""
    if rows.shape[0] == 0:
        return rows
    score = (rows @ e.T).norm(dim=1)
    return rows[score >= score.mean()]


def augment(w: torch.Tensor, rows: torch.Tensor, config: SPEEDConfig, g: torch.Generator) -> torch.Tensor:
    """DPA: ``rows`` plus ``dpa_copies`` noisy copies each, the noise in W's smallest right-singular directions."""
    if rows.shape[0] == 0:
        return rows
    vh = torch.linalg.svd(w, full_matrices=True).Vh[-config.dpa_rank :]  # [r, D], smallest singular values
    std = config.dpa_scale * rows.norm(dim=1).pow(2).mean().sqrt()
    noise = torch.randn(config.dpa_copies, *rows.shape, generator=g, dtype=torch.float64) * std
    noisy = rows + (noise @ vh.T) @ vh  # [copies, n, D]
    return torch.cat([rows, noisy.reshape(-1, rows.shape[1])])


def null_projector(retain: torch.Tensor, threshold: float) -> torch.Tensor:
    """P ``[D, D]`` onto the eigenvectors of Σ c cᵀ (retain rows ``[n, D]``) with eigenvalue < threshold."""
    d = retain.shape[1]
    if retain.shape[0] == 0:
        return torch.eye(d, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(retain.T @ retain)
    small = vecs[:, vals < threshold]
    return small @ small.T


def speed_delta(
    w: torch.Tensor, stats: dict[str, torch.Tensor], config: SPEEDConfig, g: torch.Generator
) -> torch.Tensor:
    """Δ ``[out, D]`` for one W, from ``stats`` = ``{"tt", "at": [D, D], "retain": [n, D], "k2": [D, k]}``."""
    d = w.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    a = w @ (stats["at"] - stats["tt"])  # [out, D]
    retain = stats["retain"]
    if config.ipf or config.dpa:
        e = a @ torch.linalg.inv(eye + stats["tt"])
        kept = influence_filter(e, retain) if config.ipf else retain
        retain = influence_filter(e, augment(w, kept, config, g)) if config.dpa else kept
    p = null_projector(retain, config.null_threshold)
    m = torch.linalg.inv(stats["tt"] @ p + config.alpha * eye)
    if not config.iec:
        return a @ p @ m
    k2 = stats["k2"]
    inner = torch.linalg.pinv(k2.T @ p @ m @ k2 + config.lamb * torch.eye(k2.shape[1], dtype=torch.float64))
    return a @ p @ (eye - m @ k2 @ inner @ k2.T @ p) @ m


def edit_statistics(
    pipe: Any, concepts: list[str], config: SPEEDConfig, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Σ_tt, Σ_at ``[D, D]``, the retain rows ``[n, D]`` and K2 ``[D, 1 + kmeans]`` (see the module docstring)."""
    targets = prompt_rows(pipe, concepts)
    anchors = prompt_rows(pipe, [config.anchor] * len(concepts), positions_of=concepts)
    retain = prompt_rows(pipe, list(config.retain)) if config.retain else targets[:0]
    null = sequence_embeddings(pipe, [""])[0]  # [77, D]
    k2 = torch.cat([null[:1], kmeans(null[1:], config.kmeans, g)])  # [1 + k, D]
    n = targets.shape[0]
    return {"tt": targets.T @ targets / n, "at": anchors.T @ targets / n, "retain": retain, "k2": k2.T}


def erase_speed(model: Any, concepts: list[str], config: SPEEDConfig) -> Patch:
    """SPEED: null-space constrained closed-form edit of attn2 (to_v), with IPF, DPA and IEC."""
    pipe = check_family(model, "speed")
    g = generator(config.seed)
    layers = kv_layers(pipe.unet, config.projections)
    stats = edit_statistics(pipe, concepts, config, g)
    new = {name: w + speed_delta(w, stats, config, g) for name, w in weights64(layers).items()}
    return weight_patch(model, layers, new)


register(
    "speed",
    SPEEDConfig,
    presets={"paper": {"style": {"anchor": "art"}, "object": {"anchor": ""}, "nsfw": {"anchor": ""}}},
    summary="SPEED: closed-form attn2 edit in the null space of a retain set (IPF, DPA, IEC)",
)(erase_speed)
