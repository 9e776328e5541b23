"""Fréchet distance between two sets of image features (FID), with a pluggable feature extractor.

``FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, computed in float64 without scipy:
``tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``, where both matrices are symmetric positive
semi-definite, so two symmetric eigendecompositions suffice (tiny negative eigenvalues from rounding are clamped
to zero).

Feature extractors: the MiniCanvas classifier's penultimate features (``ImageClassifier.features``) and CLIP
image embeddings (:class:`erasekit.evaluation.clipscore.ClipScorer`). The reference set is either real images
(a folder) or another run's generations (e.g. the base model's, as HiRM does); the record says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix ``[D, D]`` (float64)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2).

    Args:
        mu1: ``[D]``.
        cov1: ``[D, D]``.
        mu2: ``[D]``.
        cov2: ``[D, D]``.
    """
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross
    return float(value.clamp_min(0))


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of features ``[N, D]`` (N >= 2)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ErasekitError(f"FID needs at least 2 feature vectors, got shape {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def fid_from_features(features: torch.Tensor, reference: torch.Tensor) -> float:
    """FID between generated features ``[N, D]`` and reference features ``[M, D]``."""
    if features.shape[1] != reference.shape[1]:
        raise ErasekitError(f"feature sizes differ: {features.shape[1]} vs {reference.shape[1]}")
    return frechet_distance(*feature_stats(features), *feature_stats(reference))


def reference_images(reference: str | Path) -> list[Any]:
    """The images of a run directory (a MiniCanvas run: its grid images) or of a folder, as PIL RGB images."""
    from PIL import Image

    ref = Path(reference)
    if (ref / "manifest.jsonl").is_file():
        from erasekit.evaluation.runner import read_manifest

        entries = read_manifest(ref)
        grid = [e for e in entries if e.get("meta", {}).get("set") == "grid"]
        files = [ref / e["file"] for e in grid or entries]  # a MiniCanvas run: its grid images only
    elif ref.is_dir():
        files = sorted(p for p in ref.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise ErasekitError(f"FID reference {ref} is neither a run directory nor a folder of images")
    if len(files) < 2:
        raise ErasekitError(f"FID reference {ref} holds fewer than 2 images")
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return images
