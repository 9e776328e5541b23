"""The architectures erasekit builds with random weights: each component's config at full and tiny size.

Full-size configs follow the published checkpoints (SD1.4, SD2.1 768-v, SDXL 1.0, SD3 Medium, Flux.1-dev);
their parameter counts are checked in ``tests/test_tiny_models.py``. Tiny configs keep the same classes and the
same wiring between components (cross-attention and pooled widths) at a few million parameters, so that a whole
pipeline builds, saves, loads and generates in about a second.
"""

from __future__ import annotations

from typing import Any

# ---- text encoders ---------------------------------------------------------------------------------------


def _clip(hidden: int, layers: int, heads: int, inter: int, act: str, proj: int) -> dict[str, Any]:
    # bos/eos/pad 0/2/1 as in the published SD configs: eos_token_id == 2 makes CLIP pool at the argmax id
    return dict(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        hidden_act=act,
        projection_dim=proj,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


CLIP_CONFIGS = {  # name -> size -> CLIPTextConfig kwargs
    "clip-l": {
        "full": _clip(768, 12, 12, 3072, "quick_gelu", 768),
        "tiny": _clip(32, 3, 4, 37, "quick_gelu", 32),
    },
    "openclip-h": {"full": _clip(1024, 23, 16, 4096, "gelu", 512), "tiny": _clip(32, 5, 4, 37, "gelu", 32)},
    "openclip-bigg": {
        "full": _clip(1280, 32, 20, 5120, "gelu", 1280),
        "tiny": _clip(48, 4, 4, 64, "gelu", 48),
    },
}


def _t5(
    d_model: int, d_ff: int, d_kv: int, heads: int, layers: int, vocab: int, buckets: int
) -> dict[str, Any]:
    return dict(
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_heads=heads,
        num_layers=layers,
        vocab_size=vocab,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )


T5_CONFIGS = {"full": _t5(4096, 10240, 64, 64, 24, 32128, 32), "tiny": _t5(96, 64, 8, 4, 2, 1100, 8)}

# ---- denoisers and VAEs ----------------------------------------------------------------------------------

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
UNET_CONFIGS = {  # family -> size -> UNet2DConditionModel kwargs
    "sd15": {
        "full": dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
        ),
        "tiny": dict(_TINY_UNET, cross_attention_dim=32),
    },
    "sd2": {
        "full": dict(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
        ),
        "tiny": dict(_TINY_UNET, cross_attention_dim=32, use_linear_projection=True),
    },
    "sdxl": {  # cross-attention = concat of both encoders' hidden states; pooled text + 6 time ids condition
        "full": dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=768 + 1280,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=1280 + 6 * 256,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "tiny": dict(
            _TINY_UNET,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 48,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=48 + 6 * 8,
        ),
    },
}

# SD3's context is T5's width; its pooled input is CLIP-L's plus bigG's projections. Flux pools CLIP-L's hidden.
TRANSFORMER_CONFIGS = {
    "sd3": {
        "full": dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            caption_projection_dim=1536,
            joint_attention_dim=4096,
            pooled_projection_dim=768 + 1280,
            pos_embed_max_size=192,
        ),
        "tiny": dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=96,
            pooled_projection_dim=32 + 48,
            pos_embed_max_size=16,
        ),
    },
    "flux": {  # 2x2 latent patches are packed into channels: in_channels = 4 * 16
        "full": dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        "tiny": dict(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=96,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    },
}

_VAE_SCALING = {  # family -> (sample_size at full size, latent channels, scaling_factor, shift_factor)
    "sd15": (512, 4, 0.18215, None),
    "sd2": (768, 4, 0.18215, None),
    "sdxl": (1024, 4, 0.13025, None),
    "sd3": (1024, 16, 1.5305, 0.0609),
    "flux": (1024, 16, 0.3611, 0.1159),
}


def vae_config(family: str, size: str) -> dict[str, Any]:
    """AutoencoderKL kwargs: 4 blocks (8x downsampling) at full size, 2 blocks (2x) when tiny."""
    sample, latent, scaling, shift = _VAE_SCALING[family]
    blocks = (128, 256, 512, 512) if size == "full" else (32, 64)
    cfg = dict(
        sample_size=sample if size == "full" else 16,
        block_out_channels=blocks,
        layers_per_block=2 if size == "full" else 1,
        latent_channels=latent,
        scaling_factor=scaling,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
    )
    if shift is not None:  # SD3 and Flux VAEs have no quant convs and shift latents
        cfg.update(shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)
    if family == "sdxl":
        cfg["force_upcast"] = True
    return cfg


_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SCHEDULERS = {  # family -> (class, kwargs), the same at both sizes
    "sd15": ("PNDMScheduler", dict(_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "sd2": (
        "DDIMScheduler",
        dict(
            _SD_BETAS,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        ),
    ),
    "sdxl": ("EulerDiscreteScheduler", dict(_SD_BETAS, steps_offset=1, timestep_spacing="leading")),
    "sd3": ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    "flux": (
        "FlowMatchEulerDiscreteScheduler",
        dict(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    ),
}
