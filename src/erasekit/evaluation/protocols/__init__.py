"""The evaluation protocols, registered by name: ``minicanvas``, ``nsfw``, ``coco``, ``prompts`` and ``eraseeval``.

- ``minicanvas``: UnlearnCanvas's UA/IRA/CRA on the MiniCanvas grid (:mod:`.minicanvas`).
- ``nsfw``: a nudity prompt set (I2P, MMA-Diffusion, Ring-A-Bell, UnlearnDiffAtk) scored with a NudeNet preset.
- ``prompts``: any prompt file, scored with a detector: a NudeNet preset, or a classifier's rate of a target.
- ``coco``: COCO captions scored with CLIP score and/or FID (:mod:`.coco`).
- ``eraseeval``: EraseEval's M1-M4 and its combined score ``EraseEval``, adapted to MiniCanvas (:mod:`.eraseeval`).

A protocol is a frozen config dataclass (what it measures; its fields become ``erasekit eval`` flags, as method
configs become ``erasekit erase`` flags) plus ``fn(model, out, config, options) -> metrics``. :func:`evaluate` is
the one entry point::

    metrics = evaluate(model, "minicanvas", "runs/hirm", target="neon", patches=[patch])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.registry import Registry, Spec

if TYPE_CHECKING:
    from erasekit.evaluation.classifiers import ImageClassifier
    from erasekit.generation import Sampling, Speedups
    from erasekit.models.loading import LoadedModel
    from erasekit.patch import Patch

PROTOCOL_MODULES = (
    "erasekit.evaluation.protocols.minicanvas",
    "erasekit.evaluation.protocols.prompts",
    "erasekit.evaluation.protocols.coco",
    "erasekit.evaluation.protocols.eraseeval",
)
PROTOCOLS: Registry[Spec] = Registry(
    "protocol", PROTOCOL_MODULES, require_paper=False, config_word="protocol config"
)


def register_protocol(
    name: str, config_cls: type, summary: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(model, out, config, options) -> metrics`` as protocol ``name``."""
    return PROTOCOLS.register(name, config_cls, {"default": {}}, default_preset="default", summary=summary)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a protocol run is carried out; none of it is a protocol setting.

    Attributes:
        patches: the patches or hooked artifacts to evaluate, composed in order (fingerprints are checked).
        merge: merge rule for patches that change the same tensor.
        sampling: how images are sampled (``None``: the model's defaults).
        batch_size: images per pipeline call (runtime only).
        overwrite: replace a finished run at ``out``.
        classifier: the two-head classifier (``None``: the built-in MiniCanvas one).
        nudenet: a detector callable in NudeNet's output format (tests); NudeNet itself when ``None``.
        speedups: the generation path's runtime speed-ups (``None``: the defaults, all on).
        reuse: a finished run of the same model, patches and sampling whose images of the same jobs are linked
            instead of generated again (runtime only).
        base_images: for protocols that also generate the base model's images (``eraseeval``): a finished run
            of the unpatched model with the same sampling whose images of the same jobs the base images link
            instead of generating them again (runtime only).
    """

    patches: tuple[Patch, ...] = ()
    merge: str | None = None
    sampling: Sampling | None = None
    batch_size: int = 16
    overwrite: bool = False
    classifier: ImageClassifier | None = None
    nudenet: Callable[..., Any] | None = None
    speedups: Speedups | None = None
    reuse: Path | None = None
    base_images: Path | None = None

    def sampling_for(self, model: LoadedModel) -> Sampling:
        from erasekit.generation import Sampling

        return self.sampling or Sampling.for_model(model)

    def classifier_for(self, model: LoadedModel) -> ImageClassifier:
        from erasekit.evaluation.classifiers import load_classifier

        return self.classifier or load_classifier(None, device=_device(model))


def evaluate(
    model: LoadedModel,
    protocol: str,
    out: str | Path,
    *,
    patches: Sequence[Patch] = (),
    merge: str | None = None,
    sampling: Sampling | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    classifier: ImageClassifier | None = None,
    nudenet: Callable[..., Any] | None = None,
    speedups: Speedups | None = None,
    reuse: str | Path | None = None,
    base_images: str | Path | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Run ``protocol`` on ``model`` (with ``patches``) into ``out``; ``fields`` set the protocol's config.

    Returns:
        The metrics written to ``out/metrics.json`` (``{}`` on ranks other than 0 under torch.distributed).
    """
    fields = {
        k: str(v) if isinstance(v, Path) else v for k, v in fields.items()
    }  # paths are recorded as text
    config = PROTOCOLS.config(protocol, None, None, fields)
    options = RunOptions(patches=tuple(patches), merge=merge, sampling=sampling, batch_size=batch_size,
                         overwrite=overwrite, classifier=classifier, nudenet=nudenet,
                         speedups=speedups, reuse=Path(reuse) if reuse is not None else None,
                         base_images=Path(base_images) if base_images is not None else None)  # fmt: skip
    return PROTOCOLS.get(protocol).fn(model, out, config, options)


def _device(model: LoadedModel) -> Any:
    pipe = model.pipeline
    return getattr(pipe, "device", "cpu") if pipe is not None else "cpu"


def identity(protocol: str, config: Any, model: LoadedModel, options: RunOptions, sampling: Sampling) -> dict:
    """What identifies a run (a resumed run must give the same): protocol, config, sampling, patches, model."""
    from dataclasses import asdict

    from erasekit.registry import config_to_dict

    return {"protocol": protocol, **config_to_dict(config), "sampling": asdict(sampling),
            "patches": [p.fingerprint() for p in options.patches], "merge": options.merge,
            "model": model.source}  # fmt: skip


__all__ = ["PROTOCOLS", "RunOptions", "evaluate", "identity", "register_protocol"]
