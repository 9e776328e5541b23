"""SPEED (Li et al., 2025): a closed-form cross-attention edit confined to the null space of a retain set.

Followed: Ouxiang-Li/SPEED at commit 6d3df0c92266b1f821d613c73ec45d242716f990 (``train_erase_null.py``,
``scripts/eval_few.sh``, ``scripts/eval_nudity.sh``). For every edited projection W (``attn2.to_v``)::

    Σ_tt = mean_concepts Tᵀ T,  Σ_at = mean_concepts Aᵀ T,  M = (Σ_tt P + α I)⁻¹
    Δ = W (Σ_at − Σ_tt) P (I − M K2 (K2ᵀ P M K2 + λ I)⁺ K2ᵀ P) M

- **Target rows T**: each concept's last-token row; ``target_rows="all"`` (nudity) takes rows 1..L−1.
  **Anchor rows A**: the anchor's own last-token row (BOS for ``""``), or its rows 1..L−1 with ``"all"``.
- **Retain rows**: the last-token row of each retain prompt, after dropping prompts that name a target as a
  whole word, shuffled. The authors retain 1734 artist names (``data/style.csv``) or 1352 instance names
  (``data/instance.csv``); on MiniCanvas (``world_retain``) the other concepts of the target's kind, as bare
  names like the authors' CSV rows (inside a template, the last-token row would be the template's last word).
  With no retain prompt at all, the authors' fallback: rows 1..L−1 of ``""``.
- **IPF**: keep the retain rows with ‖E c‖ > mean, E = W(Σ_at − Σ_tt)(I + Σ_tt)⁻¹.
- **DPA**: per chunk of 128 kept rows, ``dpa_copies`` copies plus unit-variance Gaussian noise projected on W's
  weakest right-singular direction (of the reduced SVD); only the noisy copies are filtered, by ‖E c‖ > their
  mean over the chunk, and join the kept rows.
- **P** = U_s U_sᵀ, U_s the eigenvectors of the retain Gram (Σ c cᵀ / number of rows) with eigenvalue below
  ``null_threshold``.
- **IEC**: K2 = [BOS row of ""; ``kmeans`` k-means centres of its other L − 1 rows], so Δ K2 = 0 exactly.
  The inverse in the IEC term is a pseudo-inverse (the same as the authors' inverse wherever that exists).

Randomness, all from one CPU generator seeded with ``seed``, in this order: the k-means initial centres
(``randperm`` of the L − 1 rows), the retain shuffle (``randperm``), then per edited layer (model order) and per
chunk, the DPA noise ``randn(copies, rows, D)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from erasekit.methods._closed_form import (
    check_family,
    check_projections,
    kv_layers,
    last_token_embeddings,
    sequence_embeddings,
    weight_patch,
    weights64,
    world_kind_mates,
)
from erasekit.methods.common import check_choice, check_positive, generator
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

TARGET_ROWS = ("last", "all")
CHUNK = 128  # the authors' chunk of retain rows; DPA's filter compares within a chunk


@dataclass(frozen=True, kw_only=True)
class SPEEDConfig:
    """SPEED's settings; defaults are ``train_erase_null.py``'s (to_v, α 1, λ 0, threshold 0.1, 10 copies)."""

    anchor: str = field(
        default="", metadata={"help": "the concept targets are moved toward ('art' for styles, '' otherwise)"}
    )
    retain: tuple[str, ...] = field(
        default=(), metadata={"help": "prior concepts whose outputs must not move (bare names)"}
    )
    world_retain: bool = field(
        default=True,
        metadata={
            "help": "with no retain given, retain the other MiniCanvas concepts of a MiniCanvas target's kind"
        },
    )
    target_rows: str = field(
        default="last", metadata={"help": "'last': the last-token row; 'all': rows 1..L-1 (nudity)"}
    )
    alpha: float = field(
        default=1.0, metadata={"help": "α ('retain_scale'): ridge term of M, the strength knob (0.7 nudity)"}
    )
    lamb: float = field(default=0.0, metadata={"help": "λ of the IEC inverse (0.5 nudity)"})
    null_threshold: float = field(
        default=0.1, metadata={"help": "eigenvalues of the mean retain Gram below this span P"}
    )
    ipf: bool = field(default=True, metadata={"help": "influence-based prior filtering of the retain rows"})
    dpa: bool = field(default=True, metadata={"help": "directed prior augmentation of the retain rows"})
    dpa_copies: int = field(default=10, metadata={"help": "DPA: noisy copies per retain row"})
    iec: bool = field(
        default=True, metadata={"help": "invariant equality constraints on the null text's rows"}
    )
    kmeans: int = field(default=3, metadata={"help": "IEC: k-means centres of the null text's non-BOS rows"})
    projections: tuple[str, ...] = field(
        default=("to_v",), metadata={"help": "which attn2 projections to edit"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the k-means start, the shuffle and DPA's noise"})

    def __post_init__(self) -> None:
        check_projections(self.projections)
        check_choice("target_rows", self.target_rows, TARGET_ROWS)
        check_positive(alpha=self.alpha, null_threshold=self.null_threshold, dpa_copies=self.dpa_copies)
        check_positive(kmeans=self.kmeans)
        if self.lamb < 0:
            raise ValueError(f"lamb must be >= 0, got {self.lamb}")


def target_statistics(
    pipe: Any, concepts: list[str], config: SPEEDConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_tt, Σ_at)`` ``[D, D]``: per concept Tᵀ T and Aᵀ T over its rows, averaged over concepts."""
    if config.target_rows == "last":
        t = last_token_embeddings(pipe, concepts)  # [B, D], one row per concept
        a = last_token_embeddings(pipe, [config.anchor] * len(concepts))
        return t.T @ t / len(concepts), a.T @ t / len(concepts)
    t = sequence_embeddings(pipe, concepts)[:, 1:]  # [B, L-1, D]
    a = sequence_embeddings(pipe, [config.anchor] * len(concepts))[:, 1:]
    return (t.mT @ t).mean(0), (a.mT @ t).mean(0)


def retain_texts(concepts: list[str], config: SPEEDConfig) -> list[str]:
    """The retain prompts: given, else MiniCanvas kind-mates; those naming a target (whole word) dropped."""
    texts = list(config.retain) or (list(world_kind_mates(concepts)) if config.world_retain else [])
    pattern = [re.compile(rf"\b{re.escape(c.lower())}\b") for c in concepts]
    return [t for t in dict.fromkeys(texts) if not any(p.search(t.lower()) for p in pattern)]


def retain_rows(pipe: Any, texts: list[str], g: torch.Generator) -> torch.Tensor:
    """``[n, D]`` shuffled: the texts' last-token rows, or rows 1..L−1 of ``""`` when there are none."""
    rows = last_token_embeddings(pipe, texts) if texts else sequence_embeddings(pipe, [""])[0, 1:]
    return rows[torch.randperm(rows.shape[0], generator=g)]


def kmeans(
    x: torch.Tensor, k: int, g: torch.Generator, tol: float = 1e-4, max_iters: int = 300
) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``x`` ``[n, D]`` from ``k`` random rows, until the centres move < tol.

    Returns:
        ``[k, D]`` centres; an empty cluster keeps its centre.
    """
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(max_iters):
        assign = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        shift = (new - centres).norm(dim=1).sum()
        centres = new
        if shift**2 < tol:
            break
    return centres


def null_constraints(pipe: Any, k: int, g: torch.Generator) -> torch.Tensor:
    """K2 ``[D, 1 + k]``: the BOS row of ``""`` and k-means centres of its other rows."""
    null = sequence_embeddings(pipe, [""])[0]  # [L, D]
    return torch.cat([null[:1], kmeans(null[1:], k, g)]).T


def influence_filter(e: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``[n, D]`` whose ‖E c‖ is above the mean over the rows (E ``[out, D]``)."""
    if rows.shape[0] == 0:
        return rows
    score = (rows @ e.T).norm(dim=1)
    return rows[score > score.mean()]


def augment(
    w: torch.Tensor, e: torch.Tensor, rows: torch.Tensor, copies: int, g: torch.Generator
) -> torch.Tensor:
    """DPA for one chunk ``[b, D]``: the influential ones among ``copies`` noisy copies, ``[m, D]``.

    The noise is ``randn(copies, b, D)`` projected on v vᵀ, v the weakest right-singular vector of W ``[out, D]``
    in the reduced SVD (for out < D, the weakest direction W still sees, not one it ignores).
    """
    v = torch.linalg.svd(w, full_matrices=False).Vh[-1:]  # [1, D]
    noise = torch.randn(copies, *rows.shape, generator=g, dtype=torch.float64)
    noisy = (rows + noise @ v.T @ v).reshape(-1, rows.shape[1])  # [copies * b, D]
    return influence_filter(e, noisy)


def retain_gram(
    w: torch.Tensor, e: torch.Tensor, rows: torch.Tensor, config: SPEEDConfig, g: torch.Generator
) -> torch.Tensor:
    """The mean retain Gram ``[D, D]`` after IPF and DPA (the authors' ``sum_ret_ret / valid_num``)."""
    kept = influence_filter(e, rows) if config.ipf else rows
    gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64)
    count = 0
    for i in range(0, kept.shape[0], CHUNK):
        chunk = kept[i : i + CHUNK]
        if config.dpa:
            chunk = torch.cat([chunk, augment(w, e, chunk, config.dpa_copies, g)])
        gram += chunk.T @ chunk
        count += chunk.shape[0]
    return gram / max(count, 1)


def null_projector(gram: torch.Tensor, threshold: float) -> torch.Tensor:
    """P ``[D, D]`` onto the eigenvectors of ``gram`` with eigenvalue below ``threshold``."""
    vals, vecs = torch.linalg.eigh(gram)
    small = vecs[:, vals < threshold]
    return small @ small.T


def speed_delta(
    w: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    k2: torch.Tensor,
    config: SPEEDConfig,
    g: torch.Generator,
) -> torch.Tensor:
    """Δ ``[out, D]`` for one W from ``stats = (Σ_tt, Σ_at)``, the retain ``rows`` ``[n, D]`` and K2 ``[D, k]``."""
    tt, at = stats
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    a = w @ (at - tt)  # [out, D]
    e = a @ torch.linalg.inv(eye + tt)
    p = null_projector(retain_gram(w, e, rows, config, g), config.null_threshold)
    m = torch.linalg.inv(tt @ p + config.alpha * eye)
    if not config.iec:
        return a @ p @ m
    inner = torch.linalg.pinv(k2.T @ p @ m @ k2 + config.lamb * torch.eye(k2.shape[1], dtype=torch.float64))
    return a @ p @ (eye - m @ k2 @ inner @ k2.T @ p) @ m


def erase_speed(model: LoadedModel, concepts: list[str], config: SPEEDConfig) -> Patch:
    """SPEED: null-space constrained closed-form edit of attn2 (to_v), with IPF, DPA and IEC."""
    pipe = check_family(model, "speed")
    g = generator(config.seed)
    layers = kv_layers(pipe.unet, config.projections)
    stats = target_statistics(pipe, concepts, config)
    k2 = null_constraints(pipe, config.kmeans, g)
    rows = retain_rows(pipe, retain_texts(concepts, config), g)
    new = {name: w + speed_delta(w, stats, rows, k2, config, g) for name, w in weights64(layers).items()}
    return weight_patch(model, layers, new)


register(
    "speed",
    SPEEDConfig,
    presets={
        "paper": {
            "style": {"anchor": "art"},
            "object": {"anchor": ""},
            "nsfw": {"anchor": "", "target_rows": "all", "alpha": 0.7, "lamb": 0.5},
        }
    },
    strength=Strength("alpha", (300.0, 100.0, 30.0, 10.0, 3.0, 1.0)),
    summary="SPEED: closed-form attn2 edit in the null space of a retain set (IPF, DPA, IEC)",
)(erase_speed)
