"""The generation runner: prompt x seed grids, deterministic per-image seeds, resumable, shardable.

Images go to ``OUT/images/<key>.png`` (each written atomically) and one JSON line per finished image to a
manifest. A restarted run skips every image that is already in the manifest and on disk.

Determinism: each image gets its own CPU ``torch.Generator`` seeded with its seed, passed to the pipeline's own
``__call__`` as ``generator=[...]``; diffusers draws each image's initial noise from its own generator, so an image
does not depend on the batch it lands in (batched float arithmetic may differ in the last bit, which PNG's 8-bit
rounding absorbs almost always; see docs/evaluation.md). Noise is drawn on the CPU, so it is the same on every
device. A pipeline's safety checker is switched off while generating: the evaluation measures the model.

Sharding: when ``torch.distributed`` is initialised (``torchrun``, ``accelerate launch``), rank ``r`` of ``w``
takes jobs ``r, r + w, r + 2w, ...`` of the full list, writes ``manifest.part-<r>.jsonl``, and rank 0 merges the
parts into ``manifest.jsonl`` in job order, exactly as a single process would write it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_bytes, atomic_write_text
from erasekit.progress import track

MANIFEST = "manifest.jsonl"
IMAGES = "images"


@dataclass(frozen=True)
class Job:
    """One image to generate.

    Attributes:
        key: unique, file-name-safe id; the image is ``images/<key>.png``.
        prompt: the prompt.
        seed: the seed of this image's own generator.
        guidance: a per-prompt guidance scale (I2P), or ``None`` for the run's.
        meta: protocol data kept in the manifest (e.g. ``{"object": "circle", "style": "ink"}``).
    """

    key: str
    prompt: str
    seed: int
    guidance: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How images are sampled (saved in the run record).

    Attributes:
        steps: denoising steps.
        guidance: classifier-free guidance scale, unless a job has its own.
        height: image height in pixels, or ``None`` for the pipeline's default.
        width: image width in pixels, or ``None`` for the pipeline's default.
        negative_prompt: the negative prompt, or ``None``.
        scheduler: a diffusers scheduler class name to sample with (built from the model's scheduler config),
            or ``None`` to keep the model's own.
    """

    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ErasekitError(f"steps must be at least 1, not {self.steps}")
        if self.guidance < 0:
            raise ErasekitError(f"guidance must be non-negative, not {self.guidance}")


def grid(prompts: Sequence[tuple[str, str, dict[str, Any]]], seeds: Sequence[int]) -> list[Job]:
    """The prompt x seed grid, prompt-major.

    Args:
        prompts: ``(key_stem, prompt, meta)`` triples; the key of an image is ``<key_stem>_s<seed>``.
        seeds: the seeds every prompt is sampled with.
    """
    return [
        Job(f"{stem}_s{seed}", text, int(seed), None, dict(meta))
        for stem, text, meta in prompts
        for seed in seeds
    ]


def shard() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed`` when initialised, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def generate(
    pipeline: Any, jobs: Sequence[Job], out: str | Path, sampling: Sampling, *, batch_size: int = 8
) -> list[dict[str, Any]]:
    """Generate every job not yet done into ``out``; return the merged manifest entries in job order.

    Args:
        pipeline: a diffusers text-to-image pipeline (its own ``__call__`` is used).
        jobs: the images to make; keys must be unique.
        out: the run directory.
        sampling: steps, guidance, size, scheduler.
        batch_size: images per pipeline call (a runtime setting: it does not change the images).
    """
    if batch_size < 1:
        raise ErasekitError(f"batch size must be at least 1, not {batch_size}")
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ErasekitError("generation jobs have duplicate keys")
    out = Path(out)
    rank, world = shard()
    done = {e["key"] for e in read_manifest(out) if (out / e["file"]).is_file()}
    mine = [j for j in jobs[rank::world] if j.key not in done]
    with _scheduler(pipeline, sampling.scheduler), _no_safety_checker(pipeline):
        _run_batches(pipeline, mine, out, sampling, batch_size, out / f"manifest.part-{rank}.jsonl")
    barrier(world)
    if rank == 0:
        merge_manifests(out, keys)
    barrier(world)
    by_key = {e["key"]: e for e in read_manifest(out)}
    return [by_key[k] for k in keys]


def _run_batches(
    pipeline: Any, jobs: list[Job], out: Path, sampling: Sampling, batch_size: int, part: Path
) -> None:
    if not jobs:
        return
    pipeline.set_progress_bar_config(disable=True)
    batches = list(_batches(jobs, batch_size))
    for batch in track(batches, desc="generating", total=len(batches), unit="batch"):
        images = _call(pipeline, batch, sampling)
        for job, image in zip(batch, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write_bytes(out / IMAGES / f"{job.key}.png", buf.getvalue())
        _append_lines(part, [_entry(job, sampling) for job in batch])


def _batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """Consecutive runs of at most ``size`` jobs sharing one guidance scale."""
    batch: list[Job] = []
    for job in jobs:
        if batch and (len(batch) == size or job.guidance != batch[0].guidance):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def _call(pipeline: Any, batch: list[Job], sampling: Sampling) -> list[Any]:
    kwargs: dict[str, Any] = {
        "prompt": [j.prompt for j in batch],
        "generator": [torch.Generator("cpu").manual_seed(j.seed) for j in batch],
        "num_inference_steps": sampling.steps,
        "guidance_scale": batch[0].guidance if batch[0].guidance is not None else sampling.guidance,
        "output_type": "pil",
    }
    if sampling.height is not None:
        kwargs["height"] = sampling.height
    if sampling.width is not None:
        kwargs["width"] = sampling.width
    if sampling.negative_prompt is not None:
        kwargs["negative_prompt"] = [sampling.negative_prompt] * len(batch)
    with torch.no_grad():
        return list(pipeline(**kwargs).images)


def _entry(job: Job, sampling: Sampling) -> dict[str, Any]:
    entry = asdict(job)
    entry["guidance"] = job.guidance if job.guidance is not None else sampling.guidance
    entry["file"] = f"{IMAGES}/{job.key}.png"
    return entry


@contextlib.contextmanager
def _scheduler(pipeline: Any, name: str | None) -> Iterator[None]:
    """Swap in the scheduler class ``name`` (built from the model's scheduler config); put the model's back after."""
    if name is None:
        yield
        return
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ErasekitError(f"diffusers has no scheduler class {name!r}")
    saved = pipeline.scheduler
    pipeline.scheduler = cls.from_config(saved.config)
    try:
        yield
    finally:
        pipeline.scheduler = saved


@contextlib.contextmanager
def _no_safety_checker(pipeline: Any) -> Iterator[None]:
    """Evaluate the model, not its output filter: SD's safety checker (which blacks out images it flags) is
    switched off during generation and put back afterwards."""
    checker = getattr(pipeline, "safety_checker", None)
    if checker is None:
        yield
        return
    pipeline.safety_checker = None
    try:
        yield
    finally:
        pipeline.safety_checker = checker


def scheduler_info(pipeline: Any, name: str | None) -> dict[str, Any]:
    """The class name and config of the scheduler a run samples with (for the run record)."""
    with _scheduler(pipeline, name):
        sched = pipeline.scheduler
        return {"class": type(sched).__name__, "config": {k: v for k, v in dict(sched.config).items()}}


# ---- the manifest ----------------------------------------------------------------------------------------


def read_manifest(out: str | Path) -> list[dict[str, Any]]:
    """All entries of ``manifest.jsonl`` and of any unmerged part files (later entries win)."""
    out = Path(out)
    entries: dict[str, dict[str, Any]] = {}
    for file in [out / MANIFEST, *sorted(out.glob("manifest.part-*.jsonl"))]:
        if not file.is_file():
            continue
        lines = file.read_text("utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    continue  # a last line cut short by a crash: its image is regenerated
                raise ErasekitError(f"{file}:{n}: not a JSON line") from None
            entries[entry["key"]] = entry
    return list(entries.values())


def merge_manifests(out: str | Path, order: Sequence[str]) -> None:
    """Write every entry into ``manifest.jsonl`` in ``order`` (unknown keys last) and delete the part files."""
    out = Path(out)
    rank = {k: i for i, k in enumerate(order)}
    entries = sorted(read_manifest(out), key=lambda e: (rank.get(e["key"], len(rank)), e["key"]))
    atomic_write_text(out / MANIFEST, "".join(_line(e) for e in entries))
    for part in out.glob("manifest.part-*.jsonl"):
        part.unlink()


def _line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"


def _append_lines(file: Path, entries: list[dict[str, Any]]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "a", encoding="utf-8") as f:
        f.write("".join(_line(e) for e in entries))
        f.flush()
        os.fsync(f.fileno())


def barrier(world: int) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
