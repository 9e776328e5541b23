"""The MiniCanvas evaluation classifier: a small CNN with an object head and a style head.

It plays the part of UnlearnCanvas's ViT-L/16 classifiers. Saved as ``classifier.safetensors`` plus
``classifier.json`` (sizes and class order) beside the shipped pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.minicanvas.models import _conv_stack
from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"


class MiniCanvasClassifier(nn.Module):
    """Object and style classifier for 32x32 images.

    Attributes:
        object_names: class order of the object head.
        style_names: class order of the style head.
    """

    def __init__(
        self,
        width: int = 32,
        object_names: tuple[str, ...] = OBJECT_NAMES,
        style_names: tuple[str, ...] = STYLE_NAMES,
    ) -> None:
        super().__init__()
        self.width = width
        self.object_names = tuple(object_names)
        self.style_names = tuple(style_names)
        self.body = _conv_stack(width)
        self.object_head = nn.Linear(4 * width, len(object_names))
        self.style_head = nn.Linear(4 * width, len(style_names))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (used as the FID feature space).

        Args:
            images: float ``[N, 3, 32, 32]`` in [-1, 1].

        Returns:
            float ``[N, 4 * width]``.
        """
        return self.body(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(images)
        return self.object_head(feats), self.style_head(feats)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits, without gradients.

        Args:
            images: float ``[N, 3, 32, 32]`` in [-1, 1].

        Returns:
            ``(object_logits [N, n_objects], style_logits [N, n_styles])``.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
            raise ErasekitError(
                f"the MiniCanvas classifier wants [N, 3, 32, 32] images, got {tuple(images.shape)}"
            )
        was_training = self.training
        self.eval()
        try:
            return self(images.to(next(self.parameters()).device, torch.float32))
        finally:
            self.train(was_training)

    def config(self) -> dict[str, object]:
        return {
            "width": self.width,
            "object_names": list(self.object_names),
            "style_names": list(self.style_names),
        }

    def save(self, folder: str | Path) -> None:
        """Write ``classifier.safetensors`` (fp32) and ``classifier.json`` into ``folder``."""
        from safetensors.torch import save_file

        from erasekit.io import atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        atomic_write_json(folder / CONFIG_FILE, self.config())


def read_classifier(folder: str | Path, device: str | torch.device = "cpu") -> MiniCanvasClassifier:
    """Load a classifier saved by :meth:`MiniCanvasClassifier.save` (strict: every tensor must match)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise ErasekitError(f"{folder} holds no MiniCanvas classifier ({WEIGHTS_FILE} + {CONFIG_FILE})")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    model = MiniCanvasClassifier(
        width=int(cfg["width"]),
        object_names=tuple(cfg["object_names"]),
        style_names=tuple(cfg["style_names"]),
    )
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model.to(device).eval()
