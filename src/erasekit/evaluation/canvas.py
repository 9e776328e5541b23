"""The UnlearnCanvas protocol on MiniCanvas (or on the real benchmark with a user classifier).

Images: ``A {object} image in {style} style.`` for every cell of the grid and every seed (UnlearnCanvas's seeds
188, 288, 588, 688, 888, then 988, 1088, ...). With a target concept from the MiniCanvas world, generality images
are added: the same template with each synonym of the target, and the world's paraphrase templates with the
target's name, over every concept of the other kind. Each image is classified by the object and style heads,
and :mod:`erasekit.evaluation.unlearncanvas` turns the verdicts into accuracies, UA/IRA/CRA and the per-class
matrix. With a patch, text-space drift on target, synonym and retain prompts is added; with ``fid_reference``
(a run directory or a folder of images), FID in the classifier's feature space.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.evaluation.classifiers import ImageClassifier, builtin_classifier
from erasekit.evaluation.lifecycle import load_images, run_protocol
from erasekit.evaluation.runner import Job, Sampling
from erasekit.evaluation.unlearncanvas import target_rate, unlearncanvas_metrics

TEMPLATE = "A {object} image in {style} style."
UNLEARNCANVAS_SEEDS = (188, 288, 588, 688, 888)


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``N`` -> the first N of 188, 288, 588, 688, 888, 988, 1088, ...; a sequence is used as given."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ErasekitError(f"need at least one seed, not {seeds}")
        extra = [888 + 100 * k for k in range(1, max(0, seeds - 5) + 1)]
        return [*UNLEARNCANVAS_SEEDS, *extra][:seeds]
    return [int(s) for s in seeds]


def slug(text: str) -> str:
    """A file-name-safe form of a concept name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def grid_jobs(objects: Sequence[str], styles: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Every cell x seed, object-major, with ``meta = {"set": "grid", "object", "style"}``."""
    return [
        Job(f"grid_{slug(o)}_{slug(s)}_s{seed}", TEMPLATE.format(object=o, style=s), seed, None,
            {"set": "grid", "object": o, "style": s})
        for o in objects for s in styles for seed in seeds
    ]  # fmt: skip


def generality_jobs(target: str, kind: str, others: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """The target's synonyms in the template, and the world's paraphrases with its name (MiniCanvas only)."""
    from erasekit.minicanvas.world import FULL_TEMPLATES, concept_info

    variants = [("synonym", syn, TEMPLATE) for syn in concept_info(target).synonyms]
    variants += [("paraphrase", t, t) for t in FULL_TEMPLATES if t != TEMPLATE]
    jobs = []
    for n, (group, variant, template) in enumerate(variants):
        name = variant if group == "synonym" else target
        for other in others:
            o, s = (target, other) if kind == "object" else (other, target)
            text = template.format(
                object=name if kind == "object" else o, style=name if kind == "style" else s
            )
            meta = {"set": group, "variant": variant, "object": o, "style": s}
            jobs += [Job(f"{group}{n}_{slug(o)}_{slug(s)}_s{seed}", text, seed, None, meta) for seed in seeds]
    return jobs


def evaluate_minicanvas(
    model: Any,
    out: str | Path,
    *,
    target: str | None = None,
    patches: Sequence[Any] = (),
    merge: str | None = None,
    seeds: int | Sequence[int] = 2,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler: str | None = None,
    batch_size: int = 32,
    classifier: ImageClassifier | None = None,
    objects: Sequence[str] | None = None,
    styles: Sequence[str] | None = None,
    generality: bool = True,
    fid_reference: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the UnlearnCanvas protocol and write ``out/metrics.json``, ``out/record.json`` and the images.

    Args:
        model: a :class:`~erasekit.models.loading.LoadedModel` with a pipeline (unpatched).
        out: the run directory (an unfinished one is resumed).
        target: the erased concept, or ``None`` for accuracies only.
        patches: the patches to evaluate, composed in order.
        merge: merge rule for patches that change the same tensor.
        seeds: a count (UnlearnCanvas's seeds first) or the seeds themselves.
        steps: denoising steps (MiniCanvas default 25).
        guidance: guidance scale (MiniCanvas default 5.0).
        scheduler: a diffusers scheduler class name to sample with (default: the model's own).
        batch_size: images per pipeline call (runtime only).
        classifier: the two-head classifier; the built-in MiniCanvas one when ``None``.
        objects: restrict the grid to these objects (default: all of the classifier's).
        styles: restrict the grid to these styles (default: all of the classifier's, except "Photo").
        generality: add synonym and paraphrase images of the target (when the classifier's classes are
            MiniCanvas concepts).
        fid_reference: a run directory or image folder to compute FID against (classifier features).
        overwrite: replace a finished run at ``out``.

    Returns:
        The metrics: ``object_accuracy``, ``style_accuracy`` (percent), ``per_class``, ``matrix``; with a
        target also ``UA``, ``IRA``, ``CRA``, ``target_type`` and ``generality``; ``drift`` with patches.
    """
    from erasekit.minicanvas.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS

    classifier = classifier or builtin_classifier(device=_device(model))
    objs, stys = _grid(classifier, objects, styles)
    target_type = _target_type(target, objs, stys)
    seed_values = seed_list(seeds)
    jobs = grid_jobs(objs, stys, seed_values)
    with_generality = generality and target is not None and _in_world(classifier)
    if with_generality:
        jobs += generality_jobs(target, target_type, stys if target_type == "object" else objs, seed_values)
    sampling = Sampling(
        steps=steps or DEFAULT_STEPS,
        guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
        scheduler=scheduler,
    )
    config = {
        "protocol": "minicanvas", "target": target, "target_type": target_type, "objects": objs, "styles": stys,
        "seeds": seed_values, "generality": with_generality, "classifier": classifier.source,
        "patches": [p.fingerprint() for p in patches], "merge": merge, "model": model.source,
        "steps": sampling.steps, "guidance": sampling.guidance, "scheduler": scheduler,
    }  # fmt: skip

    def score(entries: list[dict[str, Any]], patch: Any) -> dict[str, Any]:
        metrics = _score(entries, out, classifier, objs, stys, target, target_type)
        if patch is not None:
            metrics["drift"] = _drift(model, patch, entries, target)
        if fid_reference is not None:
            metrics["fid"] = _fid(
                classifier, out, [e for e in entries if e["meta"]["set"] == "grid"], fid_reference
            )
        return metrics

    return run_protocol(
        protocol="minicanvas", model=model, jobs=jobs, sampling=sampling, score=score, out=out, config=config,
        patches=patches, merge=merge, batch_size=batch_size, overwrite=overwrite,
    )  # fmt: skip


def _in_world(classifier: ImageClassifier) -> bool:
    """Whether the classifier's classes are MiniCanvas concepts (so their synonyms and paraphrases are known)."""
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

    return set(classifier.object_names) <= set(OBJECT_NAMES) and set(classifier.style_names) <= set(
        STYLE_NAMES
    )


def _device(model: Any) -> Any:
    pipe = model.pipeline
    return getattr(pipe, "device", "cpu") if pipe is not None else "cpu"


def _grid(
    classifier: ImageClassifier, objects: Sequence[str] | None, styles: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    objs = list(objects or classifier.object_names)
    stys = list(styles or [s for s in classifier.style_names if s.lower() != "photo"])
    for kind, chosen, known in (
        ("object", objs, classifier.object_names),
        ("style", stys, classifier.style_names),
    ):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ErasekitError(
                f"the classifier has no {kind} class {unknown[0]!r}; it knows {', '.join(known)}"
            )
    return objs, stys


def _target_type(target: str | None, objects: Sequence[str], styles: Sequence[str]) -> str | None:
    if target is None:
        return None
    if target in styles:
        return "style"
    if target in objects:
        return "object"
    raise ErasekitError(f"target {target!r} is neither an object nor a style of the grid")


def _score(
    entries: list[dict[str, Any]],
    out: str | Path,
    classifier: ImageClassifier,
    objects: list[str],
    styles: list[str],
    target: str | None,
    target_type: str | None,
) -> dict[str, Any]:
    pred_objects, pred_styles = classifier.classify(load_images(out, entries))
    records = [
        {**e["meta"], "key": e["key"], "pred_object": po, "pred_style": ps}
        for e, po, ps in zip(entries, pred_objects, pred_styles)
    ]
    grid = [r for r in records if r["set"] == "grid"]
    metrics = unlearncanvas_metrics(grid, objects, styles, target, target_type)
    if target is not None and any(r["set"] != "grid" for r in records):
        metrics["generality"] = _generality(records, target, target_type)
    metrics["predictions"] = {r["key"]: [r["pred_object"], r["pred_style"]] for r in records}
    return metrics


def _generality(records: list[dict[str, Any]], target: str, kind: str) -> dict[str, Any]:
    """UA on each synonym and paraphrase: 100 - percent of its images classified as the target."""
    out: dict[str, Any] = {}
    for group in ("synonym", "paraphrase"):
        variants = dict.fromkeys(r["variant"] for r in records if r["set"] == group)
        uas = {
            v: 100.0 - target_rate([r for r in records if r.get("variant") == v], target, kind)
            for v in variants
        }
        out[f"{group}s"] = uas
        out[f"UA_{group}s"] = sum(uas.values()) / len(uas) if uas else None
    return out


def _drift(model: Any, patch: Any, entries: list[dict[str, Any]], target: str | None) -> dict[str, Any]:
    from erasekit.evaluation.drift import text_drift

    groups: dict[str, list[str]] = {"target": [], "synonym": [], "retain": []}
    for e in entries:
        meta = e["meta"]
        hit = target is not None and target in (meta["object"], meta["style"])
        group = "synonym" if meta["set"] != "grid" else ("target" if hit else "retain")
        groups[group].append(e["prompt"])
    return text_drift(model, patch, {g: list(dict.fromkeys(p)) for g, p in groups.items()})


def _fid(
    classifier: ImageClassifier, out: str | Path, entries: list[dict[str, Any]], reference: str | Path
) -> dict:
    from erasekit.evaluation.fid import fid_from_features, reference_images

    ref = reference_images(reference)
    value = fid_from_features(classifier.features(load_images(out, entries)), classifier.features(ref))
    return {"value": value, "features": classifier.source, "reference": str(reference), "images": len(entries),
            "reference_images": len(ref)}  # fmt: skip
