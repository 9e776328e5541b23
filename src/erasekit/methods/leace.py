"""LEACE: LEAst-squares Concept Erasure (Belrose et al., NeurIPS 2023), fitted on the conditioning rows and
folded into the UNet's cross-attention.

LEACE is the affine map r(c) = c − Q (c − μ) of least mean squared change that makes the concept labels z
linearly unpredictable from r(c): the cross-covariance of r(c) and z is zero, so no linear predictor under a
convex loss beats a constant. With Σ the covariance of the rows c [D], Σ_cz [D, K] their cross-covariance with
z and W = Σ^{-1/2} (pseudo-inverse square root), Q = W⁺ U Uᵀ W where U spans the column space of W Σ_cz, and
μ is the rows' mean.

It is fitted with EleutherAI's ``concept-erasure`` package, not a copy of it: the ``paper`` preset is its
``LeaceFitter`` with the package defaults (shrinkage of Σ, the covariance-trace constraint, SVD tolerance
0.01) of release 0.2.4, ``concept_erasure/leace.py`` of EleutherAI/concept-erasure at commit
9b18b3d5c73f552798212c51d6533d649fa434cd. The paper erases concepts from language-model activations; fitting
it on text-to-image conditioning rows is this toolkit's use of it.

Rows and labels (:mod:`erasekit.methods._projection`): for each erased concept k, every row from its first
token to the end of the padded prompt in the world's captions naming it (z = e_k); the same rows of the same
captions with each contrast concept in its place (z = 0). The eraser, scaled by ``scale`` (Q → s Q), is folded
into every attn2 ``to_k``/``to_v`` as W (I − s Q); the constant s W Q μ it adds to every key is dropped
(softmax ignores it) and the one it adds to every value goes into ``attn2.to_out.0.bias``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from erasekit.methods._closed_form import check_family
from erasekit.methods._projection import Rows, RowsConfig, fold, labelled_rows
from erasekit.methods.common import check_choice, check_positive
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

LEACE_METHODS = ("leace", "orth")
CHUNK_ROWS = 8192  # rows per LeaceFitter.update


@dataclass(frozen=True, kw_only=True)
class LEACEConfig(RowsConfig):
    """LEACE's settings; defaults are the ``concept-erasure`` package's ``LeaceFitter`` defaults."""

    eraser: str = field(
        default="leace",
        metadata={"help": "'leace' (least squares) or 'orth' (orthogonal projection): the fitter's method"},
    )
    affine: bool = field(
        default=True, metadata={"help": "erase around the rows' mean μ (the package's affine)"}
    )
    shrinkage: bool = field(
        default=True, metadata={"help": "estimate the rows' covariance with optimal linear shrinkage"}
    )
    constrain_cov_trace: bool = field(
        default=True, metadata={"help": "keep the covariance trace from growing (mix toward 'orth')"}
    )
    svd_tol: float = field(
        default=0.01, metadata={"help": "singular values of W Σ_cz below this are dropped"}
    )
    scale: float = field(
        default=1.0,
        metadata={"help": "s: the eraser applied is c − s Q (c − μ) (the strength knob; 1 = LEACE)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("eraser", self.eraser, LEACE_METHODS)
        check_positive(svd_tol=self.svd_tol, scale=self.scale)


def fit_leace(rows: Rows, config: LEACEConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(Q [D, D], μ [D] or None)`` of the LEACE eraser r(c) = c − Q (c − μ), fitted by ``concept-erasure``.

    Args:
        rows: ``x [n, D]`` and one-hot ``z [n, K]``, fed to ``LeaceFitter.update`` in chunks.
    """
    from concept_erasure import LeaceFitter

    n, d = rows.x.shape
    fitter = LeaceFitter(
        d,
        rows.z.shape[1],
        config.eraser,
        affine=config.affine,
        constrain_cov_trace=config.constrain_cov_trace,
        shrinkage=config.shrinkage,
        svd_tol=config.svd_tol,
        dtype=torch.float64,
    )
    for i in range(0, n, CHUNK_ROWS):
        fitter.update(rows.x[i : i + CHUNK_ROWS], rows.z[i : i + CHUNK_ROWS])
    eraser = fitter.eraser
    return eraser.proj_left @ eraser.proj_right, eraser.bias


def erase_leace(model: LoadedModel, concepts: list[str], config: LEACEConfig) -> Patch:
    """LEACE: fold the least-squares concept eraser of the conditioning rows into attn2 to_k/to_v."""
    pipe = check_family(model, "leace")
    rows = labelled_rows(pipe, concepts, config, "leace")
    q, mean = fit_leace(rows, config)
    return fold(model, config.scale * q, mean, config.projections)


register(
    "leace",
    LEACEConfig,
    presets={"paper": {}},
    strength=Strength("scale", (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)),
    summary="LEACE: least-squares concept erasure of the conditioning rows, folded into attn2 to_k/to_v",
)(erase_leace)
