"""The protocol registry for ``erasekit eval --protocol``: ``minicanvas``, ``nsfw``, ``coco`` and ``prompts``.

- ``minicanvas``: UnlearnCanvas's UA/IRA/CRA on the MiniCanvas grid (:mod:`erasekit.evaluation.canvas`).
- ``nsfw``: a nudity prompt set (I2P, MMA-Diffusion, Ring-A-Bell, UnlearnDiffAtk) scored with a NudeNet preset.
- ``coco``: COCO captions scored with CLIP score and/or FID.
- ``prompts``: any prompt file, scored with a detector: a NudeNet preset, or a classifier's rate of a target.

Seeds of prompt sets: a prompt with its own seed (I2P's ``evaluation_seed``) gets one image with that seed (and
its own guidance when the set has one); a prompt without gets one image per run seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.evaluation.canvas import evaluate_minicanvas, seed_list
from erasekit.evaluation.lifecycle import load_images, run_protocol
from erasekit.evaluation.prompts import PromptRecord, load_prompts
from erasekit.evaluation.runner import Job, Sampling

DETECTORS = ("nudenet", "classifier")
FID_FEATURES = ("clip", "classifier", "inception")


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: its entry point and a one-line summary."""

    name: str
    run: Callable[..., dict[str, Any]]
    summary: str


def prompt_jobs(records: Sequence[PromptRecord], seeds: Sequence[int]) -> list[Job]:
    """One job per prompt and seed (the prompt's own seed and guidance when it has them)."""
    jobs = []
    for i, r in enumerate(records):
        meta = {
            "set": "prompts",
            "index": i,
            **{k: v for k, v in r.meta.items() if k in ("categories", "case_number")},
        }
        for seed in [r.seed] if r.seed is not None else seeds:
            jobs.append(Job(f"p{i:05d}_s{seed}", r.prompt, int(seed), r.guidance, meta))
    return jobs


def evaluate_prompts(
    model: Any,
    out: str | Path,
    *,
    prompts: str | Path,
    fmt: str = "txt",
    detector: str = "nudenet",
    preset: str = "hirm",
    target: str | None = None,
    classifier: Any | None = None,
    nudenet: Any | None = None,
    patches: Sequence[Any] = (),
    merge: str | None = None,
    seeds: int | Sequence[int] = 1,
    steps: int = 50,
    guidance: float = 7.5,
    scheduler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    protocol: str = "prompts",
) -> dict[str, Any]:
    """Generate a prompt file and score it with a detector.

    Args:
        model: a loaded model with a pipeline (unpatched).
        out: the run directory.
        prompts: the prompt file; ``fmt`` one of :data:`erasekit.evaluation.prompts.FORMATS`.
        detector: ``"nudenet"`` (rate of nude images under ``preset``) or ``"classifier"`` (rate of images
            whose object or style is classified as ``target``).
        classifier: the :class:`~erasekit.evaluation.classifiers.ImageClassifier` (built-in MiniCanvas when None).
        nudenet: a detector callable in NudeNet's output format (tests); NudeNet itself when ``None``.
        seeds: run seeds for prompts without their own.
        limit: use only the first ``limit`` prompts.
    """
    if detector not in DETECTORS:
        raise ErasekitError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    if detector == "classifier" and target is None:
        raise ErasekitError("the classifier detector needs --target (the concept whose rate is measured)")
    records = load_prompts(prompts, fmt, limit)
    seed_values = seed_list(seeds)
    jobs = prompt_jobs(records, seed_values)
    sampling = Sampling(steps=steps, guidance=guidance, height=height, width=width, scheduler=scheduler)
    config = {
        "protocol": protocol, "prompts": str(prompts), "format": fmt, "limit": limit, "detector": detector,
        "preset": preset if detector == "nudenet" else None, "target": target, "seeds": seed_values,
        "patches": [p.fingerprint() for p in patches], "merge": merge, "model": model.source,
        "steps": steps, "guidance": guidance, "height": height, "width": width, "scheduler": scheduler,
    }  # fmt: skip

    def score(entries: list[dict[str, Any]], patch: Any) -> dict[str, Any]:
        if detector == "nudenet":
            from erasekit.evaluation.nsfw import nudity_rate

            result = nudity_rate([Path(out) / e["file"] for e in entries], preset, nudenet)
            result["verdicts"] = {e["key"]: v for e, v in zip(entries, result["verdicts"])}
            return {"nsfw": result, "attack_success_rate": result["rate"], "prompts": len(records)}
        return {
            "classifier": _classifier_rate(model, out, entries, target, classifier),
            "prompts": len(records),
        }

    return run_protocol(
        protocol=protocol, model=model, jobs=jobs, sampling=sampling, score=score, out=out, config=config,
        patches=patches, merge=merge, batch_size=batch_size, overwrite=overwrite,
    )  # fmt: skip


def _classifier_rate(
    model: Any, out: str | Path, entries: list[dict[str, Any]], target: str, classifier: Any
) -> dict:
    from erasekit.evaluation.classifiers import builtin_classifier

    classifier = classifier or builtin_classifier()
    if target in classifier.style_names:
        kind = "style"
    elif target in classifier.object_names:
        kind = "object"
    else:
        raise ErasekitError(f"the classifier has no class {target!r}")
    objects, styles = classifier.classify(load_images(out, entries))
    preds = styles if kind == "style" else objects
    hits = [p == target for p in preds]
    return {"target": target, "target_type": kind, "rate": 100.0 * sum(hits) / len(hits), "images": len(hits),
            "classifier": classifier.source, "predictions": dict(zip((e["key"] for e in entries), preds))}  # fmt: skip


def evaluate_nsfw(
    model: Any, out: str | Path, *, prompts: str | Path, fmt: str = "i2p", **kwargs: Any
) -> dict:
    """A nudity prompt set scored with a NudeNet preset (``preset=``): the attack success rate in percent."""
    return evaluate_prompts(
        model, out, prompts=prompts, fmt=fmt, detector="nudenet", protocol="nsfw", **kwargs
    )


def evaluate_coco(
    model: Any,
    out: str | Path,
    *,
    prompts: str | Path,
    fmt: str = "coco",
    clip: str | Path | None = None,
    fid_reference: str | Path | None = None,
    fid_features: str = "clip",
    fid_weights: str | Path | None = None,
    classifier: Any | None = None,
    patches: Sequence[Any] = (),
    merge: str | None = None,
    seeds: int | Sequence[int] = 1,
    steps: int = 50,
    guidance: float = 7.5,
    scheduler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
) -> dict[str, Any]:
    """COCO captions: CLIP score (with a local CLIP folder ``clip``) and/or FID against ``fid_reference``.

    Args:
        fid_reference: a folder of real images, or a run directory of the base model's generations.
        fid_features: ``"clip"`` (CLIP image embeddings; needs ``clip``), ``"classifier"`` (MiniCanvas) or
            ``"inception"`` (FID's Inception-v3; needs ``fid_weights``, see :mod:`erasekit.evaluation.inception`).
        fid_weights: the Inception weights as safetensors.
    """
    if clip is None and fid_reference is None:
        raise ErasekitError("the coco protocol needs --clip MODEL_DIR and/or --fid-reference DIR")
    if fid_reference is not None and fid_features not in FID_FEATURES:
        raise ErasekitError(f"unknown FID features {fid_features!r}; choose one of {', '.join(FID_FEATURES)}")
    if fid_reference is not None and fid_features == "clip" and clip is None:
        raise ErasekitError("FID with CLIP features needs --clip MODEL_DIR")
    if fid_reference is not None and fid_features == "inception" and fid_weights is None:
        raise ErasekitError("FID with Inception features needs --fid-weights FILE.safetensors")
    records = load_prompts(prompts, fmt, limit)
    seed_values = seed_list(seeds)
    jobs = prompt_jobs(records, seed_values)
    sampling = Sampling(steps=steps, guidance=guidance, height=height, width=width, scheduler=scheduler)
    config = {
        "protocol": "coco", "prompts": str(prompts), "format": fmt, "limit": limit, "clip": str(clip) if clip else None,
        "fid_reference": str(fid_reference) if fid_reference else None, "fid_features": fid_features,
        "fid_weights": str(fid_weights) if fid_weights else None, "seeds": seed_values,
        "patches": [p.fingerprint() for p in patches], "merge": merge, "model": model.source,
        "steps": steps, "guidance": guidance, "height": height, "width": width, "scheduler": scheduler,
    }  # fmt: skip

    def score(entries: list[dict[str, Any]], patch: Any) -> dict[str, Any]:
        from erasekit.evaluation.clipscore import ClipScorer
        from erasekit.evaluation.fid import fid_from_features, reference_images

        images = load_images(out, entries)
        scorer = ClipScorer.load(clip) if clip is not None else None
        metrics: dict[str, Any] = {"images": len(images)}
        if scorer is not None:
            metrics["clip"] = {**scorer.score(images, [e["prompt"] for e in entries]), "model": scorer.source}
            metrics["clip_score"] = metrics["clip"]["clip_score"]
        if fid_reference is not None:
            extractor = _fid_extractor(fid_features, scorer, fid_weights, classifier)
            ref = reference_images(fid_reference)
            value = fid_from_features(extractor.features(images), extractor.features(ref))
            kind = "run" if (Path(fid_reference) / "manifest.jsonl").is_file() else "images"
            metrics["fid"] = {"value": value, "features": fid_features, "reference": str(fid_reference),
                              "reference_kind": kind, "reference_images": len(ref)}  # fmt: skip
        return metrics

    return run_protocol(
        protocol="coco", model=model, jobs=jobs, sampling=sampling, score=score, out=out, config=config,
        patches=patches, merge=merge, batch_size=batch_size, overwrite=overwrite,
    )  # fmt: skip


def _fid_extractor(kind: str, scorer: Any, weights: str | Path | None, classifier: Any | None) -> Any:
    """The object whose ``features(images) -> [N, D]`` FID uses."""
    from erasekit.evaluation.classifiers import builtin_classifier
    from erasekit.evaluation.inception import InceptionFeatures

    builders = {
        "clip": lambda: scorer,
        "classifier": lambda: classifier or builtin_classifier(),
        "inception": lambda: InceptionFeatures(weights),
    }
    return builders[kind]()


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "minicanvas", evaluate_minicanvas, "UnlearnCanvas UA/IRA/CRA + per-class matrix on MiniCanvas"
        ),
        Protocol("nsfw", evaluate_nsfw, "nudity attack success rate on a prompt set, NudeNet preset"),
        Protocol("coco", evaluate_coco, "CLIP score and FID on COCO captions"),
        Protocol("prompts", evaluate_prompts, "any prompt file scored with a detector"),
    )
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ErasekitError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}") from None
