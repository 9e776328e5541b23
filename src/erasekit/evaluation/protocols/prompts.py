"""Prompt-file protocols: ``prompts`` (any file, any detector) and ``nsfw`` (a nudity set, NudeNet).

Seeds of prompt sets: a prompt with its own seed (I2P's ``evaluation_seed``) gets one image with that seed (and its
own guidance when the set has one); a prompt without gets one image per run seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.errors import ErasekitError
from erasekit.evaluation.prompts import FORMATS, PromptRecord, load_prompts
from erasekit.evaluation.protocols import RunOptions, identity, register_protocol
from erasekit.evaluation.protocols.minicanvas import seed_list
from erasekit.evaluation.run import load_images, run_protocol
from erasekit.evaluation.runner import Job

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

DETECTORS = ("nudenet", "classifier")


@dataclass(frozen=True, kw_only=True)
class PromptFile:
    """Fields every prompt-file protocol has."""

    prompts: str = field(default="", metadata={"help": "prompt file (CSV or text)"})
    format: str | None = field(
        default=None, metadata={"help": f"prompt file format: {', '.join(FORMATS)} (default: the protocol's)"}
    )
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    seeds: int = field(default=1, metadata={"help": "seeds per prompt without its own seed"})

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("this protocol needs --prompts FILE")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.seeds < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("seeds and limit must be at least 1")


@dataclass(frozen=True, kw_only=True)
class PromptsProtocol(PromptFile):
    """What the ``prompts`` protocol measures: a detector's rate over any prompt file."""

    detector: str = field(
        default="nudenet", metadata={"help": f"what scores the images: {', '.join(DETECTORS)}"}
    )
    nudenet_preset: str = field(
        default="hirm", metadata={"help": "NudeNet preset: hirm, unlearndiffatk or rece"}
    )
    target: str | None = field(
        default=None, metadata={"help": "the erased concept (minicanvas: UA/IRA/CRA; prompts: its rate)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, not {self.detector!r}")
        if self.detector == "classifier" and self.target is None:
            raise ValueError("the classifier detector needs a target (the concept whose rate is measured)")


@dataclass(frozen=True, kw_only=True)
class NSFWProtocol(PromptFile):
    """What the ``nsfw`` protocol measures: the NudeNet nudity rate of a nudity prompt set."""

    nudenet_preset: str = field(
        default="hirm", metadata={"help": "NudeNet preset: hirm, unlearndiffatk or rece"}
    )


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


@register_protocol("prompts", PromptsProtocol, "any prompt file scored with a detector")
def run_prompts(
    model: LoadedModel, out: str | Path, config: PromptsProtocol, options: RunOptions, name: str = "prompts"
) -> dict[str, Any]:
    """Generate a prompt file and score it with a detector: the nudity rate under a NudeNet preset, or the rate
    of images whose object or style the classifier reads as ``target``."""
    records = load_prompts(config.prompts, config.format or "txt", config.limit)
    jobs = prompt_jobs(records, seed_list(config.seeds))
    sampling = options.sampling_for(model)
    classifier = options.classifier_for(model) if config.detector == "classifier" else None
    run_id = identity(name, config, model, options, sampling)
    if classifier is not None:
        run_id["classifier"] = classifier.source

    def score(entries: list[dict[str, Any]], patch: Any) -> dict[str, Any]:
        if config.detector == "nudenet":
            from erasekit.evaluation.nsfw import nudity_rate

            result = nudity_rate(
                [Path(out) / e["file"] for e in entries], config.nudenet_preset, options.nudenet
            )
            result["verdicts"] = {e["key"]: v for e, v in zip(entries, result["verdicts"])}
            return {"nsfw": result, "attack_success_rate": result["rate"], "prompts": len(records)}
        return {
            "classifier": _classifier_rate(out, entries, config.target, classifier),
            "prompts": len(records),
        }

    return run_protocol(
        protocol=name, model=model, jobs=jobs, sampling=sampling, score=score, out=out, config=run_id,
        patches=options.patches, merge=options.merge, batch_size=options.batch_size, overwrite=options.overwrite,
        speedups=options.speedups, reuse=options.reuse,
    )  # fmt: skip


@register_protocol("nsfw", NSFWProtocol, "nudity attack success rate on a prompt set, NudeNet preset")
def run_nsfw(
    model: LoadedModel, out: str | Path, config: NSFWProtocol, options: RunOptions
) -> dict[str, Any]:
    """A nudity prompt set (I2P by default) scored with a NudeNet preset: the attack success rate in percent."""
    as_prompts = PromptsProtocol(prompts=config.prompts, format=config.format or "i2p", limit=config.limit,
                                 seeds=config.seeds, detector="nudenet", nudenet_preset=config.nudenet_preset)  # fmt: skip
    return run_prompts(model, out, as_prompts, options, name="nsfw")


def _classifier_rate(out: str | Path, entries: list[dict[str, Any]], target: str, classifier: Any) -> dict:
    kind = classifier.head_of(target)
    objects, styles = classifier.classify(load_images(out, entries))
    preds = styles if kind == "style" else objects
    hits = [p == target for p in preds]
    if not hits:
        raise ErasekitError("no images to score")
    return {"target": target, "target_type": kind, "rate": 100.0 * sum(hits) / len(hits), "images": len(hits),
            "classifier": classifier.source, "predictions": dict(zip((e["key"] for e in entries), preds))}  # fmt: skip
