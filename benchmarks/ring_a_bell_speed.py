"""Ring-A-Bell's fitness step: erasekit's batched population against the plain one-prompt-at-a-time loop.

One generation of Ring-A-Bell encodes every individual of the population (``[BOS, K tokens, EOS, pad...]``) and
measures its squared distance to the target. erasekit sends the whole population through the text encoder as one
batch (:func:`erasekit.attacks.ring_a_bell.fitness`); the plain implementation is the straightforward loop that
encodes one individual per call, as a per-prompt scoring function would. Both give the same fitness (the script
reports the largest relative difference) and so the same search.

Run::

    .venv/bin/python benchmarks/ring_a_bell_speed.py                 # about 2 minutes on 2 idle cores
    .venv/bin/python benchmarks/ring_a_bell_speed.py --encoders minicanvas --repeats 5

Encoders: ``clip-l`` is SD1.x's CLIP ViT-L/14 text encoder at its published size with seeded random weights
(``erasekit.models.tiny``, ``--size full``), ``minicanvas`` the shipped MiniCanvas tiny CLIP. Times are wall
seconds per generation (population 200, K = 16, the ``paper`` budget), best and median of ``--repeats`` runs
with the two variants interleaved, after one warm-up generation of each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from erasekit.attacks.base import ordinary_tokens
from erasekit.attacks.ring_a_bell import Encoders, fitness

ENCODERS = ("clip-l", "minicanvas")


def load_encoders(name: str) -> Encoders:
    if name == "minicanvas":
        from erasekit.models.loading import load

        return Encoders(load("minicanvas"))
    from erasekit.models.families import FAMILIES
    from erasekit.models.loading import LoadedModel
    from erasekit.models.tiny import build_components

    parts = build_components("sd15", size="full", components="text_encoder,tokenizer")
    return Encoders(LoadedModel(source="random CLIP-L", path=None, family=FAMILIES["sd15"], components=parts))


def plain_fitness(encoders: Encoders, ids: torch.Tensor, target: list[torch.Tensor]) -> torch.Tensor:
    """The loop: one encoder call per individual."""
    return torch.cat([fitness(encoders, ids[i : i + 1], target) for i in range(len(ids))])


def measure(name: str, population: int, k: int, repeats: int) -> dict[str, Any]:
    encoders = load_encoders(name)
    g = torch.Generator().manual_seed(0)
    vocab = ordinary_tokens(encoders.tokenizer)
    ids = vocab[torch.randint(0, len(vocab), (population, k), generator=g)]
    target = [h[:1] for h in encoders.prompts(["A house image in sketch style."])]
    variants = {
        "plain (one individual per call)": plain_fitness,
        "erasekit (population in one batch)": fitness,
    }
    results = {v: f(encoders, ids, target) for v, f in variants.items()}  # warm-up, and the values compared
    plain, ours = results.values()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v, f in variants.items():
            start = time.perf_counter()
            f(encoders, ids, target)
            times[v].append(time.perf_counter() - start)
    return {
        "encoder": name,
        "times": times,
        "max_rel_diff": float(((plain - ours).abs() / plain.abs().clamp_min(1e-12)).max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoders", default=",".join(ENCODERS), help=f"comma-separated: {', '.join(ENCODERS)}")
    p.add_argument("--population", type=int, default=200)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"population {args.population}, K {args.tokens}, {args.threads} torch thread(s), "
          f"{args.repeats} repeat(s)\n")  # fmt: skip
    print(
        "| encoder | variant | s / generation (best) | (median) | speed-up (median) | max rel. fitness diff |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.encoders.split(","):
        r = measure(name.strip(), args.population, args.tokens, args.repeats)
        medians = {v: statistics.median(t) for v, t in r["times"].items()}
        base = next(iter(medians.values()))
        for v, t in r["times"].items():
            print(f"| {r['encoder']} | {v} | {min(t):.2f} | {medians[v]:.2f} | {base / medians[v]:.1f}x | "
                  f"{r['max_rel_diff']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
