"""ESD's η grid erased jointly against each η erased alone (docs/benchmarks.md, "ESD's sweep in one run").

    python benchmarks/esd_joint.py [--method esd-x] [--concept watercolor] [--iterations 20] [--threads 1]

The leaderboard sweeps ESD over η = 1, 2, 4, 8, 16 on every dev concept. ESD's x_t (partial DDIM sampling by the
frozen model) and the frozen model's three predictions do not depend on η, so
:func:`erasekit.registry.erase_jointly` makes them once per iteration and trains one copy per η on them. This
times, on the trained MiniCanvas model, the five settings at ``--iterations`` of ESD's 200 (cost is linear in
iterations) two ways, interleaved per repeat:

- ``alone``: ``erasekit.erase`` once per η, as every sweep cell did before;
- ``joint``: ``erase_jointly`` once for the five.

and compares the patches: each η's joint patch must equal its patch erased alone (largest absolute difference).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import erasekit
from erasekit.concepts import guess_type
from erasekit.registry import erase_jointly, get_method, make_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="esd-x", choices=("esd-x", "esd-u"))
    parser.add_argument("--concept", default="watercolor")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = erasekit.load("minicanvas")
    kind = guess_type(args.concept)
    grid = get_method(args.method).strength.grid
    configs = [make_config(args.method, "paper", kind, iterations=args.iterations, negative_guidance=eta)
               for eta in grid]  # fmt: skip
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.threads} thread(s); {args.method} "
          f"{args.concept!r}; η = {', '.join(map(str, grid))}; {args.iterations} iterations each")  # fmt: skip
    times: dict[str, list[float]] = {"alone": [], "joint": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        alone = [erasekit.erase(model, [args.concept], args.method, config=c) for c in configs]
        times["alone"].append(time.perf_counter() - start)
        start = time.perf_counter()
        joint = erase_jointly(model, [args.concept], args.method, configs)
        times["joint"].append(time.perf_counter() - start)
        diff = max((j.tensors[n] - a.tensors[n]).abs().max().item()
                   for j, a in zip(joint, alone, strict=True) for n in a.tensors)  # fmt: skip
        print(f"  alone {times['alone'][-1]:.1f} s, joint {times['joint'][-1]:.1f} s, "
              f"largest |joint - alone| {diff:.1e}")  # fmt: skip
    a, j = min(times["alone"]), min(times["joint"])
    print(
        f"best of {args.repeats}: alone {a:.1f} s ({a / len(grid) / args.iterations:.2f} s per setting and "
        f"iteration), joint {j:.1f} s ({j / len(grid) / args.iterations:.2f}); speed-up {a / j:.2f}x"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
