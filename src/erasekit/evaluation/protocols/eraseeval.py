"""The ``eraseeval`` protocol: EraseEval's four criteria and its combined score, adapted to MiniCanvas.

EraseEval (fmp453/erase-eval, ``eval.py``; the formulas are in :mod:`erasekit.evaluation.eraseeval_metrics`)
compares the erased model's images with the base model's. Here the world's classifier replaces the VLM judges
(an image "shows the concept" when the target's head predicts it) and its penultimate ``features`` replace the
caption and CLIP embeddings; the world's prompts replace the LLM-written ones:

- **M1, the target prompt** (the release: one GPT-written prompt naming the concept, 5 images): ``A {object}
  image in {style} style.`` with the target and each concept of the other kind, ``seeds`` images each; pairs are
  taken within a prompt.
- **M2, related prompts** (the release: one GPT-written prompt that evokes the concept without naming it, kept
  once the base model shows the concept in more than half of its 5 images): the template with each of the
  target's synonyms in the world's table instead of its name; with ``verify_related`` a synonym is kept when the
  base model's images of it show the target in more than half of the cases (all are kept if none passes).
- **M3, other concepts** (the release: CLIP score on 1000 COCO captions): every cell of the grid without the
  target, ``grid_seeds`` images each; the score of an image is the share of the two heads that read its prompt's
  object and style.
- **M4, the distribution** (the release: CMMD to real COCO images): CMMD in the classifier's features between
  the same images and the world's renders of the same cells (``reference``: a folder or run of other images).

The base model's images are generated into ``OUT/base/`` (a resumable sub-run) after the erased model's, with
the same prompts and seeds; a run without patches is its own base, and one given ``base_images`` (a finished run
of the unpatched model, as the bench's base row is) links that run's images instead of generating them again.
``metrics.json`` holds ``EraseEval`` (the combined score, in [0, 1]), ``M1``..``M4`` and ``details``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from erasekit.concepts import slug
from erasekit.errors import ErasekitError
from erasekit.evaluation import eraseeval_metrics as em
from erasekit.evaluation.protocols import RunOptions, identity, register_protocol
from erasekit.evaluation.protocols.minicanvas import _grid, _in_world, seed_list
from erasekit.evaluation.run import load_images, run_protocol
from erasekit.evaluation.runner import Job
from erasekit.minicanvas.world import TEMPLATE

if TYPE_CHECKING:
    from erasekit.evaluation.classifiers import ImageClassifier
    from erasekit.models.loading import LoadedModel

BASE = "base"  # OUT/base/: the base model's images
RENDER_SEED = 2024  # the release's default seed, for the world's reference renders


@dataclass(frozen=True, kw_only=True)
class EraseEvalProtocol:
    """What the ``eraseeval`` protocol measures."""

    target: str | None = field(
        default=None, metadata={"help": "the erased concept (required): a MiniCanvas object or style"}
    )
    seeds: int = field(default=2, metadata={"help": "seeds per target and related prompt (M1, M2)"})
    grid_seeds: int = field(default=1, metadata={"help": "seeds per cell without the target (M3, M4)"})
    verify_related: bool = field(
        default=True,
        metadata={"help": "keep only synonyms the base model shows as the target in over half its images"},
    )
    reference: str | None = field(
        default=None,
        metadata={"help": "M4's real images: a run directory or image folder (default: world renders)"},
    )
    combine: str = field(default="geometric", metadata={"help": "combined score: geometric or harmonic mean"})

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("the eraseeval protocol needs a target concept (--target NAME)")
        if self.seeds < 1 or self.grid_seeds < 1:
            raise ValueError("seeds and grid_seeds must be at least 1")
        if self.combine not in em.COMBINE:
            raise ValueError(f"combine must be one of {', '.join(em.COMBINE)}, not {self.combine!r}")


def eraseeval_jobs(
    target: str, kind: str, objects: Sequence[str], styles: Sequence[str], seeds: Sequence[int],
    grid_seeds: Sequence[int],
) -> list[Job]:  # fmt: skip
    """The target prompts (``set`` target), the synonym prompts (related) and the other cells (retain)."""
    others = styles if kind == "object" else objects
    related = _synonyms(target)
    cells = [(o, s) for o in objects for s in styles if target not in (o, s)]
    if not related:
        raise ErasekitError(
            f"eraseeval's M2 needs related prompts (the target's synonyms); {target!r} has none"
        )
    if not cells or not others:
        raise ErasekitError("eraseeval needs other objects and styles in the grid (M1, M3 and M4 use them)")
    jobs = []
    for n, name in enumerate((target, *related)):
        group = "target" if n == 0 else "related"
        for other in others:
            o, s = (target, other) if kind == "object" else (other, target)
            text = TEMPLATE.format(**{"object": o, "style": s, kind: name})
            meta = {"set": group, "variant": name, "object": o, "style": s}
            jobs += [Job(f"{group}{n}_{slug(other)}_s{seed}", text, seed, None, meta) for seed in seeds]
    jobs += [Job(f"retain_{slug(o)}_{slug(s)}_s{seed}", TEMPLATE.format(object=o, style=s), seed, None,
                 {"set": "retain", "object": o, "style": s}) for o, s in cells for seed in grid_seeds]  # fmt: skip
    return jobs


def _synonyms(target: str) -> tuple[str, ...]:
    """The MiniCanvas synonyms of ``target``, or ``()`` for a concept outside the world."""
    from erasekit.minicanvas.world import concept_info

    try:
        return tuple(concept_info(target).synonyms)
    except ErasekitError:
        return ()


@register_protocol("eraseeval", EraseEvalProtocol, "EraseEval M1-M4 and its combined score, on MiniCanvas")
def run_eraseeval(
    model: LoadedModel, out: str | Path, config: EraseEvalProtocol, options: RunOptions
) -> dict[str, Any]:
    """Run EraseEval and write ``out/metrics.json`` (``EraseEval``, ``M1``..``M4``, ``details``)."""
    from erasekit.evaluation.runner import shard

    if shard()[1] > 1:
        raise ErasekitError(
            "the eraseeval protocol runs in one process (it generates the base images itself)"
        )
    classifier = options.classifier_for(model)
    objs, stys = _grid(classifier, None, None)
    target, kind = config.target, classifier.head_of(config.target)
    if target not in (objs if kind == "object" else stys):
        raise ErasekitError(f"target {target!r} is not in the evaluated grid")
    if config.reference is None and not _in_world(classifier):
        raise ErasekitError(
            "eraseeval needs --reference (real images for M4) with a classifier outside MiniCanvas"
        )
    jobs = eraseeval_jobs(target, kind, objs, stys, seed_list(config.seeds), seed_list(config.grid_seeds))
    sampling = options.sampling_for(model)
    run_id = {**identity("eraseeval", config, model, options, sampling), "objects": objs, "styles": stys,
              "target_type": kind, "classifier": classifier.source}  # fmt: skip
    base_id = {k: v for k, v in run_id.items() if k not in ("patches", "merge")}
    if options.base_images is not None and options.patches:  # checked now, before any image is made
        from erasekit.evaluation.record import model_fingerprint
        from erasekit.evaluation.run import check_reuse

        check_reuse(options.base_images, model_fingerprint(model.components), [], sampling)

    def score(entries: list[dict[str, Any]], patch: Any) -> dict[str, Any]:
        if patch is None:  # the base model itself: its images are the base images
            base_dir, base = Path(out), entries
        else:
            base_dir = Path(out) / BASE
            base = _base_entries(model, jobs, base_dir, base_id, sampling, options)
        erased_set, base_set = _read(out, entries, classifier), _read(base_dir, base, classifier)
        return _score(config, classifier, kind, erased_set, base_set)

    return run_protocol(
        protocol="eraseeval", model=model, jobs=jobs, sampling=sampling, score=score, out=out, config=run_id,
        patches=options.patches, merge=options.merge, batch_size=options.batch_size, overwrite=options.overwrite,
        speedups=options.speedups, reuse=options.reuse,
    )  # fmt: skip


def _base_entries(
    model: LoadedModel,
    jobs: list[Job],
    out: Path,
    base_id: dict[str, Any],
    sampling: Any,
    options: RunOptions,
) -> list[dict[str, Any]]:
    """The base model's images of ``jobs`` in ``out`` (called while scoring, when no patch is applied); those
    that ``options.base_images``, a finished run of the unpatched model (checked by the caller), already holds
    are linked from it."""
    from erasekit.evaluation import record as rec
    from erasekit.evaluation.runner import generate, reuse_images
    from erasekit.generation import FAST

    rec.prepare_run(out, {"base_of": base_id}, options.overwrite)
    if options.base_images is not None:
        reuse_images(out, jobs, sampling, options.base_images)
    return generate(model.require_pipeline(), jobs, out, sampling, batch_size=options.batch_size,
                    speedups=options.speedups or FAST)  # fmt: skip


def _read(out: str | Path, entries: list[dict[str, Any]], classifier: ImageClassifier) -> dict[str, Any]:
    """Per image set: the entries, their features ``[N, D]`` and both heads' predictions."""
    images = load_images(out, entries)
    objects, styles = classifier.classify(images)
    return {"entries": entries, "features": classifier.features(images), "objects": objects, "styles": styles}


def _score(
    config: EraseEvalProtocol,
    classifier: ImageClassifier,
    kind: str,
    erased: dict[str, Any],
    base: dict[str, Any],
) -> dict[str, Any]:
    target = config.target
    shows = {name: [p == target for p in (d["styles"] if kind == "style" else d["objects"])]
             for name, d in (("erased", erased), ("base", base))}  # fmt: skip
    m1 = _paired(erased, base, shows, "target", None)
    related = _related(base, shows["base"], config.verify_related)
    m2 = _paired(erased, base, shows, "related", related["kept"])
    m3, m3_detail = _adherence(erased, base)
    m4, m4_detail = _distribution(config, classifier, erased, base)
    parts = {"M1": m1["score"], "M2": m2["score"], "M3": m3, "M4": m4}
    details = {"M1": m1, "M2": {**m2, **related}, "M3": m3_detail, "M4": m4_detail}
    counts = {
        g: sum(e["meta"]["set"] == g for e in erased["entries"]) for g in ("target", "related", "retain")
    }
    return {"EraseEval": em.combined_score(list(parts.values()), config.combine), **parts,
            "combine": config.combine, "target": target, "target_type": kind, "details": details,
            "images": counts}  # fmt: skip


def _indices(
    d: dict[str, Any], group: str, variants: Sequence[str] | None
) -> dict[tuple[str, str], list[int]]:
    """``{(variant, prompt): image indices}`` of one set (``variants``: only those)."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(d["entries"]):
        meta = e["meta"]
        if meta["set"] == group and (variants is None or meta["variant"] in variants):
            out.setdefault((meta["variant"], e["prompt"]), []).append(i)
    return out


def _paired(
    erased: dict[str, Any], base: dict[str, Any], shows: dict[str, list[bool]], group: str,
    variants: Sequence[str] | None,
) -> dict[str, Any]:  # fmt: skip
    """M1 or M2: the mean over prompts of :func:`~erasekit.evaluation.eraseeval_metrics.paired_similarity`."""
    mine, theirs = _indices(erased, group, variants), _indices(base, group, variants)
    scores = [em.paired_similarity(base["features"][theirs[k]], erased["features"][idx],
                                   [shows["erased"][i] for i in idx]) for k, idx in mine.items()]  # fmt: skip
    seen = [i for idx in mine.values() for i in idx]
    return {"score": sum(scores) / len(scores), "prompts": len(scores),
            "concept_rate_erased": _pct([shows["erased"][i] for i in seen]),
            "concept_rate_base": _pct([shows["base"][i] for idx in theirs.values() for i in idx])}  # fmt: skip


def _related(base: dict[str, Any], shows: list[bool], verify: bool) -> dict[str, Any]:
    """Which synonyms M2 uses: those the base model shows as the target in over half its images (``verify``)."""
    rates: dict[str, list[bool]] = {}
    for i, e in enumerate(base["entries"]):
        if e["meta"]["set"] == "related":
            rates.setdefault(e["meta"]["variant"], []).append(shows[i])
    base_rate = {v: _pct(hits) for v, hits in rates.items()}
    passed = [v for v, r in base_rate.items() if r > 50.0]
    kept = passed if verify and passed else list(base_rate)
    return {"related_base_rate": base_rate, "kept": kept, "verified": verify and bool(passed)}


def _adherence(erased: dict[str, Any], base: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """M3: how well the other cells' images still show their prompt's object and style, erased over base."""

    def adherence(d: dict[str, Any]) -> float:
        rows = [(e["meta"], o, s) for e, o, s in zip(d["entries"], d["objects"], d["styles"])
                if e["meta"]["set"] == "retain"]  # fmt: skip
        return sum(((o == m["object"]) + (s == m["style"])) / 2 for m, o, s in rows) / len(rows)

    a_base, a_erased = adherence(base), adherence(erased)
    return em.ratio_score(a_base, a_erased), {"adherence_base": a_base, "adherence_erased": a_erased}


def _distribution(
    config: EraseEvalProtocol, classifier: ImageClassifier, erased: dict[str, Any], base: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """M4: CMMD of the other cells' images to real ones (the world's renders of the same cells by default)."""
    cells = [e["meta"] for e in base["entries"] if e["meta"]["set"] == "retain"]
    ref_images, source = _reference(config.reference, cells)
    ref = classifier.features(ref_images)

    def retain(d: dict[str, Any]) -> torch.Tensor:
        return d["features"][[i for i, e in enumerate(d["entries"]) if e["meta"]["set"] == "retain"]]

    c_base, c_erased = em.cmmd(retain(base), ref), em.cmmd(retain(erased), ref)
    detail = {"cmmd_base": c_base, "cmmd_erased": c_erased, "reference": source,
              "reference_images": len(ref_images), "features": classifier.source}  # fmt: skip
    return em.distance_score(c_base, c_erased), detail


def _reference(reference: str | None, cells: list[dict[str, Any]]) -> tuple[list[Any], str]:
    """The reference images and where they come from: a folder or run, or one world render per retain image."""
    if reference is not None:
        from erasekit.evaluation.fid import reference_images

        return reference_images(reference), reference
    import numpy as np
    from PIL import Image

    from erasekit.minicanvas.render import render

    rng = np.random.default_rng(RENDER_SEED)
    return [Image.fromarray(render(c["object"], c["style"], rng)) for c in cells], "minicanvas renders"


def _pct(flags: Sequence[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else float("nan")
