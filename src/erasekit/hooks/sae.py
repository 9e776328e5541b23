"""``topk_sae``: ItD's sparse autoencoder on one text-encoder layer, with its features deactivated behind a gate.

On the layer's output h ``[B, L, D]`` (NANSirun/Interpret-then-deactivate, ``src/SAE/sae.py`` and the inference
hook ``strength_with_feature_text_batch``):

    z = ReLU(TopK_k(W_enc (h − b_pre) + b_lat))             [B, L, n]
    z'[:, 1:, F] = scale · z[:, 1:, F]                      (every row but BOS; scale −8)
    r = W_dec z' + b_pre                                    [B, L, D]
    prompt i is replaced by r_i when mean_{L, D} (r_i − h_i)² ≥ threshold

The module returns ``gate · (r − h)``, so the residual hook turns h into r for the gated prompts and leaves the
others as they are. The reconstruction error is not added back, as released.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from erasekit.hooks import ModuleType, register_module_type


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """A top-k SAE and the features it deactivates."""

    dim: int = field(metadata={"help": "width of the layer's output"})
    latents: int = field(metadata={"help": "n, the SAE's latents"})
    k: int = field(metadata={"help": "latents kept per token"})
    features: tuple[int, ...] = field(default=(), metadata={"help": "F, the latents to deactivate"})
    scale: float = field(default=-8.0, metadata={"help": "what the deactivated latents are multiplied by"})
    threshold: float = field(
        default=0.0, metadata={"help": "a prompt is replaced when its reconstruction shift is at least this"}
    )

    def __post_init__(self) -> None:
        if min(self.dim, self.latents, self.k) < 1 or self.k > self.latents:
            raise ValueError("dim, latents and k must be >= 1, k <= latents")
        if any(not 0 <= f < self.latents for f in self.features) or len(set(self.features)) != len(
            self.features
        ):
            raise ValueError("features must be distinct latent indices")
        if self.threshold < 0:
            raise ValueError("threshold must be >= 0")


class TopKSAE(nn.Module):
    """The SAE (untied encoder and decoder, pre-bias and latent bias) and, as a residual, its deactivation."""

    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.Linear(config.dim, config.latents, bias=False)
        self.decoder = nn.Linear(config.latents, config.dim, bias=False)
        self.pre_bias = nn.Parameter(torch.zeros(config.dim))
        self.latent_bias = nn.Parameter(torch.zeros(config.latents))

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., n]``: the k largest pre-activations kept, then ReLU."""
        pre = self.encoder(h - self.pre_bias) + self.latent_bias
        top = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) + self.pre_bias

    def deactivated(self, h: torch.Tensor) -> torch.Tensor:
        """r ``[B, L, D]``: the reconstruction with F scaled on every row but the first (BOS)."""
        z = self.encode(h)
        factor = torch.ones(self.config.latents, dtype=z.dtype, device=z.device)
        if self.config.features:
            factor[list(self.config.features)] = self.config.scale
        rows = torch.ones(z.shape[1], 1, dtype=z.dtype, device=z.device)
        rows[0] = 0  # BOS keeps its latents
        z = z * (1 + rows * (factor - 1))  # [B, L, n]
        return self.decode(z)

    def shift(self, h: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean over rows and channels of (r − h)², the gate's statistic."""
        return (self.deactivated(h) - h).pow(2).mean(dim=(1, 2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.deactivated(h)
        gate = ((r - h).pow(2).mean(dim=(1, 2)) >= self.config.threshold).to(h.dtype)  # [B]
        return gate.view(-1, 1, 1) * (r - h)


def _sae_misfit(config: SAEConfig, target: nn.Module) -> str | None:
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    if not isinstance(target, CLIPEncoderLayer):
        return f"an SAE attaches to a CLIP encoder layer, not {type(target).__name__}"
    width = target.layer_norm1.normalized_shape[0]
    return None if width == config.dim else f"the layer is {width} wide, the SAE {config.dim}"


register_module_type(ModuleType("topk_sae", SAEConfig, TopKSAE, _sae_misfit,
                                "ItD's top-k SAE on a text-encoder layer, deactivating features behind a gate",
                                reads="output"))  # fmt: skip
