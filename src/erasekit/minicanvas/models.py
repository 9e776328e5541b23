"""The MiniCanvas networks: standard transformers/diffusers classes at toy sizes, plus two small CNNs.

The pipeline parts (``CLIPTextModel``, ``AutoencoderKL``, ``UNet2DConditionModel``, ``DDIMScheduler``) are the
classes a real SD1.x checkpoint uses, so every method and attack treats MiniCanvas like SD1.x. The image tower
exists only to pretrain the text encoder contrastively and is not shipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from erasekit.models.tokenizer import clip_vocab_and_merges

BOS_ID, EOS_ID = 49406, 49407
# SD1.x's noise schedule.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """Network sizes. Every field is saved in the model card.

    Attributes:
        text_hidden: CLIP text hidden size (= the UNet's cross-attention width).
        text_layers: CLIP text transformer blocks.
        text_heads: attention heads per text block.
        embed_dim: joint image-text embedding size for contrastive pretraining.
        vae_channels: AutoencoderKL ``block_out_channels`` (3 blocks: 32x32 -> 8x8).
        latent_channels: VAE latent channels.
        unet_channels: UNet ``block_out_channels``.
        unet_layers: UNet ``layers_per_block``.
        unet_heads: attention heads in the UNet's transformer blocks.
        classifier_width: channels of the classifier's first stage (doubled per stage).
    """

    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    embed_dim: int = 128
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers: int = 1
    unet_heads: int = 4
    classifier_width: int = 32

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def build_text_encoder(sizes: Sizes) -> Any:
    """A ``CLIPTextModel`` over the full 49408-token CLIP vocabulary, SD1.x's special-token ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(clip_vocab_and_merges()[0]),
        hidden_size=sizes.text_hidden,
        intermediate_size=4 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=sizes.embed_dim,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    return CLIPTextModel(config)


class ImageTower(nn.Module):
    """A small CNN image encoder for contrastive pretraining: ``[N, 3, 32, 32]`` in [-1, 1] -> ``[N, embed_dim]``."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.body = _conv_stack(width)
        self.head = nn.Linear(4 * width, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def _conv_stack(width: int) -> nn.Sequential:
    """Three conv stages, 32 -> 16 -> 8 -> 4 pixels, then global average pooling: ``[N, 4 * width]``."""

    def stage(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(8, c_out),
            nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, stride=2),
            nn.GroupNorm(8, c_out),
            nn.GELU(),
        ]

    w = width
    layers = stage(3, w) + stage(w, 2 * w) + stage(2 * w, 4 * w)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class TextHead(nn.Module):
    """Projects a ``CLIPTextModel``'s pooled output into the joint space (not shipped)."""

    def __init__(self, hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), CLIP's start

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)


def build_vae(sizes: Sizes) -> Any:
    """An ``AutoencoderKL`` from 32x32x3 to 8x8x``latent_channels``."""
    from diffusers import AutoencoderKL

    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        latent_channels=sizes.latent_channels,
        norm_num_groups=16,
        sample_size=32,
    )


def build_unet(sizes: Sizes, latent_size: int = 8) -> Any:
    """A ``UNet2DConditionModel`` on the latent, cross-attending to the text encoder's last hidden state."""
    from diffusers import UNet2DConditionModel

    n = len(sizes.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.unet_layers,
        cross_attention_dim=sizes.text_hidden,
        attention_head_dim=sizes.unet_heads,
        norm_num_groups=32,
    )


def train_scheduler() -> Any:
    """The DDPM noise schedule used in training (SD1.x's betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, prediction_type="epsilon", clip_sample=False)


def sample_scheduler() -> Any:
    """The shipped sampling scheduler: DDIM over the same betas, configured as in SD1.x."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def round_to_fp16_(module: nn.Module) -> nn.Module:
    """Round every floating parameter through fp16 in place, so training downstream sees the shipped values."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))
    return module
