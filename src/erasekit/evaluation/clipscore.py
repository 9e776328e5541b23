"""CLIP score with any local CLIP model folder (transformers 5's ``CLIPModel``), written here because
torchmetrics' version breaks on transformers 5 (``get_*_features`` now return output objects).

``cosine`` is the mean cosine between each image's and its caption's projected embeddings. ``clip_score`` is
``100 * mean(max(cosine, 0))``, the convention of torchmetrics and of papers that report "x100" (HiRM reports
the same quantity with ViT-B/32); Hessel et al.'s CLIPScore would be ``2.5 * mean(max(cosine, 0))``.

Preprocessing follows CLIP: resize the short side to the model's image size (bicubic), centre crop, normalise
with the folder's ``preprocessor_config.json`` mean/std (OpenAI's values when absent).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasekit.errors import ErasekitError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipScorer:
    """A CLIP model and tokenizer, with its preprocessing.

    Attributes:
        model: a transformers ``CLIPModel``.
        tokenizer: its tokenizer (77 tokens).
        mean: normalisation mean of [0, 1] pixels.
        std: normalisation std.
        source: the model folder (recorded).
    """

    model: Any
    tokenizer: Any
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    source: str = ""

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
        """Load ``CLIPModel`` (safetensors only) and its tokenizer from a local folder."""
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ErasekitError(f"{folder} is not a CLIP model folder (no config.json)")
        try:
            model = CLIPModel.from_pretrained(str(folder), use_safetensors=True).to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise ErasekitError(f"cannot load CLIP from {folder}: {str(e).splitlines()[0]}") from None
        pre = folder / "preprocessor_config.json"
        cfg = json.loads(pre.read_text("utf-8")) if pre.is_file() else {}
        return cls(model, tokenizer, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)),
                   str(folder))  # fmt: skip

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> ``[N, 3, S, S]`` normalised, S = the vision tower's image size."""
        from PIL import Image

        size = self.model.config.vision_config.image_size
        out = []
        for im in images:
            im = im.convert("RGB")
            scale = size / min(im.size)
            w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            out.append(np.asarray(im.crop((left, top, left + size, top + size))))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, S, S]
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Unit-norm projected image embeddings ``[N, E]``."""
        device = next(self.model.parameters()).device
        chunks = []
        for i in range(0, len(images), batch_size):
            out = self.model.get_image_features(
                pixel_values=self.pixels(images[i : i + batch_size]).to(device)
            )
            chunks.append(_pooled(out))
        return torch.nn.functional.normalize(torch.cat(chunks).float().cpu(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm projected text embeddings ``[N, E]``."""
        device = next(self.model.parameters()).device
        chunks = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
            out = self.model.get_text_features(input_ids=tok.input_ids.to(device),
                                               attention_mask=tok.attention_mask.to(device))  # fmt: skip
            chunks.append(_pooled(out))
        return torch.nn.functional.normalize(torch.cat(chunks).float().cpu(), dim=-1)

    def features(self, images: Sequence[Any]) -> torch.Tensor:
        """Image embeddings as FID features ``[N, E]`` (float64)."""
        return self.image_embeds(images).double()

    def score(self, images: Sequence[Any], captions: Sequence[str]) -> dict[str, float]:
        """``{"cosine": mean cosine, "clip_score": 100 * mean(max(cosine, 0)), "images": N}``."""
        if len(images) != len(captions) or not images:
            raise ErasekitError(
                f"CLIP score needs one caption per image ({len(images)} images, {len(captions)})"
            )
        cos = (self.image_embeds(images) * self.text_embeds(captions)).sum(-1)  # [N]
        return {
            "cosine": float(cos.mean()),
            "clip_score": float(100 * cos.clamp_min(0).mean()),
            "images": len(images),
        }


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` is the projected embedding; 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
