"""One evaluation run, whatever the protocol: prepare RUN/, apply patches, generate, score, record.

Protocols (:mod:`erasekit.evaluation.protocols`) build the job list and a scoring function; this module does the
rest the same way for all of them. Under ``torch.distributed`` every rank generates its shard; rank 0 scores and
writes the record, and the other ranks return ``{}``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.errors import ErasekitError
from erasekit.evaluation import record as rec
from erasekit.evaluation.runner import Job, barrier, generate, reuse_images, shard
from erasekit.generation import FAST, Sampling, Speedups, scheduler_info
from erasekit.hooked import compose

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

# score(entries, patch) -> metrics; entries are the manifest entries in job order.
Scorer = Callable[[list[dict[str, Any]], Any], dict[str, Any]]


def run_protocol(
    *,
    protocol: str,
    model: LoadedModel,
    jobs: Sequence[Job],
    sampling: Sampling,
    score: Scorer,
    out: str | Path,
    config: dict[str, Any],
    patches: Sequence[Any] = (),
    merge: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    speedups: Speedups | None = None,
    reuse: str | Path | None = None,
) -> dict[str, Any]:
    """Generate ``jobs`` with the patched model into ``out``, score them, and write metrics and record.

    Args:
        protocol: the protocol name (recorded).
        model: a :class:`~erasekit.models.loading.LoadedModel` with a pipeline, unpatched.
        jobs: the images to generate.
        sampling: steps, guidance, size, scheduler.
        score: turns manifest entries (and the combined patch) into metrics.
        out: the run directory (created, or resumed when unfinished).
        config: what identifies the run (a restart must give the same); saved as ``run_config.json``.
        patches: patches or hooked artifacts applied for generation, composed in order (fingerprints are
            checked).
        merge: merge rule for patches that change the same tensor.
        batch_size: images per pipeline call (runtime only).
        overwrite: replace a finished run at ``out``.
        speedups: the generation path's runtime speed-ups (``None``: the defaults; never recorded).
        reuse: a finished run of the same model, patches and sampling (checked against its record) whose images
            of the same jobs are linked instead of generated again (runtime only: the images are the same).

    Returns:
        The metrics (``{}`` on ranks other than 0).
    """
    pipeline = model.require_pipeline()
    if not jobs:
        raise ErasekitError("the protocol produced no images to generate")
    rank, world = shard()
    rec.check_run(out, config, overwrite)  # every rank, so all of them stop with the same clear error
    barrier(world)
    start = time.perf_counter()
    base_sha = rec.model_fingerprint(model.components)
    patch = compose(patches, merge) if patches else None
    if reuse is not None:
        check_reuse(Path(reuse), base_sha, list(patches), sampling)
    if rank == 0:
        rec.prepare_run(out, config, overwrite)
        if reuse is not None:
            reuse_images(out, jobs, sampling, reuse)
    barrier(world)
    before = _done_keys(out)
    gen_start = time.perf_counter()
    with patch.applied(model) if patch is not None else contextlib.nullcontext():
        entries = generate(pipeline, jobs, out, sampling, batch_size=batch_size, speedups=speedups or FAST)
    gen_seconds = time.perf_counter() - gen_start
    if rank != 0:
        return {}
    new = len({j.key for j in jobs} - before)
    score_start = time.perf_counter()
    metrics = score(entries, patch)
    timings = {
        "generation_seconds": gen_seconds,
        "images_generated": new,
        "images_per_second": new / gen_seconds if new and gen_seconds > 0 else None,
        "scoring_seconds": time.perf_counter() - score_start,
        "total_seconds": time.perf_counter() - start,
        "world_size": world,
        "batch_size": batch_size,
    }
    seeds = sorted({j.seed for j in jobs})
    sampling_record = {
        **asdict(sampling),
        "seeds": seeds,
        "scheduler_used": scheduler_info(pipeline, sampling.scheduler),
        "safety_checker": "off while generating" if getattr(pipeline, "safety_checker", None) else "none",
    }
    record = rec.build_record(
        protocol=protocol,
        config=config,
        model=model,
        model_sha256=base_sha,
        patches=list(patches),
        sampling=sampling_record,
        timings=timings,
        metrics=metrics,
    )
    rec.finish_run(out, metrics, record)
    return metrics


def check_reuse(source: Path, model_sha: str, patches: list[Any], sampling: Sampling) -> None:
    """Raise unless ``source`` is a finished run of the same model, patches and sampling."""
    record = rec.read_run(source)["record"]
    theirs = record.get("sampling", {})
    same = (
        record.get("model", {}).get("sha256") == model_sha
        and [p.get("sha256") for p in record.get("patches", [])] == [p.fingerprint() for p in patches]
        and all(theirs.get(k) == v for k, v in json.loads(json.dumps(asdict(sampling))).items())
    )
    if not same:
        raise ErasekitError(
            f"cannot reuse the images of {source}: another model, patch or sampling made them"
        )


def _done_keys(out: str | Path) -> set[str]:
    from erasekit.evaluation.runner import read_manifest

    return {e["key"] for e in read_manifest(out)} if Path(out).is_dir() else set()


def load_images(out: str | Path, entries: Sequence[dict[str, Any]]) -> list[Any]:
    """The PIL images of manifest entries, fully read (files are closed)."""
    from PIL import Image

    images = []
    for e in entries:
        with Image.open(Path(out) / e["file"]) as im:
            images.append(im.convert("RGB"))
    return images
