"""``erasekit generate``: PNGs from a (patched) model through the one generation path, a seed per image."""

from __future__ import annotations

import argparse

from erasekit.cli.options import add_model_arg, add_out_arg, add_patch_args, add_sampling_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images, optionally with patches applied")
    add_model_arg(p)
    add_patch_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (runtime only)")
    add_sampling_args(p)
    add_out_arg(p, "images")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import contextlib
    from dataclasses import asdict

    from erasekit.cli.options import check_positive_flags, load_patches, sampling_from
    from erasekit.errors import ErasekitError
    from erasekit.generation import Request, render, save_png, to_uint8
    from erasekit.hooked import compose
    from erasekit.io import atomic_write_json, output_dir
    from erasekit.models.loading import load

    check_positive_flags(args, "num", "batch_size")
    if any(not p.strip() for p in args.prompt):
        raise ErasekitError("a prompt must be a non-empty string")
    patches = load_patches(args)
    with output_dir(args.out, args.overwrite) as tmp:
        model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
        pipe = model.require_pipeline()
        sampling = sampling_from(args, model)
        prompts = [p for p in args.prompt for _ in range(args.num)]
        requests = [Request(seed=args.seed + i, prompt=p) for i, p in enumerate(prompts)]
        patch = compose(patches, args.merge) if patches else None
        with patch.applied(model) if patch is not None else contextlib.nullcontext():
            images = render(pipe, requests, sampling, batch_size=args.batch_size)
        records = []
        for i, (img, req) in enumerate(zip(images, requests)):
            name = f"{i:05d}_seed{req.seed}.png"
            save_png(to_uint8(img), tmp / name)
            records.append({"file": name, "prompt": req.prompt, "seed": req.seed})
        atomic_write_json(tmp / "generation.json", {"model": args.model, "patches": [p.summary() for p in patches],
                                                    "sampling": asdict(sampling), "images": records})  # fmt: skip
    print(f"wrote {len(images)} image(s) -> {args.out}")
    return 0
