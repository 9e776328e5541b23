"""The UnlearnCanvas protocol on MiniCanvas (or on the real benchmark with a user classifier).

Images: ``A {object} image in {style} style.`` for every cell of the grid and every seed (UnlearnCanvas's seeds
188, 288, 588, 688, 888, then 988, 1088, ...). With a target concept from the MiniCanvas world, generality images
are added: the same template with each synonym of the target, and the world's paraphrase templates with the
target's name, over every concept of the other kind. Each image is classified by the object and style heads,
and :mod:`erasekit.evaluation.unlearncanvas_metrics` turns the verdicts into accuracies, UA/IRA/CRA and the per-class
matrix. With a patch, text-space drift on target, synonym and retain prompts is added; with ``fid_reference``
(a run directory or a folder of images), FID in the classifier's feature space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.concepts import slug
from erasekit.errors import ErasekitError
from erasekit.evaluation.classifiers import ImageClassifier
from erasekit.evaluation.protocols import RunOptions, identity, register_protocol
from erasekit.evaluation.run import load_images, run_protocol
from erasekit.evaluation.runner import Job
from erasekit.evaluation.unlearncanvas_metrics import target_rate, unlearncanvas_metrics
from erasekit.minicanvas.world import TEMPLATE

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

UNLEARNCANVAS_SEEDS = (188, 288, 588, 688, 888)


@dataclass(frozen=True, kw_only=True)
class MiniCanvasProtocol:
    """What the ``minicanvas`` protocol measures."""

    target: str | None = field(
        default=None, metadata={"help": "the erased concept: adds UA, IRA, CRA, generality and drift"}
    )
    seeds: int = field(
        default=2, metadata={"help": "seeds per prompt (UnlearnCanvas's 188, 288, 588, ... first)"}
    )
    objects: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "comma-separated objects: evaluate a sub-grid (default: the classifier's)"},
    )
    styles: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "comma-separated styles: evaluate a sub-grid (default: the classifier's)"},
    )
    generality: bool = field(
        default=True, metadata={"help": "add the target's synonym and paraphrase images (MiniCanvas classes)"}
    )
    fid_reference: str | None = field(
        default=None, metadata={"help": "a run directory or image folder to compute FID against"}
    )

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, not {self.seeds}")


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``N`` -> the first N of 188, 288, 588, 688, 888, 988, 1088, ...; a sequence is used as given."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ErasekitError(f"need at least one seed, not {seeds}")
        extra = [888 + 100 * k for k in range(1, max(0, seeds - 5) + 1)]
        return [*UNLEARNCANVAS_SEEDS, *extra][:seeds]
    return [int(s) for s in seeds]


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


@register_protocol(
    "minicanvas", MiniCanvasProtocol, "UnlearnCanvas UA/IRA/CRA + per-class matrix on MiniCanvas"
)
def run_minicanvas(
    model: LoadedModel, out: str | Path, config: MiniCanvasProtocol, options: RunOptions
) -> dict[str, Any]:
    """Run the UnlearnCanvas protocol and write ``out/metrics.json``, ``out/record.json`` and the images.

    Returns:
        The metrics: ``object_accuracy``, ``style_accuracy`` (percent), ``per_class``, ``matrix``; with a
        target also ``UA``, ``IRA``, ``CRA``, ``target_type`` and ``generality``; ``drift`` with patches;
        ``fid`` with a reference.
    """
    classifier = options.classifier_for(model)
    objs, stys = _grid(classifier, config.objects, config.styles)
    target = config.target
    target_type = classifier.head_of(target) if target is not None else None
    if target is not None and target not in (objs if target_type == "object" else stys):
        raise ErasekitError(f"target {target!r} is not in the evaluated grid")
    seed_values = seed_list(config.seeds)
    jobs = grid_jobs(objs, stys, seed_values)
    with_generality = config.generality and target is not None and _in_world(classifier)
    if with_generality:
        jobs += generality_jobs(target, target_type, stys if target_type == "object" else objs, seed_values)
    sampling = options.sampling_for(model)
    run_id = {**identity("minicanvas", config, model, options, sampling), "objects": objs, "styles": stys,
              "target_type": target_type, "generality": with_generality, "classifier": classifier.source}  # fmt: skip

    def score(entries: list[dict[str, Any]], patch: Any) -> dict[str, Any]:
        metrics = _score(entries, out, classifier, objs, stys, target, target_type)
        if patch is not None:
            metrics["drift"] = _drift(model, patch, entries, target)
        if config.fid_reference is not None:
            grid = [e for e in entries if e["meta"]["set"] == "grid"]
            metrics["fid"] = _fid(classifier, out, grid, config.fid_reference)
        return metrics

    return run_protocol(
        protocol="minicanvas", model=model, jobs=jobs, sampling=sampling, score=score, out=out, config=run_id,
        patches=options.patches, merge=options.merge, batch_size=options.batch_size, overwrite=options.overwrite,
        speedups=options.speedups, reuse=options.reuse,
    )  # fmt: skip


def _in_world(classifier: ImageClassifier) -> bool:
    """Whether the classifier's classes are MiniCanvas concepts (so their synonyms and paraphrases are known)."""
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

    return set(classifier.object_names) <= set(OBJECT_NAMES) and set(classifier.style_names) <= set(
        STYLE_NAMES
    )


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
        {**e["meta"], "key": e["key"], "seed": e["seed"], "pred_object": po, "pred_style": ps}
        for e, po, ps in zip(entries, pred_objects, pred_styles)
    ]
    grid = [r for r in records if r["set"] == "grid"]
    metrics = unlearncanvas_metrics(grid, objects, styles, target, target_type)
    if target is not None and any(r["set"] != "grid" for r in records):
        metrics["generality"] = _generality(records, target, target_type)
    metrics["per_seed"] = _per_seed(records, objects, styles, target, target_type)
    metrics["predictions"] = {r["key"]: [r["pred_object"], r["pred_style"]] for r in records}
    return metrics


def _per_seed(
    records: list[dict[str, Any]],
    objects: list[str],
    styles: list[str],
    target: str | None,
    target_type: str | None,
) -> dict[str, dict[str, Any]]:
    """The headline numbers on each seed's images alone (what the leaderboard's intervals resample)."""
    out = {}
    for seed in sorted({r["seed"] for r in records}):
        mine = [r for r in records if r["seed"] == seed]
        grid = [r for r in mine if r["set"] == "grid"]
        m = unlearncanvas_metrics(grid, objects, styles, target, target_type)
        row = {k: m.get(k) for k in ("UA", "IRA", "CRA", "object_accuracy", "style_accuracy")}
        if target is not None and any(r["set"] != "grid" for r in mine):
            gen = _generality(mine, target, target_type)
            row.update(UA_synonyms=gen["UA_synonyms"], UA_paraphrases=gen["UA_paraphrases"])
        out[str(seed)] = row
    return out


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


def _drift(
    model: LoadedModel, patch: Any, entries: list[dict[str, Any]], target: str | None
) -> dict[str, Any]:
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
