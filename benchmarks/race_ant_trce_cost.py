"""Erase time and peak memory of `race`, `ant` and `trce` on MiniCanvas, extrapolated from cut budgets.

Each method runs its ``paper`` preset (or ``--preset``) on one style and one object with the budget cut to a
fraction (:data:`FRACTION`, or ``--fraction``) along the fields its cost is linear in; the full time is
extrapolated from those runs:

- race: one run of the ESD stage alone (cut ``esd_iterations``, one adversarial iteration) and one of the
  adversarial stage alone (``esd_iterations=0``, cut ``iterations``).
- ant: one mask seed of five and ``iterations`` cut; every gradient-stage and training iteration costs the same.
- trce: ``trajectories`` and ``reg_trajectories`` cut (the data and the steps scale with them); a run with
  ``epochs=0`` gives stage 1 alone, which does not scale.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/race_ant_trce_cost.py --threads 1

Prints a Markdown table of CPU seconds (one torch thread: the compute, whatever else shares the machine), and
each cut run's CPU and wall seconds as it goes. Peak memory is the process's resident memory above its level before the erase
(:class:`erasekit.bench.memory.PeakMemory`), of the cut run.
"""

from __future__ import annotations

import argparse
import time

import torch

CONCEPTS = (("watercolor", "style"), ("fish", "object"))
FRACTION = {"race": 0.02, "ant": 0.1, "trce": 0.1}


def timed(model: object, concept: str, kind: str, method: str, preset: str, **overrides: object) -> tuple:
    """``(cpu seconds, peak MiB)`` of one erase; CPU time, because the machine is shared (wall time is printed)."""
    import erasekit
    from erasekit.bench.memory import PeakMemory

    with PeakMemory() as mem:
        start, wall = time.process_time(), time.perf_counter()
        erasekit.erase(model, [concept], method, preset=preset, concept_type=kind, **overrides)
        seconds = time.process_time() - start
    print(
        f"  {method} {concept} {overrides}: {seconds:.1f} s CPU, {time.perf_counter() - wall:.1f} s wall",
        flush=True,
    )
    return seconds, mem.extra_mb


def race(model: object, concept: str, kind: str, preset: str, f: float) -> tuple[float, float, str]:
    import erasekit

    config = erasekit.make_config("race", preset, kind)
    n = max(1, round(config.iterations * f))
    t_esd, mb = timed(model, concept, kind, "race", preset, esd_iterations=n, iterations=1)
    t_adv, _ = timed(model, concept, kind, "race", preset, esd_iterations=0, iterations=n)
    per_esd, per_adv = t_esd / n, t_adv / n  # the first run's one adversarial iteration is left in
    full = config.esd_iterations * per_esd + config.iterations * per_adv
    return full, mb, f"ESD {per_esd:.2f} s/it, adversarial {per_adv:.2f} s/it"


def ant(model: object, concept: str, kind: str, preset: str, f: float) -> tuple[float, float, str]:
    import erasekit

    config = erasekit.make_config("ant", preset, kind)
    n = max(1, round(config.iterations * f))
    seconds, mb = timed(model, concept, kind, "ant", preset, iterations=n, mask_seeds=config.mask_seeds[:1])
    runs = len(config.mask_seeds) * max(1, len(config.mask_prompts))
    per = seconds / (config.mask_iterations + n)
    return per * (config.mask_iterations * runs + config.iterations), mb, f"{per:.2f} s/it"


def trce(model: object, concept: str, kind: str, preset: str, f: float) -> tuple[float, float, str]:
    import erasekit

    config = erasekit.make_config("trce", preset, kind)
    n, r = max(1, round(config.trajectories * f)), max(1, round(config.reg_trajectories * f))
    stage1, _ = timed(model, concept, kind, "trce", preset, epochs=0)
    seconds, mb = timed(model, concept, kind, "trce", preset, trajectories=n, reg_trajectories=r)
    full = stage1 + (seconds - stage1) * config.trajectories / n
    return full, mb, f"stage 1 {stage1:.1f} s, stage 2 {(seconds - stage1) / n:.2f} s per trajectory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=None, help="instead of FRACTION's")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--methods", default="race,ant,trce")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import erasekit
    from erasekit.progress import set_enabled

    set_enabled(False)
    model = erasekit.load("minicanvas")
    print("| method | concept | extrapolated paper erase, CPU s | peak MiB (cut run) | unit cost (CPU) |")
    print("|---|---|---|---|---|")
    for name in args.methods.split(","):
        for concept, kind in CONCEPTS:
            f = args.fraction or FRACTION[name]
            full, mb, unit = globals()[name](model, concept, kind, args.preset, f)
            print(f"| {name} | {concept} | {full:.0f} | {mb:.0f} | {unit} |", flush=True)


if __name__ == "__main__":
    main()
