"""Where the shipped MiniCanvas weights live. Imports nothing from :mod:`erasekit.models`, which loads them."""

from __future__ import annotations

from pathlib import Path

from erasekit.errors import ErasekitError


def weights_root() -> Path:
    """The shipped weights folder: ``pipeline/``, the classifier, ``training.json`` and ``MODEL_CARD.md``."""
    return Path(__file__).resolve().parent / "weights"


def weights_dir() -> Path:
    """The shipped diffusers folder, loadable with ``StableDiffusionPipeline.from_pretrained``."""
    path = weights_root() / "pipeline"
    if not (path / "model_index.json").is_file():
        raise ErasekitError(
            f"the MiniCanvas weights are missing ({path}); rebuild them with "
            "`erasekit minicanvas train --out DIR` and copy DIR into src/erasekit/minicanvas/weights"
        )
    return path
