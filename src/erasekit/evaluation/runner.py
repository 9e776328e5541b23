"""The generation runner: prompt x seed grids, deterministic per-image seeds, resumable, shardable.

Images go to ``OUT/images/<key>.png`` (each written atomically) and one JSON line per finished image to a
manifest. A restarted run skips every image that is already in the manifest and on disk.

Images are made by :func:`erasekit.generation.render`, the one generation path (its docstring says what an
image depends on); this module adds the job list, the PNG files, the manifest, resuming and sharding.

Sharding: when ``torch.distributed`` is initialised (``torchrun``, ``accelerate launch``), rank ``r`` of ``w``
takes jobs ``r, r + w, r + 2w, ...`` of the full list, writes ``manifest.part-<r>.jsonl``, and rank 0 merges the
parts into ``manifest.jsonl`` in job order, exactly as a single process would write it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.generation import FAST, Request, Sampling, Speedups, png_bytes, render, to_uint8
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
    pipeline: Any,
    jobs: Sequence[Job],
    out: str | Path,
    sampling: Sampling,
    *,
    batch_size: int = 8,
    speedups: Speedups = FAST,
) -> list[dict[str, Any]]:
    """Generate every job not yet done into ``out``; return the merged manifest entries in job order.

    Args:
        pipeline: a diffusers text-to-image pipeline (its own ``__call__`` is used).
        jobs: the images to make; keys must be unique.
        out: the run directory.
        sampling: steps, guidance, size, scheduler.
        batch_size: images per pipeline call (a runtime setting: it does not change the images).
        speedups: the generation path's runtime speed-ups (:class:`~erasekit.generation.Speedups`).
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
    _run_batches(pipeline, mine, out, sampling, batch_size, speedups, out / f"manifest.part-{rank}.jsonl")
    barrier(world)
    if rank == 0:
        merge_manifests(out, keys)
    barrier(world)
    by_key = {e["key"]: e for e in read_manifest(out)}
    return [by_key[k] for k in keys]


def _run_batches(
    pipeline: Any,
    jobs: list[Job],
    out: Path,
    sampling: Sampling,
    batch_size: int,
    speedups: Speedups,
    part: Path,
) -> None:
    """Render the jobs a batch at a time; each batch's PNGs are written before its manifest lines.

    With ``speedups.overlap_writes`` one background thread writes (and fsyncs) batch ``k`` while batch ``k + 1``
    renders; at most one batch waits, and a failed write stops the run at the next batch.
    """
    if not jobs:
        return
    chunks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="erasekit-writer") as writer:
        pending: Future | None = None
        for chunk in track(chunks, desc="generating", total=len(chunks), unit="batch"):
            requests = [Request(seed=j.seed, prompt=j.prompt, guidance=j.guidance) for j in chunk]
            images = render(pipeline, requests, sampling, batch_size=batch_size, desc=None, speedups=speedups)
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_batch, out, chunk, images, sampling, part)
            if not speedups.overlap_writes:
                pending.result()
        if pending is not None:
            pending.result()


def _write_batch(out: Path, chunk: list[Job], images: list[Any], sampling: Sampling, part: Path) -> None:
    for job, image in zip(chunk, images):
        atomic_write_bytes(out / IMAGES / f"{job.key}.png", png_bytes(to_uint8(image)))
    _append_lines(part, [_entry(job, sampling) for job in chunk])


def _entry(job: Job, sampling: Sampling) -> dict[str, Any]:
    entry = asdict(job)
    entry["guidance"] = job.guidance if job.guidance is not None else sampling.guidance
    entry["file"] = f"{IMAGES}/{job.key}.png"
    return entry


REUSED_PART = "manifest.part-reused.jsonl"


def reuse_images(out: str | Path, jobs: Sequence[Job], sampling: Sampling, source: str | Path) -> int:
    """Link into ``out`` the images of the run ``source`` that ``jobs`` would make again; return how many.

    An image is reused when ``source``'s manifest has the job's key with the same prompt, seed and guidance, and
    the job is not done in ``out`` yet. The caller vouches that ``source`` was generated with the same model,
    patches and sampling (:func:`erasekit.evaluation.run.run_protocol` checks its record): an image depends on
    nothing else. Files are hard-linked (copied where links are not possible), each atomically, then listed in a
    manifest part file that the run merges as its own.
    """
    import shutil

    out, source = Path(out), Path(source)
    done = {e["key"] for e in read_manifest(out) if (out / e["file"]).is_file()}
    theirs = {e["key"]: e for e in read_manifest(source)}
    linked = []
    for job in jobs:
        mine, found = _entry(job, sampling), theirs.get(job.key)
        if (
            job.key in done
            or found is None
            or any(found.get(k) != mine[k] for k in ("prompt", "seed", "guidance"))
        ):
            continue
        src, dst = source / found["file"], out / mine["file"]
        if not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.reused")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        linked.append(mine)
    if linked:
        _append_lines(out / REUSED_PART, linked)
    return len(linked)


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
