"""Generate what an attack found and judge each image with the protocol's detector.

Detectors: the MiniCanvas classifier or a user classifier folder (an image succeeds when the style head, or the
object head for objects, predicts the concept), or a NudeNet preset for ``nsfw``. Images come from the one
generation path (:func:`erasekit.generation.render`); candidates with learned rows are rendered from the
``prompt_embeds`` the text encoder gives under :func:`~erasekit.attacks.base.placeholder_rows`, and edit
candidates (an init image and a strength) by the same path's image-to-image branch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from erasekit.attacks.base import Candidate, PromptSet, placeholder_id, placeholder_rows
from erasekit.errors import ErasekitError
from erasekit.generation import Request, Sampling, render, save_png, to_uint8
from erasekit.progress import track

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel
    from erasekit.patch import Patch

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
    from erasekit.evaluation.classifiers import load_classifier

    classifier = classifier or load_classifier()
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


def image_rows(candidates: Sequence[Candidate], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (candidate, seed): ``key``, ``file``, ``candidate``, ``prompt``, ``group``, ``phase``, ``seed``
    (and ``tag`` for a tagged candidate).

    A candidate with its own seeds (seed search) uses them instead of the run's ``seeds``.
    """
    rows = []
    for i, c in enumerate(candidates):
        for seed in c.seeds or seeds:
            key = f"c{i:04d}_s{seed}"
            row = {"key": key, "file": f"{IMAGES}/{key}.png", "candidate": i, "prompt": c.prompt,
                   "group": c.group, "phase": c.phase, "seed": int(seed)}  # fmt: skip
            if c.tag is not None:
                row["tag"] = c.tag
            rows.append(row)
    return rows


def generate_rows(
    model: LoadedModel,
    patch: Patch | None,
    candidates: Sequence[Candidate],
    rows: Sequence[dict[str, Any]],
    sampling: Sampling,
    out: Path,
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Render every row's image into ``out/images`` with ``patch`` applied (fingerprint-checked), then removed.

    ``patch=None`` generates with the model as it is; ``progress`` shows a progress bar (runtime only)."""
    pipe = model.require_pipeline()
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    with patch.applied(model) if patch is not None else contextlib.nullcontext(), torch.no_grad():
        shown = track(chunks, desc="generating", total=len(chunks), unit="batch") if progress else chunks
        for chunk in shown:
            requests = [_request(pipe, candidates[r["candidate"]], r["seed"]) for r in chunk]
            for r, img in zip(chunk, render(pipe, requests, sampling, batch_size=batch_size, desc=None)):
                save_png(to_uint8(img), out / r["file"])


def _request(pipe: Any, candidate: Candidate, seed: int) -> Request:
    """A plain prompt, or the conditioning the text encoder gives with the candidate's learned rows; an edit
    candidate's init image and strength, or the candidate's own initial latents, go with either."""
    extra = {"init": candidate.init, "strength": candidate.strength, "latents": candidate.latents}
    if candidate.embedding is None:
        return Request(seed=seed, prompt=candidate.prompt, **extra)
    from erasekit.denoising import encode_prompts

    with placeholder_rows(pipe.text_encoder, placeholder_id(pipe.tokenizer), candidate.embedding):
        embeds = encode_prompts(pipe, [candidate.prompt])[0]  # [77, D]
    return Request(seed=seed, prompt=candidate.prompt, embeds=embeds, **extra)


def candidate_judge(
    model: LoadedModel, detector: Detector, sampling: Sampling, seed: int, batch_size: int = 8
) -> Callable[[Sequence[Candidate]], list[bool]]:
    """An :attr:`~erasekit.attacks.base.AttackTarget.judge`: generate candidates with the run's first ``seed`` on
    the model as it is (no patch applied or removed), into a temporary folder, and return the detector's verdicts."""
    import tempfile

    def judge(candidates: Sequence[Candidate]) -> list[bool]:
        rows = image_rows(candidates, (seed,))
        with tempfile.TemporaryDirectory(prefix="erasekit-judge-") as tmp:
            generate_rows(model, None, candidates, rows, sampling, Path(tmp), batch_size, progress=False)
            return judge_rows(detector, rows, Path(tmp))

    return judge


def judge_rows(detector: Detector, rows: Sequence[dict[str, Any]], out: Path) -> list[bool]:
    """The detector's verdict on each row's image."""
    hits = detector.judge([out / r["file"] for r in rows])
    if len(hits) != len(rows):
        raise ErasekitError(f"the detector judged {len(hits)} of {len(rows)} images")
    return [bool(h) for h in hits]
