"""Seeded, randomly initialised models of every family, tiny (for tests) or full-size (for speed measurements).

``build_components`` makes the pipeline's real classes (``CLIPTextModel``, ``UNet2DConditionModel``,
``FluxTransformer2DModel``...) from the configs in :mod:`erasekit.models.architectures`; ``write_model`` saves them as a diffusers folder that
:func:`erasekit.load` and diffusers' own ``from_pretrained`` read. Full-size configs follow the published
checkpoints: SD1.4, SD2.1 (768, v-prediction), SDXL 1.0, SD3 Medium and Flux.1-dev. Their weights are random:
these folders measure speed and exercise code paths, never image quality.

Tokenizers are real (SD's CLIP BPE, built offline) except T5's, which is a stand-in trained in code (see
:mod:`erasekit.models.t5tokenizer`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.io import check_output_dir, dumps_json, output_dir
from erasekit.models.architectures import (
    CLIP_CONFIGS,
    SCHEDULERS,
    T5_CONFIGS,
    TRANSFORMER_CONFIGS,
    UNET_CONFIGS,
    vae_config,
)
from erasekit.models.families import get_family

SIZES = ("tiny", "full")
MAX_PARAMS = 1_500_000_000  # 6 GB of fp32 weights: larger components do not fit beside other work in 24 GB
ORIGIN_KEY = "_erasekit_random_init"  # in model_index.json; diffusers ignores keys starting with "_"

# ---- the component table -------------------------------------------------------------------------------

Config = Callable[[str], dict[str, Any]]


def _enc(cls: str, arch: str) -> tuple[str, str, Config]:
    return ("transformers", cls, lambda size: CLIP_CONFIGS[arch][size])


def _tok(pad: str) -> tuple[str, str, Config]:
    return ("transformers", "CLIPTokenizer", lambda size: {"pad_token": pad})


_DENOISERS = {
    "sd15": "UNet2DConditionModel",
    "sd2": "UNet2DConditionModel",
    "sdxl": "UNet2DConditionModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}
_T5 = ("transformers", "T5EncoderModel", lambda size: T5_CONFIGS[size])
_T5_TOK = ("transformers", "T5Tokenizer", lambda size: {})


def _family_table(family: str) -> dict[str, tuple[str, str, Config]]:
    """``{component: (library, class name, size -> config kwargs)}`` in the pipeline's order."""
    sched = SCHEDULERS[family]
    common = {
        "vae": ("diffusers", "AutoencoderKL", lambda size: vae_config(family, size)),
        "scheduler": ("diffusers", sched[0], lambda size: sched[1]),
    }
    configs = {**UNET_CONFIGS, **TRANSFORMER_CONFIGS}[family]
    denoiser = {get_family(family).denoiser: ("diffusers", _DENOISERS[family], lambda size: configs[size])}
    eos, bang = "<|endoftext|>", "!"  # SD1's CLIP pads with end-of-text, OpenCLIP with "!" (id 0)
    text = {
        "sd15": {"text_encoder": _enc("CLIPTextModel", "clip-l"), "tokenizer": _tok(eos)},
        "sd2": {"text_encoder": _enc("CLIPTextModel", "openclip-h"), "tokenizer": _tok(bang)},
        "sdxl": {
            "text_encoder": _enc("CLIPTextModel", "clip-l"),
            "text_encoder_2": _enc("CLIPTextModelWithProjection", "openclip-bigg"),
            "tokenizer": _tok(eos),
            "tokenizer_2": _tok(bang),
        },
        "sd3": {
            "text_encoder": _enc("CLIPTextModelWithProjection", "clip-l"),
            "text_encoder_2": _enc("CLIPTextModelWithProjection", "openclip-bigg"),
            "text_encoder_3": _T5,
            "tokenizer": _tok(eos),
            "tokenizer_2": _tok(bang),
            "tokenizer_3": _T5_TOK,
        },
        "flux": {
            "text_encoder": _enc("CLIPTextModel", "clip-l"),
            "text_encoder_2": _T5,
            "tokenizer": _tok(eos),
            "tokenizer_2": _T5_TOK,
        },
    }[family]
    return {**text, **denoiser, **common}


def buildable_families() -> tuple[str, ...]:
    """The families of the family table that have tiny/full random-weight builders here (MiniCanvas is trained)."""
    return tuple(name for name in _DENOISERS)


def component_names(family: str) -> list[str]:
    """Every component a ``family`` pipeline folder holds."""
    get_family(family)
    return list(_family_table(family))


def component_config(family: str, component: str, size: str = "tiny") -> dict[str, Any]:
    """The config kwargs ``component`` is built from (cheap: nothing is allocated)."""
    return dict(_spec(family, component, size)[2](size))


def _spec(family: str, component: str, size: str) -> tuple[str, str, Config]:
    if size not in SIZES:
        raise ErasekitError(f"unknown size {size!r}; choose tiny or full")
    table = _family_table(get_family(family).name)
    if component not in table:
        raise ErasekitError(f"{family} has no component {component!r}; it has {', '.join(table)}")
    return table[component]


def _instantiate(library: str, class_name: str, config: dict[str, Any]) -> Any:
    """One component from its config: transformers models take a config object, diffusers ones kwargs."""
    if class_name == "CLIPTokenizer":
        from erasekit.models.tokenizer import clip_tokenizer

        return clip_tokenizer(pad_token=config["pad_token"])
    if class_name == "T5Tokenizer":
        from erasekit.models.t5tokenizer import t5_tokenizer

        return t5_tokenizer()
    cls = getattr(importlib.import_module(library), class_name)
    if library == "transformers":
        return cls(cls.config_class(**config))
    return cls(**config)


def count_parameters(family: str, component: str, size: str = "tiny") -> int:
    """Exact parameter count of a component, from a weightless build on the ``meta`` device (0 if no module)."""
    library, class_name, config = _spec(family, component, size)
    if "Tokenizer" in class_name or "Scheduler" in class_name:
        return 0
    with torch.device("meta"):
        module = _instantiate(library, class_name, config(size))
    return sum(p.numel() for p in module.parameters())


def check_buildable(family: str, components: list[str], size: str, max_params: int = MAX_PARAMS) -> None:
    """Refuse, before allocating anything, components whose fp32 weights exceed ``max_params``."""
    for name in components:
        n = count_parameters(family, name, size)
        if n > max_params:
            raise ErasekitError(
                f"{family} {name} at --size {size} has {n / 1e9:.2f} B parameters ({n * 4 / 1e9:.1f} GB in fp32), "
                f"too large to build in this machine's memory (limit {max_params / 1e9:.1f} B); "
                f"leave it out with --components"
            )


def _select(family: str, components: list[str] | tuple[str, ...] | str | None) -> list[str]:
    names = component_names(family)
    if components is None:
        return names
    wanted = [c.strip() for c in components.split(",")] if isinstance(components, str) else list(components)
    unknown = [c for c in wanted if c not in names]
    if unknown or not wanted:
        raise ErasekitError(
            f"unknown component(s) {', '.join(unknown) or '(none given)'} for {family}; "
            f"choose from {', '.join(names)}"
        )
    return [n for n in names if n in wanted]


def build_components(
    family: str,
    size: str = "tiny",
    components: list[str] | tuple[str, ...] | str | None = None,
    seed: int = 0,
    max_params: int = MAX_PARAMS,
) -> dict[str, Any]:
    """Build a family's components with seeded random weights.

    Args:
        family: ``sd15``, ``sd2``, ``sdxl``, ``sd3`` or ``flux``.
        size: ``tiny`` (small configs of the same classes) or ``full`` (the published architecture).
        components: names to build (a list or ``"a,b"``); all when ``None``.
        seed: ``torch.manual_seed(seed)`` runs before each component, so each is reproducible on its own.
        max_params: refuse any component larger than this (checked before allocating).

    Returns:
        ``{component: module | tokenizer | scheduler}`` in the pipeline's order.
    """
    names = _select(family, components)
    check_buildable(family, names, size, max_params)
    out = {}
    for name in names:
        library, class_name, config = _spec(family, name, size)
        torch.manual_seed(seed)
        obj = _instantiate(library, class_name, config(size))
        out[name] = obj.eval() if isinstance(obj, torch.nn.Module) else obj
    return out


# ---- writing a folder ------------------------------------------------------------------------------------


def model_index(family: str, size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """``model_index.json`` for a family: every component's class, even those a partial folder leaves out."""
    import inspect

    import diffusers

    fam = get_family(family)
    pipe_cls = getattr(diffusers, fam.pipeline_class)
    table = _family_table(fam.name)
    index: dict[str, Any] = {
        "_class_name": fam.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        ORIGIN_KEY: {"family": fam.name, "size": size, "seed": seed},
    }
    flags = {"requires_safety_checker": False, "force_zeros_for_empty_prompt": True}
    for name in inspect.signature(pipe_cls.__init__).parameters:
        if name in table:
            index[name] = list(table[name][:2])
        elif name in pipe_cls._optional_components:
            index[name] = [None, None]  # safety checker, image encoder: not part of these models
        elif name in flags:
            index[name] = flags[name]
    return index


def write_model(
    family: str,
    out: str | Path,
    size: str = "tiny",
    components: list[str] | tuple[str, ...] | str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    max_params: int = MAX_PARAMS,
) -> Path:
    """Write a diffusers-format folder of seeded random weights (safetensors) that :func:`erasekit.load` reads.

    Args:
        family, size, components, seed, max_params: as for :func:`build_components`.
        out: the folder to create; refused if it exists and is not empty unless ``overwrite``.
        overwrite: replace an existing folder (only once the new one is complete).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.
    """
    check_output_dir(out, overwrite)  # fail before a full-size build, not after
    built = build_components(family, size, components, seed, max_params)
    with output_dir(out, overwrite) as staging:
        for name, obj in built.items():
            obj.save_pretrained(staging / name)
        (staging / "model_index.json").write_text(dumps_json(model_index(family, size, seed)), "utf-8")
    return Path(out)
