"""Pluggable image classifiers with an object head and a style head (UnlearnCanvas's two classifiers).

Two sources:

- the built-in MiniCanvas classifier (:func:`builtin_classifier`);
- a user checkpoint folder (:func:`load_classifier_folder`), e.g. a port of UnlearnCanvas's ViT-L/16
  classifiers. The folder holds ``classifier.safetensors`` (a state dict; never a pickle) and
  ``classifier.json``::

      {"architecture": "vit",               # a key of ARCHITECTURES
       "config": {...},                     # transformers ViTConfig fields (hidden_size, image_size, ...)
       "object_classes": ["Dogs", ...],     # order of the object head
       "style_classes": ["Abstractionism", ..., "Photo"],  # order of the style head (51 for UnlearnCanvas)
       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}    # input normalisation of [0, 1] pixels

  For ``"vit"`` the tensors are ``backbone.*`` (a transformers ``ViTModel`` without pooler), ``object_head.*``
  and ``style_head.*`` (``nn.Linear`` on the final [CLS] token). A folder written by
  :meth:`erasekit.minicanvas.classifier.MiniCanvasClassifier.save` (``{"width", "object_names",
  "style_names"}``) is read as the MiniCanvas CNN.

Loading is strict: a missing or unexpected tensor is an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erasekit.errors import ErasekitError

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"


@dataclass(frozen=True, kw_only=True)
class ImageClassifier:
    """A two-head classifier plus how to feed it.

    Attributes:
        module: has ``predict(x [N, 3, S, S]) -> (object_logits [N, O], style_logits [N, T])`` and
            ``features(x) -> [N, D]``.
        object_names: the object head's classes.
        style_names: the style head's classes.
        image_size: the square input size ``S``; images are resized to it.
        mean: per-channel mean subtracted from [0, 1] pixels.
        std: per-channel std the pixels are divided by.
        source: where it came from (recorded in the run record).
    """

    module: Any
    object_names: tuple[str, ...]
    style_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    source: str = ""

    @property
    def device(self) -> torch.device:
        """Where the module's weights are (inputs are moved there)."""
        return next(self.module.parameters()).device

    def head_of(self, concept: str) -> str:
        """``"style"`` or ``"object"``: the head that has class ``concept``, or a one-line error."""
        if concept in self.style_names:
            return "style"
        if concept in self.object_names:
            return "object"
        raise ErasekitError(f"the classifier ({self.source}) has no object or style class {concept!r}")

    def to_input(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> float ``[N, 3, S, S]``, resized (bicubic) and normalised."""
        from PIL import Image

        size = (self.image_size, self.image_size)
        arrays = [
            np.asarray(
                im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
                if im.size != size
                else im.convert("RGB")
            )
            for im in images
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, S, S]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def classify(self, images: Sequence[Any], batch_size: int = 64) -> tuple[list[str], list[str]]:
        """Predicted ``(object names, style names)`` of PIL images."""
        objects: list[str] = []
        styles: list[str] = []
        device = self.device
        for i in range(0, len(images), batch_size):
            obj_logits, style_logits = self.module.predict(
                self.to_input(images[i : i + batch_size]).to(device)
            )
            objects += [self.object_names[k] for k in obj_logits.argmax(-1).tolist()]
            styles += [self.style_names[k] for k in style_logits.argmax(-1).tolist()]
        return objects, styles

    @torch.no_grad()
    def features(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Penultimate features ``[N, D]`` (float64), e.g. for FID."""
        device = self.device
        chunks = [
            self.module.features(self.to_input(images[i : i + batch_size]).to(device)).cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks).double()


def builtin_classifier(device: str | torch.device = "cpu") -> ImageClassifier:
    """The shipped MiniCanvas classifier (32x32 inputs in [-1, 1])."""
    from erasekit import minicanvas

    module = minicanvas.load_classifier(device=device)
    return ImageClassifier(
        module=module,
        object_names=tuple(module.object_names),
        style_names=tuple(module.style_names),
        image_size=32,
        source="minicanvas",
    )


def load_classifier(folder: str | Path | None = None, device: str | torch.device = "cpu") -> ImageClassifier:
    """The classifier a run scores with: the folder's (:func:`load_classifier_folder`), or the built-in one."""
    return builtin_classifier(device) if folder is None else load_classifier_folder(folder, device)


# ---- user checkpoints ------------------------------------------------------------------------------------


class TwoHeadViT(nn.Module):
    """A transformers ``ViTModel`` with an object head and a style head on the final [CLS] token."""

    def __init__(self, config: dict[str, Any], n_objects: int, n_styles: int) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.backbone = ViTModel(ViTConfig(**config), add_pooling_layer=False)
        hidden = self.backbone.config.hidden_size
        self.object_head = nn.Linear(hidden, n_objects)
        self.style_head = nn.Linear(hidden, n_styles)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> [CLS] features ``[N, hidden]``."""
        return self.backbone(pixel_values=images).last_hidden_state[:, 0]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, 3, S, S]`` -> ``(object_logits [N, O], style_logits [N, T])``."""
        feats = self.features(images.to(next(self.parameters()).device))
        return self.object_head(feats), self.style_head(feats)


def _build_vit(cfg: dict[str, Any]) -> tuple[nn.Module, int]:
    module = TwoHeadViT(cfg.get("config", {}), len(cfg["object_classes"]), len(cfg["style_classes"]))
    return module, int(module.backbone.config.image_size)


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], tuple[nn.Module, int]]] = {"vit": _build_vit}


def load_classifier_folder(folder: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
    """Load a classifier checkpoint folder (see the module docstring for the format)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ErasekitError(f"{folder} is not a classifier folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ErasekitError(f"{folder / CONFIG_FILE} is not valid JSON ({e.msg})") from None
    if "architecture" not in cfg and "width" in cfg:
        return _minicanvas_folder(folder, device)
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise ErasekitError(
            f"{folder / CONFIG_FILE}: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}"
        )
    for key in ("object_classes", "style_classes"):
        if not isinstance(cfg.get(key), list) or not cfg[key]:
            raise ErasekitError(f"{folder / CONFIG_FILE}: {key!r} must be a non-empty list of class names")
    module, size = ARCHITECTURES[arch](cfg)
    _load_strict(module, folder / WEIGHTS_FILE)
    return ImageClassifier(
        module=module.to(device).eval(),
        object_names=tuple(cfg["object_classes"]),
        style_names=tuple(cfg["style_classes"]),
        image_size=size,
        mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        source=str(folder),
    )


def _minicanvas_folder(folder: Path, device: str | torch.device) -> ImageClassifier:
    from erasekit.minicanvas.classifier import read_classifier

    module = read_classifier(folder, device=device)
    return ImageClassifier(
        module=module,
        object_names=tuple(module.object_names),
        style_names=tuple(module.style_names),
        image_size=32,
        source=str(folder),
    )


def _load_strict(module: nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(file))
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ErasekitError(
            f"{file} does not fit its architecture: {len(missing)} missing tensor(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ErasekitError(f"{file}: {str(e).splitlines()[0]}") from None
