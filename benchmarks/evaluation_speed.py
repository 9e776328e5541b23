"""One full MiniCanvas evaluation cell: the plain diffusers pipeline call against erasekit's fast path.

    python benchmarks/evaluation_speed.py [--repeats 3] [--threads N] [--batch-size 16]
        [--fast-sampling DPMSolverMultistepScheduler:10] [--model minicanvas]

The cell is what the leaderboard evaluates per entry and concept: ``evaluate(model, "minicanvas", out,
target="neon", seeds=2)``, i.e. 288 grid + 168 generality images, classification, metrics and the run record.

- ``plain``: what a user would write with diffusers: the same prompts and seeds, ``pipe(prompt=..., generator=
  [one CPU generator per image], num_inference_steps=25, guidance_scale=5.0, output_type="np")`` in batches,
  each image written as a PNG, then classified with the same classifier and scored with the same metrics.
- ``erasekit``: ``evaluate(...)`` as the leaderboard calls it (25 DDIM steps, all runtime speed-ups on).
- ``erasekit+<scheduler><steps>``: the same with the sampling of ``--fast-sampling`` (a different sampling:
  docs/benchmarks.md, "Evaluation speed", says whether its verdicts stay in the 25-step intervals).

Variants run interleaved, ``--repeats`` times each, in one process (the machine may be shared: best and median
are printed, with the load average before and after). The images of ``plain`` and ``erasekit`` are compared
pixel by pixel, and their verdicts one by one. Timings are wall and CPU seconds of the whole cell.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cell_jobs(classifier):
    """The cell's jobs, exactly as the ``minicanvas`` protocol lists them (grid, then the target's generality)."""
    from erasekit.evaluation.protocols.minicanvas import generality_jobs, grid_jobs, seed_list

    objects = list(classifier.object_names)
    styles = [s for s in classifier.style_names if s.lower() != "photo"]
    seeds = seed_list(2)
    return (
        objects,
        styles,
        grid_jobs(objects, styles, seeds) + generality_jobs("neon", "style", objects, seeds),
    )


def plain_cell(model, classifier, out: Path, batch_size: int) -> dict:
    """The cell written with the diffusers pipeline call alone; the grid metrics and every verdict."""
    from PIL import Image

    from erasekit.evaluation.unlearncanvas_metrics import unlearncanvas_metrics

    pipe = model.pipeline
    pipe.set_progress_bar_config(disable=True)
    objects, styles, jobs = cell_jobs(classifier)
    (out / "images").mkdir(parents=True)
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        images = pipe(prompt=[j.prompt for j in batch], generator=[torch.Generator().manual_seed(j.seed) for j in batch],
                      num_inference_steps=25, guidance_scale=5.0, output_type="np").images  # fmt: skip
        for job, image in zip(batch, images):
            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(
                out / "images" / f"{job.key}.png"
            )
    pil = []
    for job in jobs:
        with Image.open(out / "images" / f"{job.key}.png") as im:
            pil.append(im.convert("RGB"))
    pred_objects, pred_styles = classifier.classify(pil)
    records = [
        {**j.meta, "pred_object": po, "pred_style": ps} for j, po, ps in zip(jobs, pred_objects, pred_styles)
    ]
    metrics = unlearncanvas_metrics(
        [r for r in records if r["set"] == "grid"], objects, styles, "neon", "style"
    )
    metrics["predictions"] = {j.key: [po, ps] for j, po, ps in zip(jobs, pred_objects, pred_styles)}
    return metrics


def erasekit_cell(model, classifier, out: Path, batch_size: int, sampling) -> dict:
    from erasekit.evaluation.protocols import evaluate

    return evaluate(model, "minicanvas", out, target="neon", seeds=2, batch_size=batch_size, classifier=classifier,
                    sampling=sampling)  # fmt: skip


def compare(a: Path, b: Path, ma: dict, mb: dict) -> str:
    """How many images differ between two runs, by how many 8-bit levels at most, and how many verdicts."""
    from PIL import Image

    worst, differing = 0, 0
    for file in sorted((a / "images").glob("*.png")):
        x = np.asarray(Image.open(file), dtype=np.int16)
        y = np.asarray(Image.open(b / "images" / file.name), dtype=np.int16)
        worst = max(worst, int(np.abs(x - y).max()))
        differing += int((x != y).any())
    verdicts = sum(ma["predictions"][k] != mb["predictions"][k] for k in ma["predictions"])
    return (f"{differing} of {len(ma['predictions'])} images differ, by at most {worst} level(s); "
            f"{verdicts} verdict(s) differ")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call, both sides")
    parser.add_argument("--fast-sampling", default="DPMSolverMultistepScheduler:10",
                        help="SCHEDULER:STEPS for the extra erasekit variant ('' for none)")  # fmt: skip
    parser.add_argument("--model", default="minicanvas")
    args = parser.parse_args()
    import erasekit
    from erasekit import progress
    from erasekit.evaluation.classifiers import load_classifier
    from erasekit.generation import Sampling

    progress.set_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)  # fmt: skip
    model = erasekit.load(args.model)
    classifier = load_classifier(None)
    variants = {"plain": None, "erasekit": Sampling.for_model(model)}
    if args.fast_sampling:
        name, steps = args.fast_sampling.split(":")
        short = name.replace("MultistepScheduler", "").replace("Scheduler", "")
        variants[f"erasekit+{short}{steps}"] = Sampling.for_model(model, scheduler=name, steps=int(steps))
    root = Path(tempfile.mkdtemp(prefix="evaluation-speed-"))
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    last: dict[str, tuple[Path, dict]] = {}
    for rep in range(args.repeats):
        for name, sampling in variants.items():
            out = root / f"{name}-{rep}"
            wall, cpu = time.perf_counter(), time.process_time()
            if sampling is None:
                metrics = plain_cell(model, classifier, out, args.batch_size)
            else:
                metrics = erasekit_cell(model, classifier, out, args.batch_size, sampling)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            last[name] = (out, metrics)
            print(f"repeat {rep + 1} {name}: {times[name][-1][0]:.1f} s wall, {times[name][-1][1]:.1f} CPU-s; "
                  f"UA {metrics['UA']:.1f} IRA {metrics['IRA']:.1f} CRA {metrics['CRA']:.1f}", flush=True)  # fmt: skip
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    for name in variants:
        if name != "plain":
            print(
                f"{name} vs plain: {compare(last['plain'][0], last[name][0], last['plain'][1], last[name][1])}"
            )
    best_plain = min(t[0] for t in times["plain"])
    median_plain = statistics.median(t[0] for t in times["plain"])
    print(
        "\n| variant | wall s, best | wall s, median | CPU s, median | speed-up, best | speed-up, median | UA | IRA | CRA |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        walls = [t[0] for t in times[name]]
        m = last[name][1]
        print(f"| {name} | {min(walls):.1f} | {statistics.median(walls):.1f} | "
              f"{statistics.median(t[1] for t in times[name]):.1f} | {best_plain / min(walls):.2f}x | "
              f"{median_plain / statistics.median(walls):.2f}x | {m['UA']:.1f} | {m['IRA']:.1f} | {m['CRA']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
