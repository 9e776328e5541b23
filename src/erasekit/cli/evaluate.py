"""``erasekit eval`` (run a protocol, write RUN/metrics.json + record) and ``erasekit report`` (HTML report).

Under ``torchrun`` / ``accelerate launch`` each process generates its own shard: this entry point (not the
library) reads the launcher's ``WORLD_SIZE``/``LOCAL_RANK`` and initialises ``torch.distributed``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from erasekit.cli.options import add_model_arg

PROTOCOL_NAMES = "minicanvas, nsfw, coco, prompts"


def register(sub: argparse._SubParsersAction) -> None:
    _register_eval(sub)
    _register_report(sub)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a (patched) model with a protocol; writes RUN/metrics.json")
    add_model_arg(p)
    p.add_argument("--patch", action="append", default=[], help="patch directory (repeat to compose)")
    p.add_argument(
        "--merge", choices=["mean"], default=None, help="how to combine patches that change one tensor"
    )
    p.add_argument("--protocol", required=True, help=f"one of {PROTOCOL_NAMES}")
    p.add_argument("--out", required=True, help="run directory (an unfinished run there is resumed)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run at --out")
    p.add_argument(
        "--target", default=None, help="the erased concept (minicanvas: UA/IRA/CRA; prompts: rate)"
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per prompt (minicanvas 2, others 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (minicanvas 25, others 50)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (minicanvas 5.0, others 7.5)")
    p.add_argument(
        "--scheduler", default=None, help="diffusers scheduler class, e.g. DDIMScheduler (default: model's)"
    )
    p.add_argument("--height", type=int, default=None, help="image height (prompt protocols)")
    p.add_argument("--width", type=int, default=None, help="image width (prompt protocols)")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (runtime only)")
    g = p.add_argument_group("minicanvas")
    g.add_argument("--classifier", default=None, help="classifier checkpoint folder (default: built-in)")
    g.add_argument("--objects", default=None, help="comma-separated objects: evaluate a sub-grid")
    g.add_argument("--styles", default=None, help="comma-separated styles: evaluate a sub-grid")
    g.add_argument("--no-generality", action="store_true", help="skip the synonym/paraphrase images")
    g = p.add_argument_group("nsfw, coco, prompts")
    g.add_argument("--prompts", default=None, help="prompt file (CSV or text)")
    g.add_argument("--format", default=None, help="i2p, unlearndiffatk, mma, ringabell, coco or txt")
    g.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    g.add_argument("--preset", default="hirm", help="NudeNet preset: hirm, unlearndiffatk or rece")
    g.add_argument("--detector", default="nudenet", help="prompts protocol: nudenet or classifier")
    g.add_argument("--clip", default=None, help="local CLIP model folder (CLIP score, CLIP-feature FID)")
    g.add_argument(
        "--fid-reference", default=None, help="run directory or image folder to compute FID against"
    )
    g.add_argument(
        "--fid-features", default="clip", choices=["clip", "classifier", "inception"], help="FID features"
    )
    g.add_argument(
        "--fid-weights",
        default=None,
        help="FID Inception weights (.safetensors) for --fid-features inception",
    )
    p.set_defaults(func=run_eval)


def _register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report comparing runs")
    p.add_argument("runs", nargs="+", help="run directories written by `erasekit eval`")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--title", default="erasekit evaluation report", help="the report's title")
    p.set_defaults(func=run_report)


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _common(args: argparse.Namespace, patches: list[Any]) -> dict[str, Any]:
    kw = {"patches": patches, "merge": args.merge, "batch_size": args.batch_size, "overwrite": args.overwrite}
    for name in ("seeds", "steps", "guidance", "scheduler"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def _classifier(args: argparse.Namespace) -> Any:
    if args.classifier is None:
        return None
    from erasekit.evaluation.classifiers import load_classifier_folder

    return load_classifier_folder(args.classifier, device=args.device)


def _minicanvas_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"target": args.target, "classifier": _classifier(args), "objects": _split(args.objects),
            "styles": _split(args.styles), "generality": not args.no_generality,
            "fid_reference": args.fid_reference}  # fmt: skip


def _prompt_kwargs(args: argparse.Namespace, default_fmt: str) -> dict[str, Any]:
    from erasekit.errors import ErasekitError

    if args.prompts is None:
        raise ErasekitError(f"--protocol {args.protocol} needs --prompts FILE")
    return {"prompts": args.prompts, "fmt": args.format or default_fmt, "limit": args.limit,
            "height": args.height, "width": args.width}  # fmt: skip


_ADAPTERS = {
    "minicanvas": _minicanvas_kwargs,
    "nsfw": lambda a: {**_prompt_kwargs(a, "i2p"), "preset": a.preset},
    "coco": lambda a: {
        **_prompt_kwargs(a, "coco"),
        "clip": a.clip,
        "fid_reference": a.fid_reference,
        "fid_features": a.fid_features,
        "fid_weights": a.fid_weights,
        "classifier": _classifier(a),
    },  # fmt: skip
    "prompts": lambda a: {
        **_prompt_kwargs(a, "txt"),
        "detector": a.detector,
        "preset": a.preset,
        "target": a.target,
        "classifier": _classifier(a),
    },  # fmt: skip
}


def _init_distributed(device: str) -> str:
    """Join the launcher's process group (torchrun / accelerate launch set WORLD_SIZE); pick this rank's GPU."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else device


def run_eval(args: argparse.Namespace) -> int:
    from erasekit.evaluation.protocols import get_protocol
    from erasekit.models.loading import load
    from erasekit.patch import Patch

    protocol = get_protocol(args.protocol)
    patches = [Patch.load(p) for p in args.patch]
    args.device = _init_distributed(args.device)
    kwargs = {**_common(args, patches), **_ADAPTERS[protocol.name](args)}
    model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
    metrics = protocol.run(model, args.out, **kwargs)
    if metrics:
        print(_summary(metrics, args.out))
    return 0


def _summary(metrics: dict[str, Any], out: str) -> str:
    keys = ("object_accuracy", "style_accuracy", "UA", "IRA", "CRA", "attack_success_rate", "clip_score")
    parts = [f"{k}={metrics[k]:.2f}" for k in keys if isinstance(metrics.get(k), (int, float))]
    if isinstance(metrics.get("fid"), dict):
        parts.append(f"FID={metrics['fid']['value']:.3f}")
    return f"{' '.join(parts) or 'done'} -> {out}/metrics.json"


def run_report(args: argparse.Namespace) -> int:
    from erasekit.evaluation.report import write_report

    path = write_report(args.runs, args.out, title=args.title, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
