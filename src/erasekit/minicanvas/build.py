"""``train_minicanvas``: every stage in order, written as a pipeline folder plus the classifier.

Output layout (what ``src/erasekit/minicanvas/weights/`` ships)::

    OUT/pipeline/             StableDiffusionPipeline.save_pretrained (fp16 safetensors)
    OUT/classifier.safetensors, OUT/classifier.json
    OUT/training.json         config, stage times, measured quality
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_json
from erasekit.minicanvas.train import Log, TrainConfig
from erasekit.models.families import FOLDER_CONFIG

PIPELINE_DIR = "pipeline"
TRAINING_FILE = "training.json"


def _seeds(seed: int) -> dict[str, Any]:
    """Independent generators for each stage, all derived from ``seed``."""
    names = ("render_train", "render_heldout", "clip", "vae", "classifier", "plan", "unet")
    children = np.random.SeedSequence(seed).spawn(len(names))
    out: dict[str, Any] = {}
    for name, child in zip(names, children):
        rng = np.random.default_rng(child)
        out[name] = (
            rng
            if name.startswith("render") or name in ("clip", "plan")
            else torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        )
    return out


def assemble(text_encoder: Any, tokenizer: Any, vae: Any, unet: Any) -> Any:
    """A ``StableDiffusionPipeline`` from the trained parts, with SD1.x's DDIM sampler and no safety checker."""
    from diffusers import StableDiffusionPipeline

    from erasekit.minicanvas.models import sample_scheduler

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _timed(times: dict[str, float], name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = round(time.perf_counter() - start, 1)
    return out


def train_minicanvas(
    out: str | Path, cfg: TrainConfig, log: Log = lambda _: None, eval_seeds: int = 2, device: str = "cpu"
) -> dict[str, Any]:
    """Train every MiniCanvas part from scratch and write them into ``out``.

    Args:
        out: an existing, empty folder (the CLI stages it with :func:`erasekit.io.output_dir`).
        cfg: the training configuration.
        log: receives one line per progress report.
        eval_seeds: seeds per cell for the final base-generation check (0 skips it).
        device: where the networks train (``"cpu"``, ``"cuda"``). Random numbers are drawn on the CPU either way,
            but floating-point results differ across devices, so the shipped weights name theirs.

    Returns:
        the ``training.json`` record: config, per-stage seconds, and measured quality.
    """
    from erasekit.minicanvas.data import render_set
    from erasekit.minicanvas.diffusion import encode_captions, plan_captions, train_unet
    from erasekit.minicanvas.models import round_to_fp16_
    from erasekit.minicanvas.quality import evaluate_grid, heldout_accuracy, retrieval_accuracy
    from erasekit.minicanvas.train import encode_latents, reconstruct, train_classifier, train_clip, train_vae
    from erasekit.models.tokenizer import clip_tokenizer

    torch.manual_seed(cfg.seed)  # network initialisation
    rngs, times, quality = _seeds(cfg.seed), {}, {}
    tokenizer = clip_tokenizer()
    data = _timed(times, "render", render_set, cfg.per_cell, rngs["render_train"])
    heldout = render_set(cfg.heldout_per_cell, rngs["render_heldout"], desc="render held-out")
    log(f"rendered {len(data)} training and {len(heldout)} held-out images")

    clip = _timed(times, "clip", train_clip, data, cfg, tokenizer, rngs["clip"], log, device)
    text_encoder = round_to_fp16_(clip["text_encoder"]).requires_grad_(False)
    quality["clip_retrieval_top1"] = retrieval_accuracy(clip, tokenizer, heldout)
    log(f"tiny CLIP caption->image retrieval top-1: {quality['clip_retrieval_top1']:.1f}%")

    vae = _timed(times, "vae", train_vae, data, cfg, rngs["vae"], log, device).requires_grad_(False)
    vae.to(device)
    latents = _timed(times, "encode", encode_latents, vae, data.images)
    recon = reconstruct(vae, latents[0])
    vae.cpu()
    quality["vae_l1"] = float((recon - data.images).abs().mean())

    classifier = _timed(
        times, "classifier", train_classifier, data, recon, cfg, rngs["classifier"], log, device
    )
    quality["classifier_heldout"] = heldout_accuracy(classifier, heldout)
    log(f"classifier held-out accuracy: {quality['classifier_heldout']}")

    plan, captions = plan_captions(data.cells, cfg, rngs["plan"])
    states = _timed(times, "text_states", encode_captions, text_encoder.to(device), tokenizer, captions)
    text_encoder.cpu()
    scaling = vae.config.scaling_factor
    unet = _timed(times, "unet", train_unet, latents, scaling, states, plan, cfg, rngs["unet"], log, device)

    pipe = assemble(text_encoder, tokenizer, vae, round_to_fp16_(unet))
    if eval_seeds:
        pipe.to(device)
        result = _timed(times, "eval", evaluate_grid, pipe, classifier.to(device), seeds=eval_seeds)
        pipe.to("cpu")
        classifier.cpu()
        quality["base_grid"] = {
            "seeds": eval_seeds,
            "object": result.object_accuracy,
            "style": result.style_accuracy,
        }
        log(f"base generations: object {result.object_accuracy:.1f}%, style {result.style_accuracy:.1f}%")
    _save(Path(out), pipe, classifier)
    record = {
        "config": cfg.to_dict(),
        "device": _describe(device),
        "seconds": times,
        "quality": quality,
        "train_images": len(data),
    }
    atomic_write_json(Path(out) / TRAINING_FILE, record)
    return record


def _describe(device: str) -> str:
    """``"cpu (N threads)"`` or the accelerator's name: where the weights were trained."""
    if torch.device(device).type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _replay_init(cfg: TrainConfig) -> None:
    """Leave torch's global generator as :func:`train_minicanvas` leaves it just before building the classifier."""
    from erasekit.minicanvas.models import ImageTower, TextHead, build_text_encoder, build_vae

    torch.manual_seed(cfg.seed)
    build_text_encoder(cfg.sizes)
    ImageTower(cfg.sizes.classifier_width, cfg.sizes.embed_dim)
    TextHead(cfg.sizes.text_hidden, cfg.sizes.embed_dim)
    build_vae(cfg.sizes)


def rebuild_classifier(folder: str | Path, cfg: TrainConfig, log: Log = lambda _: None) -> dict[str, float]:
    """Re-run only the classifier stage against a trained folder's VAE, and replace its classifier.

    With the config and seed of the full run, the result is the classifier :func:`train_minicanvas` makes
    (the stage's data, VAE reconstructions, initialisation and generator are all replayed).

    Returns:
        held-out accuracy ``{"object", "style"}`` in percent (also written into ``training.json``).
    """
    import json

    from diffusers import AutoencoderKL

    from erasekit.minicanvas.data import render_set
    from erasekit.minicanvas.quality import heldout_accuracy
    from erasekit.minicanvas.train import encode_latents, reconstruct, train_classifier
    from erasekit.models.loading import diffusers_dtype

    folder = Path(folder)
    if not (folder / PIPELINE_DIR / "vae").is_dir():
        raise ErasekitError(f"{folder} holds no trained MiniCanvas ({PIPELINE_DIR}/vae is missing)")
    rngs = _seeds(cfg.seed)
    data = render_set(cfg.per_cell, rngs["render_train"])
    heldout = render_set(cfg.heldout_per_cell, rngs["render_heldout"], desc="render held-out")
    vae = AutoencoderKL.from_pretrained(
        folder / PIPELINE_DIR / "vae", **diffusers_dtype(torch.float32)
    ).eval()
    recon = reconstruct(vae, encode_latents(vae, data.images)[0])
    _replay_init(cfg)
    start = time.perf_counter()
    classifier = train_classifier(data, recon, cfg, rngs["classifier"], log)
    seconds = round(time.perf_counter() - start, 1)
    accuracy = heldout_accuracy(classifier, heldout)
    classifier.save(folder)
    record_file = folder / TRAINING_FILE
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        record["config"] = cfg.to_dict()
        record["quality"]["classifier_heldout"] = accuracy
        record["seconds"]["classifier"] = seconds
        record["quality"].pop("base_grid", None)  # measured with the replaced classifier
        atomic_write_json(record_file, record)
    return accuracy


def _save(out: Path, pipe: Any, classifier: Any) -> None:
    """Write the pipeline as fp16 safetensors and the classifier as fp32 safetensors."""
    pipe.to(torch.float16)
    try:
        pipe.save_pretrained(out / PIPELINE_DIR, safe_serialization=True)
    finally:
        pipe.to(torch.float32)
    # The folder's own config names the family, so a retrained MiniCanvas samples at the world's protocol.
    atomic_write_json(out / PIPELINE_DIR / FOLDER_CONFIG, {"family": "minicanvas"})
    classifier.save(out)
