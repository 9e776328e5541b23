"""Generate what an attack found and judge each image with the protocol's detector.

Detectors: the MiniCanvas classifier or a user classifier folder (an image succeeds when the style head, or the
object head for objects, predicts the concept), or a NudeNet preset for ``nsfw``. Generation goes through the
pipeline's own ``__call__`` with one seeded CPU generator per image; candidates with learned rows are passed as
``prompt_embeds`` computed under :func:`~erasekit.attacks.base.placeholder_rows`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasekit.attacks.base import Candidate, PromptSet, SamplingPlan, placeholder_id, placeholder_rows
from erasekit.errors import ErasekitError
from erasekit.progress import track

IMAGES = "images"


@dataclass(frozen=True)
class Detector:
    """``judge(image files) -> [succeeded]`` plus what it is (recorded in metrics)."""

    judge: Callable[[Sequence[Path]], list[bool]]
    info: dict[str, Any]


def build_detector(
    prompts: PromptSet, *, classifier: Any | None = None, nudenet_preset: str = "hirm", nudenet: Any = None
) -> Detector:
    """The detector of ``prompts.concept_type``.

    Args:
        classifier: an :class:`~erasekit.evaluation.classifiers.ImageClassifier` (built-in MiniCanvas when
            ``None``), for styles and objects.
        nudenet_preset: the NudeNet preset for ``nsfw``.
        nudenet: a detector callable in NudeNet's output format (tests); NudeNet itself when ``None``.
    """
    if prompts.concept_type == "nsfw":
        from erasekit.evaluation.nsfw import get_preset, nudenet_version, nudity_rate

        preset = get_preset(nudenet_preset)
        info = {"detector": "nudenet", "preset": preset.name, "classes": list(preset.classes),
                "threshold": preset.threshold, "nudenet_version": nudenet_version()}  # fmt: skip
        return Detector(lambda files: list(nudity_rate(list(files), preset, nudenet)["verdicts"]), info)
    return _classifier_detector(prompts, classifier)


def _classifier_detector(prompts: PromptSet, classifier: Any | None) -> Detector:
    from erasekit.evaluation.classifiers import builtin_classifier

    classifier = classifier or builtin_classifier()
    kind, concept = prompts.concept_type, prompts.concept
    names = classifier.style_names if kind == "style" else classifier.object_names
    if concept not in names:
        raise ErasekitError(
            f"the classifier's {kind} head has no class {concept!r}; it knows {', '.join(names)}"
        )

    def judge(files: Sequence[Path]) -> list[bool]:
        objects, styles = classifier.classify(_read_images(files))
        return [p == concept for p in (styles if kind == "style" else objects)]

    return Detector(judge, {"detector": "classifier", "head": kind, "target": concept,
                            "classifier": classifier.source})  # fmt: skip


def _read_images(files: Sequence[Path]) -> list[Any]:
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(im.convert("RGB"))
    return out


# ---- generation ------------------------------------------------------------------------------------------


def image_rows(candidates: Sequence[Candidate], plan: SamplingPlan) -> list[dict[str, Any]]:
    """One row per (candidate, seed): ``key``, ``file``, ``candidate``, ``prompt``, ``group``, ``phase``, ``seed``."""
    rows = []
    for i, c in enumerate(candidates):
        for seed in c.seeds or plan.seeds:
            key = f"c{i:04d}_s{seed}"
            rows.append({"key": key, "file": f"{IMAGES}/{key}.png", "candidate": i, "prompt": c.prompt,
                         "group": c.group, "phase": c.phase, "seed": int(seed)})  # fmt: skip
    return rows


def generate_rows(
    model: Any,
    patch: Any | None,
    candidates: Sequence[Candidate],
    rows: Sequence[dict[str, Any]],
    plan: SamplingPlan,
    out: Path,
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Generate every row's image into ``out/images`` with ``patch`` applied (fingerprint-checked), then removed.

    ``patch=None`` generates with the model as it is; ``progress`` shows a progress bar (runtime only)."""
    from erasekit.generation import save_png, to_uint8

    pipe = model.require_pipeline()
    pipe.set_progress_bar_config(disable=True)
    use_embeds = any(c.embedding is not None for c in candidates)
    starts = range(0, len(rows), batch_size)
    with patch.applied(model) if patch is not None else contextlib.nullcontext(), torch.no_grad():
        for start in track(starts, desc="generating", total=len(starts)) if progress else starts:
            batch = rows[start : start + batch_size]
            cond = _conditioning(pipe, [candidates[r["candidate"]] for r in batch], use_embeds)
            images = pipe(
                **cond,
                generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in batch],
                num_inference_steps=plan.steps,
                guidance_scale=plan.guidance,
                output_type="np",
            ).images
            for r, img in zip(batch, images):
                save_png(to_uint8(img), out / r["file"])


def _conditioning(pipe: Any, cands: Sequence[Candidate], use_embeds: bool) -> dict[str, Any]:
    """``prompt=`` for plain prompts; ``prompt_embeds``/``negative_prompt_embeds`` when rows are learned."""
    if not use_embeds:
        return {"prompt": [c.prompt for c in cands]}
    from erasekit.sampling import encode_prompts

    token = placeholder_id(pipe.tokenizer)
    embeds = []
    for c in cands:
        learned = c.embedding
        hook = placeholder_rows(pipe.text_encoder, token, learned) if learned is not None else None
        with hook or contextlib.nullcontext():
            embeds.append(encode_prompts(pipe, [c.prompt]))  # [1, 77, D]
    prompt_embeds = torch.cat(embeds)
    negative = encode_prompts(pipe, [""]).expand_as(prompt_embeds)
    return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative}


def candidate_judge(
    model: Any, detector: Detector, plan: SamplingPlan, batch_size: int = 8
) -> Callable[[Sequence[Candidate]], list[bool]]:
    """An :attr:`~erasekit.attacks.base.AttackTarget.judge`: generate candidates with the plan's first seed on
    the model as it is (no patch applied or removed), into a temporary folder, and return the detector's verdicts."""
    import dataclasses
    import tempfile

    first = dataclasses.replace(plan, seeds=plan.seeds[:1])

    def judge(candidates: Sequence[Candidate]) -> list[bool]:
        rows = image_rows(candidates, first)
        with tempfile.TemporaryDirectory(prefix="erasekit-judge-") as tmp:
            generate_rows(model, None, candidates, rows, first, Path(tmp), batch_size, progress=False)
            return judge_rows(detector, rows, Path(tmp))

    return judge


def judge_rows(detector: Detector, rows: Sequence[dict[str, Any]], out: Path) -> list[bool]:
    """The detector's verdict on each row's image."""
    hits = detector.judge([out / r["file"] for r in rows])
    if len(hits) != len(rows):
        raise ErasekitError(f"the detector judged {len(hits)} of {len(rows)} images")
    return [bool(h) for h in hits]
