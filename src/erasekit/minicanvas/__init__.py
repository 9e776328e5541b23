"""MiniCanvas: a miniature UnlearnCanvas-like text-to-image world, trained on CPU and shipped with erasekit.

12 objects x 12 styles, 32x32 renders, and a real ``StableDiffusionPipeline`` (tiny CLIP text encoder,
AutoencoderKL, UNet2DConditionModel, DDIM) plus an object/style classifier to score generations.

Importing this package is light (no torch); the heavy parts load on first use::

    from erasekit.minicanvas import weights_dir, load_classifier, evaluate_grid
    pipe = StableDiffusionPipeline.from_pretrained(weights_dir())
    result = evaluate_grid(pipe, load_classifier(), seeds=2)
"""

from __future__ import annotations

import importlib
from typing import Any

from erasekit.minicanvas.paths import weights_dir, weights_root
from erasekit.minicanvas.world import (
    FULL_TEMPLATES,
    OBJECT_NAMES,
    OBJECT_TEMPLATES,
    OBJECTS,
    STYLE_NAMES,
    STYLE_TEMPLATES,
    STYLES,
    TEMPLATE,
    Concept,
    concept_info,
    concept_kind,
    concept_table,
    prompt,
)

_LAZY = {
    "render": "erasekit.minicanvas.render",
    "MiniCanvasClassifier": "erasekit.minicanvas.classifier",
    "read_classifier": "erasekit.minicanvas.classifier",
    "TrainConfig": "erasekit.minicanvas.train",
    "train_minicanvas": "erasekit.minicanvas.build",
    "classify": "erasekit.minicanvas.quality",
    "evaluate_grid": "erasekit.minicanvas.quality",
    "grid_cells": "erasekit.minicanvas.quality",
    "GridResult": "erasekit.minicanvas.quality",
}

__all__ = [
    "FULL_TEMPLATES",
    "OBJECTS",
    "OBJECT_NAMES",
    "OBJECT_TEMPLATES",
    "STYLES",
    "STYLE_NAMES",
    "STYLE_TEMPLATES",
    "TEMPLATE",
    "Concept",
    "concept_info",
    "concept_kind",
    "concept_table",
    "prompt",
    "weights_root",
    "weights_dir",
    "load_classifier",
    "load_pipeline",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_classifier(device: str = "cpu") -> Any:
    """The shipped object/style classifier (:class:`~erasekit.minicanvas.classifier.MiniCanvasClassifier`).

    ``predict(images [N, 3, 32, 32] in [-1, 1]) -> (object_logits [N, 12], style_logits [N, 12])``, class order
    ``.object_names`` / ``.style_names`` (= ``OBJECT_NAMES`` / ``STYLE_NAMES``), ``features(images) -> [N, 128]``.
    """
    from erasekit.minicanvas.classifier import read_classifier

    weights_dir()  # one clear error when nothing is shipped
    return read_classifier(weights_root(), device=device)


def load_pipeline(device: str = "cpu") -> Any:
    """The shipped ``StableDiffusionPipeline`` in float32 on ``device``, progress bars off."""
    import torch
    from diffusers import StableDiffusionPipeline

    from erasekit.models.loading import diffusers_dtype

    pipe = StableDiffusionPipeline.from_pretrained(
        weights_dir(), **diffusers_dtype(torch.float32), use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
