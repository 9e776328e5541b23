"""The ``coco`` protocol: COCO captions scored with CLIP score (a local CLIP folder) and/or FID."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.evaluation.prompts import load_prompts
from erasekit.evaluation.protocols import RunOptions, identity, register_protocol
from erasekit.evaluation.protocols.minicanvas import seed_list
from erasekit.evaluation.protocols.prompts import PromptFile, prompt_jobs
from erasekit.evaluation.run import load_images, run_protocol

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

FID_FEATURES = ("clip", "classifier", "inception")


@dataclass(frozen=True, kw_only=True)
class COCOProtocol(PromptFile):
    """What the ``coco`` protocol measures."""

    clip: str | None = field(
        default=None, metadata={"help": "local CLIP model folder (CLIP score, CLIP-feature FID)"}
    )
    fid_reference: str | None = field(
        default=None, metadata={"help": "a run directory or image folder to compute FID against"}
    )
    fid_features: str = field(default="clip", metadata={"help": f"FID features: {', '.join(FID_FEATURES)}"})
    fid_weights: str | None = field(
        default=None, metadata={"help": "FID Inception weights (.safetensors) for fid_features=inception"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip is None and self.fid_reference is None:
            raise ValueError("the coco protocol needs a CLIP folder (--clip DIR) and/or an FID reference")
        if self.fid_features not in FID_FEATURES:
            raise ValueError(
                f"fid_features must be one of {', '.join(FID_FEATURES)}, not {self.fid_features!r}"
            )
        if self.fid_reference is not None and self.fid_features == "clip" and self.clip is None:
            raise ValueError("FID with CLIP features needs a CLIP folder (--clip DIR)")
        if self.fid_reference is not None and self.fid_features == "inception" and self.fid_weights is None:
            raise ValueError("FID with Inception features needs --fid-weights FILE.safetensors")


@register_protocol("coco", COCOProtocol, "CLIP score and FID on COCO captions")
def run_coco(
    model: LoadedModel, out: str | Path, config: COCOProtocol, options: RunOptions
) -> dict[str, Any]:
    """COCO captions: CLIP score with ``config.clip`` and/or FID against ``config.fid_reference`` (a folder of
    real images, or a run directory of the base model's generations), in CLIP, classifier or Inception features."""
    records = load_prompts(config.prompts, config.format or "coco", config.limit)
    jobs = prompt_jobs(records, seed_list(config.seeds))
    sampling = options.sampling_for(model)

    def score(entries: list[dict[str, Any]], patch: Any) -> dict[str, Any]:
        from erasekit.evaluation.clipscore import ClipScorer
        from erasekit.evaluation.fid import fid_from_features, reference_images

        images = load_images(out, entries)
        scorer = ClipScorer.load(config.clip) if config.clip is not None else None
        metrics: dict[str, Any] = {"images": len(images)}
        if scorer is not None:
            metrics["clip"] = {**scorer.score(images, [e["prompt"] for e in entries]), "model": scorer.source}
            metrics["clip_score"] = metrics["clip"]["clip_score"]
        if config.fid_reference is not None:
            extractor = _fid_extractor(config, scorer, options, model)
            ref = reference_images(config.fid_reference)
            value = fid_from_features(extractor.features(images), extractor.features(ref))
            kind = "run" if (Path(config.fid_reference) / "manifest.jsonl").is_file() else "images"
            metrics["fid"] = {"value": value, "features": config.fid_features, "reference": config.fid_reference,
                              "reference_kind": kind, "reference_images": len(ref)}  # fmt: skip
        return metrics

    return run_protocol(
        protocol="coco", model=model, jobs=jobs, sampling=sampling, score=score, out=out,
        config=identity("coco", config, model, options, sampling), patches=options.patches, merge=options.merge,
        batch_size=options.batch_size, overwrite=options.overwrite,
        speedups=options.speedups, reuse=options.reuse,
    )  # fmt: skip


def _fid_extractor(config: COCOProtocol, scorer: Any, options: RunOptions, model: LoadedModel) -> Any:
    """The object whose ``features(images) -> [N, D]`` FID uses."""
    if config.fid_features == "clip":
        return scorer
    if config.fid_features == "classifier":
        return options.classifier_for(model)
    from erasekit.evaluation.inception import InceptionFeatures

    return InceptionFeatures(config.fid_weights)
