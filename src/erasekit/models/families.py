"""The one table of model families: which components are CLIP text encoders, and where their parts live.

Method code never names a family. It asks this table for the CLIP encoders of a loaded model, and for the
qualified names of a block's attention and MLP, using the names of the installed transformers (v5:
``CLIPTextModel`` has no ``.text_model`` prefix; older checkpoints are remapped by ``from_pretrained``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from erasekit.errors import ErasekitError

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_PROJ = ("fc1", "fc2")


@dataclass(frozen=True, kw_only=True)
class Family:
    """One pipeline family.

    Attributes:
        name: short id used on the command line (``sd15``).
        label: human name (``SD1.x``).
        pipeline_class: the diffusers pipeline class name in ``model_index.json``.
        clip_encoders: components that are CLIP text encoders, in the pipeline's order.
        tokenizers: the tokenizer paired with each CLIP encoder.
        other_encoders: non-CLIP text encoders (T5), never edited by text-encoder methods.
        denoiser: the UNet or transformer component.
        steps: default denoising steps (the pipeline's own default, or the world's protocol for MiniCanvas).
        guidance: default classifier-free guidance scale.
        unet_training: the UNet takes ``(sample, timestep, encoder_hidden_states)`` alone, so the small DDIM
            sampler of :mod:`erasekit.denoising` can train through it (ESD, AdvUnlearn, attacks' latents).
        cross_attention_edit: the UNet's cross-attention reads the CLIP rows directly, so the closed-form
            editors (UCE, RECE, SPEED, MACE) apply.
    """

    name: str
    label: str
    pipeline_class: str
    clip_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    other_encoders: tuple[str, ...] = ()
    denoiser: str = "unet"
    steps: int = 50
    guidance: float = 7.5
    unet_training: bool = False
    cross_attention_edit: bool = False


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="sd15",
            label="SD1.x",
            pipeline_class="StableDiffusionPipeline",
            clip_encoders=("text_encoder",),
            tokenizers=("tokenizer",),
            unet_training=True,
            cross_attention_edit=True,
        ),
        Family(
            name="sd2",
            label="SD2.x",
            pipeline_class="StableDiffusionPipeline",
            clip_encoders=("text_encoder",),
            tokenizers=("tokenizer",),
            unet_training=True,
            cross_attention_edit=True,
        ),
        Family(
            name="sdxl",
            label="SDXL",
            pipeline_class="StableDiffusionXLPipeline",
            clip_encoders=("text_encoder", "text_encoder_2"),
            tokenizers=("tokenizer", "tokenizer_2"),
            guidance=5.0,
            cross_attention_edit=True,
        ),
        Family(
            name="sd3",
            label="SD3",
            pipeline_class="StableDiffusion3Pipeline",
            clip_encoders=("text_encoder", "text_encoder_2"),
            tokenizers=("tokenizer", "tokenizer_2"),
            other_encoders=("text_encoder_3",),
            denoiser="transformer",
            steps=28,
            guidance=7.0,
        ),
        Family(
            name="flux",
            label="Flux",
            pipeline_class="FluxPipeline",
            clip_encoders=("text_encoder",),
            tokenizers=("tokenizer",),
            other_encoders=("text_encoder_2",),
            denoiser="transformer",
            steps=28,
            guidance=3.5,
        ),
        # The SD1.x architecture at MiniCanvas size; named by the folder's own erasekit.json (see
        # :func:`detect_family`). Its steps and guidance are the world's protocol (docs/minicanvas.md).
        Family(
            name="minicanvas",
            label="MiniCanvas (SD1.x architecture)",
            pipeline_class="StableDiffusionPipeline",
            clip_encoders=("text_encoder",),
            tokenizers=("tokenizer",),
            steps=25,
            guidance=5.0,
            unet_training=True,
            cross_attention_edit=True,
        ),
    )
}

#: The model folder's own erasekit settings: ``{"family": name}`` and/or ``{"sampling": {"steps", "guidance"}}``.
FOLDER_CONFIG = "erasekit.json"
CAPABILITIES = {
    "unet_training": "trains through the UNet with the DDIM sampler",
    "cross_attention_edit": "edits the UNet's cross-attention in closed form",
}

_BY_PIPELINE = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ErasekitError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}") from None


def with_capability(capability: str) -> tuple[str, ...]:
    """The names of the families that have ``capability`` (a boolean field of :class:`Family`)."""
    return tuple(f.name for f in FAMILIES.values() if getattr(f, capability))


def detect_family(
    pipeline_class: str | None,
    text_encoder_config: dict[str, Any] | None,
    folder_config: dict[str, Any] | None = None,
) -> Family:
    """Infer the family from the folder's own config, ``model_index.json``'s class name and the text encoder.

    A folder config naming a family wins (MiniCanvas folders name ``minicanvas``), provided its pipeline class
    agrees. SD1.x and SD2.x share a pipeline class; SD2's OpenCLIP-H encoder is 1024 wide with GELU, SD1's
    CLIP-L uses quick-GELU, which tells them apart at every size.
    """
    named = (folder_config or {}).get("family")
    if named is not None:
        family = get_family(str(named))
        if pipeline_class not in (None, family.pipeline_class):
            raise ErasekitError(
                f"{FOLDER_CONFIG} names family {named!r}, but model_index.json holds a {pipeline_class}"
            )
        return family
    if pipeline_class in _BY_PIPELINE:
        return FAMILIES[_BY_PIPELINE[pipeline_class]]
    if pipeline_class not in (None, "StableDiffusionPipeline"):
        raise ErasekitError(f"unsupported pipeline class {pipeline_class!r}; supported: {supported()}")
    if text_encoder_config is None:
        raise ErasekitError("cannot tell the model family: no model_index.json and no text_encoder config")
    return FAMILIES["sd2" if text_encoder_config.get("hidden_act") == "gelu" else "sd15"]


def supported() -> str:
    return ", ".join(f"{f.label} ({f.pipeline_class})" for f in FAMILIES.values())


# ---- the layout of a CLIP text encoder under transformers 5 -------------------------------------------


def clip_core(encoder: Any) -> Any:
    """The module holding ``embeddings``/``encoder``/``final_layer_norm`` (transformers 4 had ``.text_model``)."""
    return getattr(encoder, "text_model", encoder)


def clip_prefix(encoder: Any) -> str:
    """Qualified-name prefix of :func:`clip_core` inside ``encoder`` (``""`` or ``"text_model."``)."""
    return "text_model." if hasattr(encoder, "text_model") else ""


def num_blocks(encoder: Any) -> int:
    return len(clip_core(encoder).encoder.layers)


def block_path(encoder: Any, block: int) -> str:
    """Qualified module name of block ``block`` (negative counts from the end)."""
    n = num_blocks(encoder)
    if not -n <= block < n:
        raise ErasekitError(f"block {block} out of range for a {n}-block text encoder")
    return f"{clip_prefix(encoder)}encoder.layers.{block % n}"


def block_linear_names(encoder: Any, block: int, parts: tuple[str, ...] = ("attn", "mlp")) -> list[str]:
    """Qualified names of the Linear modules of one block: ``attn`` gives q/k/v/out, ``mlp`` gives fc1/fc2."""
    unknown = set(parts) - {"attn", "mlp"}
    if unknown:
        raise ErasekitError(f"unknown block part(s) {sorted(unknown)}; use 'attn' and/or 'mlp'")
    base = block_path(encoder, block)
    names = []
    if "attn" in parts:
        names += [f"{base}.self_attn.{p}" for p in ATTN_PROJ]
    if "mlp" in parts:
        names += [f"{base}.mlp.{p}" for p in MLP_PROJ]
    return names


def attention_out_path(encoder: Any, block: int) -> str:
    """The self-attention output projection of a block: HiRM's supervision point for ``block=-1``."""
    return f"{block_path(encoder, block)}.self_attn.out_proj"


def token_embedding_path(encoder: Any) -> str:
    return f"{clip_prefix(encoder)}embeddings.token_embedding"
