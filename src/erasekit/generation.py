"""The one generation path: every image erasekit makes goes through :func:`render`.

``erasekit generate``, every evaluation protocol (through the resumable runner,
:mod:`erasekit.evaluation.runner`), attack scoring, the attacks' latent helpers and the MiniCanvas quality check
call :func:`render`, which calls the pipeline's own ``__call__`` with

- one CPU ``torch.Generator`` per image, seeded with that image's seed (the same noise on every device);
- the safety checker switched off (SD's checker blacks out images it flags: the evaluation measures the model,
  not its output filter);
- the scheduler class named by :attr:`Sampling.scheduler`, built from the model's scheduler config;
- optional per-image text conditioning (``prompt_embeds``) for learned embedding rows;
- optional image-to-image editing (SDEdit): a request with an ``init`` image and a ``strength`` is rendered by the
  family's image-to-image pipeline built from the same components (``AutoPipelineForImage2Image.from_pipe``:
  the same modules, hooks and patches), which noises the image's latents to the timestep ``strength`` of the way
  up the schedule and denoises from there (``int(steps · strength)`` steps).
- optional per-image initial latents (``latents``), e.g. a DDIM-inverted image, instead of the seed's noise.

What an image depends on: its prompt (or conditioning), its seed and the :class:`Sampling`. Not on the batch it
lands in, up to float rounding: batched kernels may sum in another order, which moves a few 8-bit pixel values by
one level (measured: docs/benchmarks.md, "Batch-size invariance"). Tests assert that bound, never bitwise equality.

:class:`Speedups` are runtime settings of the same path (on by default): they skip work whose result is already
known and change no image beyond that rounding; they are never recorded (docs/benchmarks.md, "Evaluation speed").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from erasekit.errors import ErasekitError
from erasekit.progress import track

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

OUTPUTS = ("np", "latent")


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How images are sampled; saved in every run record. :meth:`for_model` fills in the model's defaults.

    Attributes:
        steps: denoising steps.
        guidance: classifier-free guidance scale (a request may carry its own, as I2P's prompts do).
        height: image height in pixels, or ``None`` for the pipeline's default.
        width: image width in pixels, or ``None`` for the pipeline's default.
        negative_prompt: the negative prompt, or ``None`` (the empty prompt).
        scheduler: a diffusers scheduler class name (built from the model's scheduler config), or ``None`` to keep
            the model's own.
    """

    steps: int = field(metadata={"help": "denoising steps"})
    guidance: float = field(metadata={"help": "classifier-free guidance scale"})
    height: int | None = field(default=None, metadata={"help": "image height (the pipeline's default)"})
    width: int | None = field(default=None, metadata={"help": "image width (the pipeline's default)"})
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt"})
    scheduler: str | None = field(default=None, metadata={"help": "diffusers scheduler class name"})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ErasekitError(f"steps must be at least 1, not {self.steps}")
        if self.guidance < 0:
            raise ErasekitError(f"guidance must be non-negative, not {self.guidance}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ErasekitError(f"{name} must be at least 8 pixels, not {value}")

    @classmethod
    def for_model(cls, model: LoadedModel, **overrides: Any) -> Sampling:
        """The model's default sampling (its folder config, else its family's), with non-``None`` overrides."""
        base = model.default_sampling()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True, kw_only=True)
class Speedups:
    """Runtime speed-ups of the generation path; none changes an image beyond float rounding, none is recorded.

    Attributes:
        shared_prompts: a batch whose prompts come in equal runs (the protocols' prompt x seeds grids) encodes each
            distinct prompt once, through the pipeline's own ``num_images_per_prompt``.
        text_kv_cache: the cross-attention keys and values of the text conditioning, which no denoising step
            changes, are computed once per pipeline call instead of once per step (UNet denoisers; the joint
            attention of SD3 and Flux transformers has no such projections and is left alone).
        overlap_writes: the evaluation runner writes and fsyncs a batch's PNGs and manifest lines in a background
            thread while the next batch renders (:func:`erasekit.evaluation.runner.generate`).
    """

    shared_prompts: bool = field(
        default=True, metadata={"help": "encode each distinct prompt once per batch"}
    )
    text_kv_cache: bool = field(
        default=True, metadata={"help": "cross-attention keys/values of the text once per call, not per step"}
    )
    overlap_writes: bool = field(
        default=True, metadata={"help": "write a batch's files while the next batch renders"}
    )


#: Every speed-up on: the default of every caller.
FAST = Speedups()
#: The pipeline call exactly as a user would make it (the reference in tests and benchmarks).
PLAIN = Speedups(shared_prompts=False, text_kv_cache=False, overlap_writes=False)


@dataclass(frozen=True)
class Request:
    """One image to render.

    Attributes:
        seed: the seed of this image's own generator.
        prompt: the prompt (ignored when ``embeds`` is given).
        embeds: ``[L, D]`` text conditioning used instead of encoding ``prompt`` (learned embedding rows).
        guidance: this image's guidance scale, or ``None`` for the sampling's.
        init: ``[H, W, 3]`` float image in [0, 1] to edit (SDEdit) instead of sampling from noise; its size is the
            output's (the sampling's height and width are not used).
        strength: how far up the schedule ``init`` is noised, in (0, 1]: ``int(steps · strength)`` of the
            sampling's steps are run (1: from the schedule's first timestep, nearly pure noise); required with
            ``init``.
        latents: ``[C, h, w]`` initial latents used instead of the seed's noise (the pipeline scales them by its
            scheduler's ``init_noise_sigma``, as it does its own draw); the seed still seeds any noise the
            scheduler adds on the way.
    """

    seed: int
    prompt: str = ""
    embeds: torch.Tensor | None = None
    guidance: float | None = None
    init: np.ndarray | None = None
    strength: float | None = None
    latents: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.init is None) != (self.strength is None):
            raise ErasekitError("an edit request needs both an init image and a strength")
        if self.strength is not None and not 0.0 < self.strength <= 1.0:
            raise ErasekitError(f"strength must be in (0, 1], not {self.strength}")
        if self.init is not None and (np.ndim(self.init) != 3 or np.shape(self.init)[-1] != 3):
            raise ErasekitError(f"an init image is [H, W, 3], not {list(np.shape(self.init))}")
        if self.init is not None and self.latents is not None:
            raise ErasekitError("a request starts from an init image or from its own latents, not both")
        if self.latents is not None and self.latents.ndim != 3:
            raise ErasekitError(f"a request's latents are [C, h, w], not {list(self.latents.shape)}")


def render(
    pipe: Any,
    requests: Sequence[Request],
    sampling: Sampling,
    *,
    batch_size: int = 8,
    output: str = "np",
    desc: str | None = "generating",
    speedups: Speedups = FAST,
) -> list[Any]:
    """Generate one image per request through the pipeline's own ``__call__`` (see the module docstring).

    Args:
        pipe: a diffusers text-to-image pipeline.
        requests: the images to make, in order.
        sampling: steps, guidance, size, negative prompt, scheduler.
        batch_size: images per pipeline call (a runtime setting; see the module docstring).
        output: ``"np"`` for float32 ``[H, W, 3]`` arrays in [0, 1]; ``"latent"`` for the denoised latents
            ``[C, h, w]`` before the VAE decodes them.
        desc: the progress bar's label; ``None`` draws no bar (the caller draws its own).
        speedups: runtime speed-ups (see :class:`Speedups`); :data:`PLAIN` for the plain pipeline call.

    Returns:
        One array (``np``) or tensor (``latent``) per request, in order.
    """
    if batch_size < 1:
        raise ErasekitError(f"batch size must be at least 1, not {batch_size}")
    if output not in OUTPUTS:
        raise ErasekitError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    for req in requests:
        if req.strength is not None and int(sampling.steps * req.strength) < 1:
            raise ErasekitError(f"strength {req.strength} of {sampling.steps} steps leaves no denoising step")
    batches = list(_batches(requests, batch_size))
    out: list[Any] = []
    kv_cache = text_kv_cache(pipe) if speedups.text_kv_cache else contextlib.nullcontext()
    with prepared(pipe, sampling.scheduler), kv_cache, torch.no_grad():
        editor = image_pipeline(pipe) if any(r.init is not None for r in requests) else None
        shown = batches if desc is None else track(batches, desc=desc, total=len(batches), unit="batch")
        for batch in shown:
            runner = pipe if batch[0].init is None else editor
            images = runner(**_call_kwargs(pipe, batch, sampling, output, speedups.shared_prompts)).images
            out += [img.float().cpu() for img in images] if output == "latent" else list(images)
    return out


def image_pipeline(pipe: Any) -> Any:
    """The family's image-to-image pipeline over ``pipe``'s own components (no copy: same modules and hooks)."""
    from diffusers import AutoPipelineForImage2Image

    try:
        editor = AutoPipelineForImage2Image.from_pipe(pipe)
    except ValueError as e:
        raise ErasekitError(f"{type(pipe).__name__} has no image-to-image pipeline: {e}") from None
    editor.set_progress_bar_config(disable=True)
    return editor


def _batches(requests: Sequence[Request], size: int) -> Iterator[list[Request]]:
    """Consecutive runs of at most ``size`` requests sharing a guidance scale, a kind (prompt or embeds, own latents
    or not), an edit strength (``None``: sampled from noise) and the shape of their init images or latents."""
    batch: list[Request] = []
    for req in requests:
        if batch and (
            len(batch) == size
            or req.guidance != batch[0].guidance
            or (req.embeds is None) != (batch[0].embeds is None)
            or req.strength != batch[0].strength
            or (req.latents is None) != (batch[0].latents is None)
            or (req.latents is not None and req.latents.shape != batch[0].latents.shape)
            or np.shape(req.init) != np.shape(batch[0].init)
        ):
            yield batch
            batch = []
        batch.append(req)
    if batch:
        yield batch


def _call_kwargs(
    pipe: Any, batch: list[Request], sampling: Sampling, output: str, shared_prompts: bool = False
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "generator": [torch.Generator("cpu").manual_seed(int(r.seed)) for r in batch],
        "num_inference_steps": sampling.steps,
        "guidance_scale": batch[0].guidance if batch[0].guidance is not None else sampling.guidance,
        "output_type": output,
    }
    if batch[0].init is not None:  # the image's size is the output's; image-to-image takes no height or width
        kwargs["image"] = np.stack([np.asarray(r.init, dtype=np.float32) for r in batch])  # [B, H, W, 3]
        kwargs["strength"] = batch[0].strength
    else:
        if sampling.height is not None:
            kwargs["height"] = sampling.height
        if sampling.width is not None:
            kwargs["width"] = sampling.width
    if batch[0].latents is not None:
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        kwargs["latents"] = torch.stack([r.latents for r in batch]).to(
            pipe.device, denoiser.dtype
        )  # [B, C, h, w]
    if batch[0].embeds is None:
        prompts = [r.prompt for r in batch]
        run = _run_length(prompts) if shared_prompts and batch[0].init is None else 1
        kwargs["prompt"] = prompts[::run]  # the pipeline repeats each one ``run`` times, in place
        if run > 1:
            kwargs["num_images_per_prompt"] = run
        if sampling.negative_prompt is not None:
            kwargs["negative_prompt"] = [sampling.negative_prompt] * len(kwargs["prompt"])
        return kwargs
    from erasekit.denoising import encode_prompts

    cond = torch.stack([r.embeds for r in batch]).to(pipe.device, pipe.text_encoder.dtype)  # [B, L, D]
    negative = encode_prompts(pipe, [sampling.negative_prompt or ""])  # [1, L, D]
    kwargs["prompt_embeds"] = cond
    kwargs["negative_prompt_embeds"] = negative.expand_as(cond)
    return kwargs


def _run_length(prompts: Sequence[str]) -> int:
    """``k`` when ``prompts`` is consecutive runs of ``k`` equal prompts (``[a, a, b, b]``: 2), else 1."""
    k = 1
    while k < len(prompts) and prompts[k] == prompts[0]:
        k += 1
    if len(prompts) % k or any(p != prompts[i - i % k] for i, p in enumerate(prompts)):
        return 1
    return k


class _MemoLinear(torch.nn.Module):
    """The same parameters as ``linear``; a call on the input tensor of the previous call, with the weights
    unchanged (their version counters), returns the previous output instead of computing it again."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # the very Parameters: qualified names and patches are unaffected
        self.bias = linear.bias
        self._last: tuple[torch.Tensor, tuple[int, ...], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(_version(t) for t in (x, self.weight, self.bias))
        if self._last is not None and self._last[0] is x and self._last[1] == key:
            return self._last[2]
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        self._last = (x, key, y)
        return y


def _version(t: torch.Tensor | None) -> int:
    """A tensor's in-place version counter (-1 for ``None`` and inference tensors, which keep none)."""
    return -1 if t is None or t.is_inference() else t._version


def _plain_linear(module: Any) -> bool:
    """An ``nn.Linear`` nothing else watches: no torch hooks, no accelerate hook (CPU offloading moves the
    weights in its wrapped ``forward``), no instance-level ``forward``."""
    return (
        type(module) is torch.nn.Linear
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not hasattr(module, "_hf_hook")
        and "forward" not in vars(module)
    )


@contextlib.contextmanager
def text_kv_cache(pipe: Any) -> Iterator[None]:
    """Inside the block, the UNet's cross-attention key and value projections compute their output once per
    text-conditioning tensor: the pipeline passes the same tensor at every denoising step.

    The projections are swapped, by name, for :class:`_MemoLinear` modules holding the same parameters, and put
    back after the block. Projections that are not plain ``nn.Linear`` or are hooked (LoRA layers, CPU
    offloading) are left alone; a pipeline without a UNet is left alone.
    """
    from diffusers.models.attention_processor import Attention

    unet = getattr(pipe, "unet", None)
    swapped: list[tuple[Any, str, torch.nn.Module]] = []
    try:
        for module in unet.modules() if unet is not None else ():
            if not isinstance(module, Attention) or not module.is_cross_attention:
                continue
            for name in ("to_k", "to_v"):
                linear = getattr(module, name, None)
                if _plain_linear(linear):
                    setattr(module, name, _MemoLinear(linear))
                    swapped.append((module, name, linear))
        yield
    finally:
        for module, name, linear in reversed(swapped):
            setattr(module, name, linear)


@contextlib.contextmanager
def prepared(pipe: Any, scheduler: str | None = None) -> Iterator[Any]:
    """The pipeline ready to sample: scheduler ``scheduler`` swapped in, safety checker and progress bar off.

    Everything is put back after the block.
    """
    checker = getattr(pipe, "safety_checker", None)
    saved = pipe.scheduler
    progress = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    try:
        if scheduler is not None:
            pipe.scheduler = scheduler_class(scheduler).from_config(saved.config)
        if checker is not None:
            pipe.safety_checker = None
        pipe.set_progress_bar_config(disable=True)
        yield pipe
    finally:
        pipe.scheduler = saved
        if checker is not None:
            pipe.safety_checker = checker
        pipe._progress_bar_config = progress


def scheduler_class(name: str) -> Any:
    """The diffusers scheduler class called ``name``, or a one-line error."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        raise ErasekitError(f"diffusers has no scheduler class {name!r}")
    return cls


def scheduler_info(pipe: Any, name: str | None) -> dict[str, Any]:
    """The class name and config of the scheduler a run samples with (for the run record)."""
    with prepared(pipe, name):
        sched = pipe.scheduler
        return {"class": type(sched).__name__, "config": dict(sched.config)}


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` floats in [0, 1] to uint8 (as diffusers' own PIL conversion rounds them)."""
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    """A uint8 ``[H, W, 3]`` image as PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: np.ndarray, path: Any) -> None:
    """Write a uint8 ``[H, W, 3]`` image as a PNG, atomically."""
    from erasekit.io import atomic_write_bytes

    atomic_write_bytes(path, png_bytes(img))
