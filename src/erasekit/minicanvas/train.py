"""Train MiniCanvas from scratch: data, tiny CLIP, VAE, classifier, UNet; then write the pipeline folder.

Every stage is seeded from one integer, so a run is deterministic given ``TrainConfig.seed`` on one machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.minicanvas.classifier import MiniCanvasClassifier
from erasekit.minicanvas.data import RenderSet, sample_captions, tokenize
from erasekit.minicanvas.models import (
    ImageTower,
    Sizes,
    TextHead,
    build_text_encoder,
    build_vae,
    round_to_fp16_,
)
from erasekit.minicanvas.world import caption_matches
from erasekit.progress import track

Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in ``training.json`` and the model card)."""

    seed: int = field(default=0, metadata={"help": "seeds every random number generator"})
    per_cell: int = field(default=200, metadata={"help": "training renders per (object, style) cell"})
    heldout_per_cell: int = field(default=10, metadata={"help": "held-out renders per cell for evaluation"})
    clip_steps: int = field(default=500, metadata={"help": "contrastive pretraining steps"})
    clip_batch: int = field(default=256, metadata={"help": "contrastive batch size"})
    clip_lr: float = field(default=1e-3, metadata={"help": "contrastive peak learning rate"})
    vae_steps: int = field(default=1000, metadata={"help": "VAE steps"})
    vae_batch: int = field(default=48, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE peak learning rate"})
    kl_weight: float = field(default=1e-6, metadata={"help": "VAE KL weight (SD uses about 1e-6)"})
    clf_steps: int = field(default=2000, metadata={"help": "classifier steps"})
    clf_batch: int = field(default=128, metadata={"help": "classifier batch size"})
    clf_lr: float = field(default=3e-3, metadata={"help": "classifier peak learning rate"})
    unet_steps: int = field(default=3000, metadata={"help": "UNet steps"})
    unet_batch: int = field(default=128, metadata={"help": "UNet batch size"})
    unet_lr: float = field(default=1e-3, metadata={"help": "UNet peak learning rate"})
    ema_decay: float = field(default=0.999, metadata={"help": "UNet weight EMA decay"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of the empty caption (CFG)"})
    sizes: Sizes = field(default_factory=Sizes, metadata={"help": "network sizes"})

    @classmethod
    def quick(cls, seed: int = 0) -> TrainConfig:
        """A seconds-long run through every stage with tiny networks (for tests)."""
        tiny = Sizes(
            text_hidden=32,
            text_layers=2,
            text_heads=2,
            embed_dim=32,
            vae_channels=(16, 16, 16),
            unet_channels=(32, 32),
            unet_heads=2,
            classifier_width=8,
        )
        steps = {k: 3 for k in ("clip_steps", "vae_steps", "clf_steps", "unet_steps")}
        batches = {k: 16 for k in ("clip_batch", "vae_batch", "clf_batch", "unet_batch")}
        return cls(seed=seed, per_cell=1, heldout_per_cell=1, sizes=tiny, **steps, **batches)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sizes"] = self.sizes.to_dict()
        return out


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over 5% of the steps, then cosine decay to zero."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _steps(n: int, desc: str, log: Log, every: int = 100) -> Iterator[tuple[int, Callable[[float], None]]]:
    """Yield ``(step, report)``; ``report(loss)`` logs the running mean loss every ``every`` steps."""
    losses: list[float] = []
    start = time.perf_counter()
    for step in track(range(n), desc=desc, total=n):
        yield step, losses.append
        if (step + 1) % every == 0 or step + 1 == n:
            rate = (step + 1) / (time.perf_counter() - start)
            log(f"{desc} step {step + 1}/{n} loss {np.mean(losses[-every:]):.4f} ({rate:.2f} it/s)")


def _batch(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (size,), generator=gen)


def contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, scale: torch.Tensor, match: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss with several positives per row (captions may name one concept only).

    Args:
        text: ``[B, E]`` unit text embeddings.
        image: ``[B, E]`` unit image embeddings.
        scale: scalar log temperature.
        match: bool ``[B, B]``, caption i is true of image j.
    """
    logits = scale.exp().clamp(max=100) * text @ image.T  # [B, B]
    target = match.float()
    t2i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    i2t = -(target.T / target.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (t2i + i2t) / 2


def train_clip(
    data: RenderSet, cfg: TrainConfig, tokenizer: Any, rng: np.random.Generator, log: Log
) -> dict[str, Any]:
    """Contrastive pretraining of the CLIP text encoder against a small image tower.

    Returns:
        ``{"text_encoder", "tower", "head"}``.
    """
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    text_encoder = build_text_encoder(cfg.sizes)
    tower = ImageTower(cfg.sizes.classifier_width, cfg.sizes.embed_dim)
    head = TextHead(cfg.sizes.text_hidden, cfg.sizes.embed_dim)
    params = [*text_encoder.parameters(), *tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.clip_steps)
    for _, report in _steps(cfg.clip_steps, "clip", log):
        idx = _batch(len(data), cfg.clip_batch, gen)
        captions, named = sample_captions(data.cells[idx], rng)
        # causal attention: the pooled eos output ignores padding after it, so 32 tokens suffice
        ids = tokenize(tokenizer, captions, max_length=32)
        text = F.normalize(head(text_encoder(ids).pooler_output), dim=-1)
        image = F.normalize(tower(data.images[idx]), dim=-1)
        match = torch.from_numpy(caption_matches(named.numpy(), data.cells[idx].numpy()))
        loss = contrastive_loss(text, image, head.logit_scale, match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report(loss.item())
    return {"text_encoder": text_encoder.eval(), "tower": tower.eval(), "head": head.eval()}


def train_vae(data: RenderSet, cfg: TrainConfig, gen: torch.Generator, log: Log) -> Any:
    """Train the ``AutoencoderKL`` for reconstruction (L1 + MSE + a small KL), then set its latent scale."""
    vae = build_vae(cfg.sizes)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.vae_steps)
    for _, report in _steps(cfg.vae_steps, "vae", log):
        x = data.images[_batch(len(data), cfg.vae_batch, gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report(loss.item())
    vae = round_to_fp16_(vae.eval())
    with torch.no_grad():
        z = vae.encode(data.images[:2048]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: two ``[N, C, 8, 8]`` tensors (unscaled)."""
    means, stds = [], []
    for i in track(range(0, len(images), batch), desc="encode", total=math.ceil(len(images) / batch)):
        dist = vae.encode(images[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae: Any, mean: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Decode posterior means back to images ``[N, 3, 32, 32]`` in [-1, 1]."""
    chunks = [vae.decode(mean[i : i + batch]).sample.clamp(-1, 1) for i in range(0, len(mean), batch)]
    return torch.cat(chunks)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild noise and blur, so the classifier judges concepts rather than the last bit of sharpness."""
    noise = torch.randn(x.shape, generator=gen) * torch.rand(len(x), 1, 1, 1, generator=gen) * 0.08
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    pick = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.3).float()
    return pick * blurred + (1 - pick) * x + noise


def train_classifier(
    data: RenderSet, recon: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, log: Log
) -> MiniCanvasClassifier:
    """Train the object + style classifier on ground-truth renders and their VAE reconstructions.

    Args:
        data: the renders and their labels.
        recon: ``[N, 3, 32, 32]`` VAE reconstructions of ``data.images`` (same labels).
    """
    model = MiniCanvasClassifier(width=cfg.sizes.classifier_width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clf_lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.clf_steps)
    for _, report in _steps(cfg.clf_steps, "classifier", log):
        idx = _batch(len(data), cfg.clf_batch, gen)
        use_recon = (torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5).float()
        x = _augment(use_recon * recon[idx] + (1 - use_recon) * data.images[idx], gen)
        obj_logits, sty_logits = model(x)
        obj_loss = F.cross_entropy(obj_logits, data.cells[idx, 0])
        loss = obj_loss + F.cross_entropy(sty_logits, data.cells[idx, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report(loss.item())
    return model.eval()
