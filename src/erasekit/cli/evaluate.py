"""``erasekit eval`` (run a protocol, write RUN/metrics.json + record) and ``erasekit report`` (HTML report).

Under ``torchrun`` / ``accelerate launch`` each process generates its own shard: this entry point (not the
library) reads the launcher's ``WORLD_SIZE``/``LOCAL_RANK`` and initialises ``torch.distributed``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from erasekit.cli.options import (
    add_classifier_arg,
    add_config_flags,
    add_model_arg,
    add_patch_args,
    add_sampling_args,
    classifier_from,
    config_overrides,
    load_patches,
    sampling_from,
)


def register(sub: argparse._SubParsersAction) -> None:
    _register_eval(sub)
    _register_report(sub)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    from erasekit.evaluation.protocols import PROTOCOLS

    specs = [PROTOCOLS.get(name) for name in PROTOCOLS.names()]
    p = sub.add_parser("eval", help="evaluate a (patched) model with a protocol; writes RUN/metrics.json")
    add_model_arg(p)
    add_patch_args(p)
    p.add_argument("--protocol", required=True,
                   help="; ".join(f"{s.name}: {s.summary}" for s in specs))  # fmt: skip
    p.add_argument("--out", required=True, help="run directory (an unfinished run there is resumed)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run at --out")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (runtime only)")
    add_classifier_arg(p)
    add_sampling_args(p)
    add_config_flags(p, [s.config_cls for s in specs], title="protocol options (see docs/evaluation.md)")
    p.set_defaults(func=run_eval)


def _register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report comparing runs")
    p.add_argument("runs", nargs="+", help="run directories written by `erasekit eval`")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--title", default="erasekit evaluation report", help="the report's title")
    p.set_defaults(func=run_report)


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
    from erasekit.errors import ErasekitError
    from erasekit.evaluation.protocols import PROTOCOLS, evaluate
    from erasekit.models.loading import load

    spec = PROTOCOLS.get(args.protocol)
    fields = config_overrides(args, spec.config_cls, f"the {spec.name} protocol")
    PROTOCOLS.config(spec.name, None, None, fields)  # every config error before any loading
    if args.batch_size < 1:
        raise ErasekitError("--batch-size must be at least 1")
    patches = load_patches(args)
    args.device = _init_distributed(args.device)
    model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
    metrics = evaluate(model, spec.name, args.out, patches=patches, merge=args.merge,
                       sampling=sampling_from(args, model), batch_size=args.batch_size, overwrite=args.overwrite,
                       classifier=classifier_from(args), **fields)  # fmt: skip
    if metrics:
        print(_summary(metrics, args.out))
    return 0


def _summary(metrics: dict[str, Any], out: str) -> str:
    keys = ("object_accuracy", "style_accuracy", "UA", "IRA", "CRA", "attack_success_rate", "clip_score",
            "EraseEval")  # fmt: skip
    parts = [f"{k}={metrics[k]:.2f}" for k in keys if isinstance(metrics.get(k), (int, float))]
    if isinstance(metrics.get("fid"), dict):
        parts.append(f"FID={metrics['fid']['value']:.3f}")
    return f"{' '.join(parts) or 'done'} -> {out}/metrics.json"


def run_report(args: argparse.Namespace) -> int:
    from erasekit.evaluation.report import write_report

    path = write_report(args.runs, args.out, title=args.title, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
