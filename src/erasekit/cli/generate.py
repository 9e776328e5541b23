"""``erasekit generate``: PNGs from a (patched) model, deterministic per-image seeds."""

from __future__ import annotations

import argparse

from erasekit.cli.options import add_model_arg, add_out_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images, optionally with patches applied")
    add_model_arg(p)
    p.add_argument("--patch", action="append", default=[], help="patch directory (repeat to compose)")
    p.add_argument(
        "--merge", choices=["mean"], default=None, help="how to combine patches that change one tensor"
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None, help="image height (the model's default when omitted)")
    p.add_argument("--width", type=int, default=None, help="image width (the model's default when omitted)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (runtime only)")
    add_out_arg(p, "images")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import contextlib

    from erasekit.errors import ErasekitError
    from erasekit.exchange import combine
    from erasekit.generation import generate, save_png
    from erasekit.io import atomic_write_json, output_dir
    from erasekit.models.loading import load
    from erasekit.patch import Patch

    if args.num < 1:
        raise ErasekitError("--num must be at least 1")
    if any(not p.strip() for p in args.prompt):
        raise ErasekitError("a prompt must be a non-empty string")
    patches = [Patch.load(p) for p in args.patch]
    with output_dir(args.out, args.overwrite) as tmp:
        model = load(args.model, device=args.device, allow_pickle=args.allow_pickle)
        pipe = model.require_pipeline()
        prompts = [p for p in args.prompt for _ in range(args.num)]
        seeds = [args.seed + i for i in range(len(prompts))]
        ctx = combine(patches, args.merge).applied(model) if patches else contextlib.nullcontext()
        with ctx:
            images = generate(
                pipe,
                prompts,
                seeds,
                steps=args.steps,
                guidance=args.guidance,
                height=args.height,
                width=args.width,
                batch_size=args.batch_size,
            )
        records = []
        for i, (img, prompt, seed) in enumerate(zip(images, prompts, seeds)):
            name = f"{i:05d}_seed{seed}.png"
            save_png(img, tmp / name)
            records.append({"file": name, "prompt": prompt, "seed": seed})
        atomic_write_json(
            tmp / "generation.json",
            {
                "model": args.model,
                "patches": [p.summary() for p in patches],
                "steps": args.steps,
                "guidance": args.guidance,
                "images": records,
            },
        )
    print(f"wrote {len(images)} image(s) -> {args.out}")
    return 0
