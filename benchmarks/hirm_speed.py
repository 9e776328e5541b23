"""HiRM's training cost on an SD1.4-sized random CLIP-L text encoder: erasekit's loop against the plain one.

The plain implementation is the authors' procedure written straightforwardly: a full encoder forward with a
hook on the last block's ``self_attn.out_proj``, ``mse_loss`` to the target, backward, AdamW step. erasekit's
loop stops the forward at the hook (the last MLP and final LayerNorm cannot change the loss) and, with
``loss_positions="content"``, runs only the positions up to the longest prompt's end-of-text token.

Run::

    .venv/bin/python benchmarks/hirm_speed.py            # about 15 minutes on 2 busy cores

Every measurement runs in a fresh worker process that loads the same saved encoder (seeded random weights from
``erasekit.models.tiny``, ``--size full``). Wall time covers the training loop only (targets, steps), not the
load or a warm-up forward. CPU time (all threads) is reported beside wall time: it is less sensitive to other jobs
on the machine. Peak memory is the highest resident set size above the size just before training, sampled from
``/proc/self/statm`` every 2 ms (Linux only); workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
tensors leave the resident set at once and it tracks live memory. Times are the best and the median of ``--repeats``
runs, interleaved so that background load hits every variant alike. The workers save the trained tensors, and the
script reports how far each variant's are from the plain implementation's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.methods.hirm.config import HirmConfig

CONCEPT = "Van Gogh"
PLAIN = "plain (full forward + hook)"
VARIANTS = {  # name -> (implementation, loss positions)
    PLAIN: ("plain", "all"),
    "erasekit, paper preset": ("ours", "all"),
    "erasekit, loss_positions=content": ("ours", "content"),
}


class PeakRss:
    """Context manager: the peak resident set size above its value at entry, in MiB."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak, self.base, self._stop = period, 0, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


# ---- the two implementations (run inside a worker) ------------------------------------------------------


def plain_hirm_r(
    encoder: torch.nn.Module, tokenizer: Any, prompt: str, config: HirmConfig
) -> dict[str, torch.Tensor]:
    """The authors' loop, written plainly, on block 0's q/k/v/out/fc1/fc2 (the encoder is frozen on entry)."""
    from erasekit.methods.hirm.train import trainable_names

    names = trainable_names(encoder, config)
    params = [encoder.get_parameter(n).requires_grad_(True) for n in names]
    ids = tokenizer(
        prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    torch.manual_seed(config.seed)
    u = torch.rand(1, 77, encoder.config.hidden_size)
    target = u / u.norm() * config.coefficient
    seen: dict[str, torch.Tensor] = {}
    hook = encoder.encoder.layers[-1].self_attn.out_proj.register_forward_hook(
        lambda m, i, o: seen.update(a=o)
    )
    opt = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    for _ in range(config.steps):
        encoder(input_ids=ids)
        loss = F.mse_loss(seen["a"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hook.remove()
    return {n: p.detach().clone() for n, p in zip(names, params)}


def ours(
    encoder: torch.nn.Module, tokenizer: Any, concepts: list[str], config: HirmConfig
) -> dict[str, torch.Tensor]:
    from erasekit.methods.hirm.train import trained

    with trained(encoder, tokenizer, concepts, config) as run:
        return {n: encoder.get_parameter(n).detach().clone() for n in run.names}


def worker(args: argparse.Namespace) -> None:
    """Load the encoder, train once, print ``{"seconds", "cpu_seconds", "peak_mib"}`` as JSON, save the tensors."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from erasekit import progress

    progress.set_enabled(False)
    encoder = CLIPTextModel.from_pretrained(args.model / "text_encoder").requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(args.model / "tokenizer")
    concepts = [CONCEPT] if args.k == 1 else [f"artist {i:03d}" for i in range(args.k)]
    config = HirmConfig(steps=args.steps, loss_positions=args.positions, multi="joint")
    with torch.no_grad():  # warm-up: pages the memory-mapped weights in and starts the thread pool
        encoder(input_ids=tokenizer(["warm up"], return_tensors="pt").input_ids)
    with PeakRss() as mem:
        start, cpu = time.perf_counter(), time.process_time()
        if args.impl == "plain":
            tensors = plain_hirm_r(encoder, tokenizer, CONCEPT, config)
        else:
            tensors = ours(encoder, tokenizer, concepts, config)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if args.save:
        save_file(tensors, str(args.save))
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": mem.mib}))


# ---- the driver ------------------------------------------------------------------------------------------


def run_worker(
    model: Path, impl: str, positions: str, k: int, steps: int, save: Path | None = None
) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--impl", impl]
    cmd += ["--positions", positions, "--k", str(k), "--steps", str(steps)]
    cmd += ["--save", str(save)] if save else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare_plain(model: Path, tmp: Path, steps: int, repeats: int) -> list[str]:
    """Rows: best and median wall time, CPU time and peak memory of plain vs erasekit; tensor distance."""
    from safetensors.torch import load_file

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, (impl, positions) in VARIANTS.items():
            runs[name].append(
                run_worker(model, impl, positions, 1, steps, tmp / f"{impl}-{positions}.safetensors")
            )
    plain = load_file(str(tmp / "plain-all.safetensors"))
    best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    rows = []
    for name, (impl, positions) in VARIANTS.items():
        got = load_file(str(tmp / f"{impl}-{positions}.safetensors"))
        diff = max((got[k] - plain[k]).abs().max().item() for k in plain)
        median = statistics.median(r["seconds"] for r in runs[name])
        cpu = min(r["cpu_seconds"] for r in runs[name])
        mib = statistics.median(r["peak_mib"] for r in runs[name])
        same = "bitwise equal" if diff == 0 else f"max abs diff {diff:.1e}"
        rows.append(
            f"| {name} | {steps} | {best[name]:.2f} | {median:.2f} | {best[PLAIN] / best[name]:.2f}x | {cpu:.2f} "
            f"| {mib:.0f} | {same} |"
        )
    return rows


def joint_cost(model: Path, ks: list[int], steps: int, big_steps: int, reference_steps: int) -> list[str]:
    """Rows: one joint run of K concepts (each its own random target), all 77 positions and content only."""
    rows = []
    for positions in ("all", "content"):
        for k in ks:
            n = steps if k < 100 else min(steps, big_steps)
            r = run_worker(model, "ours", positions, k, n)
            per_step = r["seconds"] / n
            rows.append(
                f"| {k} | {positions} | {n} | {r['seconds']:.2f} | {per_step:.3f} | "
                f"{per_step * reference_steps / k:.3f} | {r['peak_mib']:.0f} |"
            )
    return rows


def drive(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="hirm-speed-") as folder:
        measure_all(args, Path(folder))


def measure_all(args: argparse.Namespace, tmp: Path) -> None:
    """Save the encoder under ``tmp``, then print both tables."""
    from erasekit.models.tiny import build_components

    parts = build_components("sd15", size="full", components=["text_encoder", "tokenizer"])
    for name, obj in parts.items():
        obj.save_pretrained(tmp / "model" / name)
    n_params = sum(p.numel() for p in parts["text_encoder"].parameters()) / 1e6
    del parts
    print(
        f"CLIP-L {n_params:.1f} M params (random, seed 0), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"\n| implementation | steps | wall s, best of {args.repeats} | wall s, median | speed-up (best) "
        "| CPU s, best | peak MiB (median) | trained tensors vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(compare_plain(tmp / "model", tmp, args.steps, args.repeats)), flush=True)
    ks = [int(k) for k in args.k.split(",")]
    print(
        f"\n| K | loss positions | steps | wall s | s per step | s per concept for {args.steps} steps | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    joint_steps = args.joint_steps or args.steps
    print("\n".join(joint_cost(tmp / "model", ks, joint_steps, args.k100_steps, args.steps)))
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant in the plain comparison")
    parser.add_argument("--k", default="1,10,100", help="joint concept counts")
    parser.add_argument(
        "--joint-steps", type=int, default=None, help="steps of each joint run (default: --steps)"
    )
    parser.add_argument(
        "--k100-steps", type=int, default=3, help="steps for K >= 100 (per-step cost is reported)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("plain", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--positions", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.k = int(args.k)
        worker(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
