"""FID's Inception-v3 feature extractor (the 2048-d pool features), written without torchvision.

The layout and parameter names follow torchvision's ``Inception3`` with the FID-specific blocks of the original
TensorFlow graph (average pools that ignore padding in the A, C and first E blocks, a max pool in the last E
block), so the weights published for FID (``pt_inception-2015-12-05``) load by name. They come as a pickle:
convert them once, knowingly, to safetensors, e.g.
``safetensors.torch.save_file(torch.load("pt_inception-2015-12-05-6726825d.pth"), "fid_inception.safetensors")``.
Only safetensors are read here; ``fc.*`` (the 1008-class logits) is ignored, anything else must match exactly.

Input: images in [0, 1], resized to 299x299 (bilinear) and scaled to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from erasekit.errors import ErasekitError


class Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU, torchvision's ``BasicConv2d``."""

    def __init__(
        self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding: Any = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class BlockB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = Conv(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = Conv(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = Conv(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = Conv(c7, 192, row[0], padding=row[1])
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class BlockD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = (
            Conv(384, 384, (1, 3), padding=(0, 1)),
            Conv(384, 384, (3, 1), padding=(1, 0)),
        )
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inception-v3 up to the 2048-d average pool, with torchvision's parameter names."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] -> pool features ``[N, 2048]``."""
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))  # [N, 2048]


class InceptionFeatures:
    """FID's Inception features of PIL images, from a safetensors weight file (see the module docstring)."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu") -> None:
        from safetensors.torch import load_file

        path = Path(weights)
        if not path.is_file() or path.suffix != ".safetensors":
            raise ErasekitError(f"Inception weights must be a .safetensors file, got {path}")
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("fc.")}
        self.model = FIDInception()
        expected = set(self.model.state_dict())
        # BatchNorm fills a missing num_batches_tracked itself (older checkpoints lack it)
        missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ErasekitError(
                f"{path} is not FID Inception weights: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self.model.load_state_dict(state, strict=False)  # strictness checked above
        self.model.to(device).eval()
        self.source = str(path)

    @torch.no_grad()
    def features(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """``[N, 2048]`` float64 features of PIL images."""
        device = next(self.model.parameters()).device
        chunks = []
        for i in range(0, len(images), batch_size):
            arrays = np.stack([np.asarray(im.convert("RGB")) for im in images[i : i + batch_size]])
            x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(255)  # [B, 3, H, W] in [0, 1]
            chunks.append(self.model(x.to(device)).double().cpu())
        return torch.cat(chunks)
