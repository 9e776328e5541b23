"""``erasekit tiny-model`` and ``erasekit info``: make random-weight model folders, and describe models and patches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from erasekit.cli.options import add_out_arg


def register(sub: argparse._SubParsersAction) -> None:
    from erasekit.models.tiny import buildable_families

    p = sub.add_parser(
        "tiny-model", help="write a diffusers folder with seeded random weights (tiny or full size)"
    )
    p.add_argument("--family", required=True, choices=buildable_families(), help="model family")
    p.add_argument(
        "--size",
        choices=("tiny", "full"),
        default="tiny",
        help="tiny: small configs for tests; full: the published architecture, for speed measurements",
    )
    p.add_argument("--components", default=None, help="comma-separated components to write (default: all)")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before each component (default 0)")
    add_out_arg(p, "model folder")
    p.set_defaults(func=run_tiny_model)

    i = sub.add_parser("info", help="describe a model folder (family, components, CLIP layout) or a patch")
    i.add_argument(
        "target", metavar="MODEL_OR_PATCH", help="a diffusers folder, Hub id, 'minicanvas' or a patch"
    )
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=run_info)


def run_tiny_model(args: argparse.Namespace) -> int:
    from erasekit.models.tiny import write_model

    out = write_model(args.family, args.out, args.size, args.components, args.seed, args.overwrite)
    print(f"wrote {args.size} {args.family} model (seed {args.seed}) -> {out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    target = Path(args.target).expanduser()
    if (target / "erasure_config.json").is_file():
        from erasekit.hooked import load_erasure

        info = {"patch": str(target), **load_erasure(target).summary()}
    else:
        info = model_info(args.target)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---- describing a model folder without loading its weights ---------------------------------------------


def model_info(source: str) -> dict[str, Any]:
    """Family, components (class, parameter count) and CLIP encoder layout of a model folder.

    Parameter counts and the layout come from weightless (``meta``) builds of each component's config, so this
    is fast even for full-size models, and reads no weights.
    """
    from erasekit.models.families import detect_family
    from erasekit.models.loading import read_json, resolve_path

    path = resolve_path(source)
    index = read_json(path / "model_index.json") or {}
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
    names = names or [p.name for p in sorted(path.iterdir()) if (p / "config.json").is_file()]
    family = detect_family(index.get("_class_name"), read_json(path / "text_encoder" / "config.json"))
    components = {n: _component_info(path / n, index.get(n)) for n in names}
    encoders = {
        enc: _clip_layout(path / enc, index.get(enc))
        for enc in family.clip_encoders
        if components.get(enc, {}).get("present")
    }
    return {
        "model": source,
        "path": str(path),
        "pipeline_class": index.get("_class_name"),
        "family": family.name,
        "family_label": family.label,
        "random_init": index.get("_erasekit_random_init"),
        "components": components,
        "clip_encoders": encoders,
    }


def _component_info(folder: Path, entry: list | None) -> dict[str, Any]:
    info: dict[str, Any] = {"class": entry[1] if entry else None, "present": folder.is_dir()}
    if not folder.is_dir():
        return info
    suffixes = {p.suffix for p in folder.iterdir()}
    if ".safetensors" in suffixes:
        info["weights"] = "safetensors"
    elif suffixes & {".bin", ".ckpt", ".pt"}:
        info["weights"] = "pickled only"
    module = _meta_module(folder, entry)
    if module is not None:
        info["class"] = type(module).__name__
        info["parameters"] = sum(p.numel() for p in module.parameters())
    return info


def _meta_module(folder: Path, entry: list | None) -> Any | None:
    """The component built from its config on the ``meta`` device (no memory), or ``None`` if not a module."""
    import torch

    from erasekit.models.loading import read_json

    config = read_json(folder / "config.json")
    if config is None:
        return None  # tokenizers, schedulers, image processors
    if entry:
        library, class_name = entry
    elif config.get("architectures"):
        library, class_name = "transformers", config["architectures"][0]
    else:
        library, class_name = "diffusers", config.get("_class_name", "")
    cls = _find_class(library, class_name)
    if cls is None:
        return None  # e.g. a pipeline-specific class this diffusers lacks: described by name only
    with torch.device("meta"):
        if hasattr(cls, "config_class") and hasattr(cls.config_class, "from_pretrained"):  # transformers
            return cls(cls.config_class.from_pretrained(str(folder)))
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers
            return cls.from_config(cls.load_config(str(folder)))
    return None


def _find_class(library: str, class_name: str) -> Any | None:
    """``library.class_name``; diffusers names pipeline-local classes by subpackage (``stable_diffusion``)."""
    import importlib

    for module in (library, f"diffusers.pipelines.{library}"):
        try:
            cls = getattr(importlib.import_module(module), class_name, None)
        except ImportError:
            continue
        if cls is not None:
            return cls
    return None


def _clip_layout(folder: Path, entry: list | None) -> dict[str, Any]:
    """Blocks, widths and the qualified names methods edit, from a weightless build of the encoder."""
    import importlib

    import torch

    from erasekit.models.families import attention_out_path, block_path, clip_prefix, num_blocks

    class_name = entry[1] if entry else "CLIPTextModel"
    cls = getattr(importlib.import_module("transformers"), class_name)
    config = cls.config_class.from_pretrained(str(folder))
    with torch.device("meta"):
        encoder = cls(config)
    return {
        "class": class_name,
        "blocks": num_blocks(encoder),
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "mlp_size": config.intermediate_size,
        "activation": config.hidden_act,
        "projection_dim": config.projection_dim if hasattr(encoder, "text_projection") else None,
        "prefix": clip_prefix(encoder),
        "block_path": block_path(encoder, 0).removesuffix(".0") + ".N",
        "last_attention_out": attention_out_path(encoder, -1),
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable lines for :func:`model_info` or a patch summary."""
    if "patch" in info:
        return "\n".join(f"{k:<14} {v}" for k, v in info.items())
    lines = [f"model          {info['model']} ({info['path']})"]
    lines.append(f"family         {info['family']} = {info['family_label']} ({info['pipeline_class']})")
    if info["random_init"]:
        r = info["random_init"]
        made = f"erasekit tiny-model --family {r['family']} --size {r['size']} --seed {r['seed']}"
        lines.append(f"weights        random, from {made}")
    lines.append("components")
    for name, c in info["components"].items():
        params = f"{c['parameters']:>15,} params" if "parameters" in c else ""
        state = f"{params} {c.get('weights', '')}".rstrip() if c["present"] else "absent"
        lines.append(f"  {name:<17} {c['class'] or '?':<32} {state}")
    lines.append("CLIP text encoders")
    for name, e in info["clip_encoders"].items():
        proj = f", projection {e['projection_dim']}" if e["projection_dim"] else ""
        lines.append(
            f"  {name:<17} {e['blocks']} blocks, hidden {e['hidden_size']}, {e['heads']} heads, "
            f"MLP {e['mlp_size']}, {e['activation']}{proj}; blocks at {e['block_path']}, "
            f"last attention out {e['last_attention_out']}"
        )
    return "\n".join(lines)
