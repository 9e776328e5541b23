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
from torch import nn

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
from erasekit.minicanvas.world import all_captions, caption_matches
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
    clip_tower_steps: int = field(
        default=1000,
        metadata={
            "help": "LiT: first train the image tower on the renders' object/style labels for this many steps, "
            "then lock it and train the text side against it (0: both towers jointly, as CLIP)"
        },
    )
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
        steps = {k: 3 for k in ("clip_tower_steps", "clip_steps", "vae_steps", "clf_steps", "unet_steps")}
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
    data: RenderSet,
    cfg: TrainConfig,
    tokenizer: Any,
    rng: np.random.Generator,
    log: Log,
    device: str = "cpu",
) -> dict[str, Any]:
    """Contrastive pretraining of the CLIP text encoder against a small image tower.

    Returns:
        ``{"text_encoder", "tower", "head"}``.
    """
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    text_encoder = build_text_encoder(cfg.sizes).to(device)
    tower = ImageTower(cfg.sizes.classifier_width, cfg.sizes.embed_dim).to(device)
    head = TextHead(cfg.sizes.text_hidden, cfg.sizes.embed_dim).to(device)
    features = None
    if cfg.clip_tower_steps:
        body = pretrain_tower(data, cfg, gen, log, device)
        tower.body.load_state_dict(body.state_dict())
        tower.body.requires_grad_(False).eval()
        features = _features(tower.body, data.images)  # locked: computed once, [N, 4 * width]
    params = [
        p for p in (*text_encoder.parameters(), *tower.parameters(), *head.parameters()) if p.requires_grad
    ]
    opt = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.clip_steps)
    # causal attention: the pooled eos output ignores the padding after it, so the longest caption suffices
    length = max(len(ids) for ids in tokenizer(all_captions()).input_ids)
    for _, report in _steps(cfg.clip_steps, "clip", log):
        idx = _batch(len(data), cfg.clip_batch, gen)
        captions, named = sample_captions(data.cells[idx], rng)
        ids = tokenize(tokenizer, captions, max_length=length).to(device)
        text = F.normalize(head(text_encoder(ids).pooler_output), dim=-1)
        if features is None:
            image = tower(data.images[idx].to(device))
        else:
            image = tower.head(features[idx].to(device))
        image = F.normalize(image, dim=-1)
        match = torch.from_numpy(caption_matches(named.numpy(), data.cells[idx].numpy())).to(device)
        loss = contrastive_loss(text, image, head.logit_scale, match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report(loss.item())
    parts = {"text_encoder": text_encoder, "tower": tower, "head": head}
    return {name: part.cpu().eval() for name, part in parts.items()}


def train_vae(data: RenderSet, cfg: TrainConfig, gen: torch.Generator, log: Log, device: str = "cpu") -> Any:
    """Train the ``AutoencoderKL`` for reconstruction (L1 + MSE + a small KL), then set its latent scale."""
    vae = build_vae(cfg.sizes).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.vae_steps)
    for _, report in _steps(cfg.vae_steps, "vae", log):
        x = data.images[_batch(len(data), cfg.vae_batch, gen)].to(device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(posterior.mean + posterior.std * eps).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report(loss.item())
    vae = round_to_fp16_(vae.cpu().eval())
    with torch.no_grad():
        z = vae.encode(data.images[:2048]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (on the VAE's device): two CPU ``[N, C, 8, 8]`` tensors (unscaled)."""
    means, stds = [], []
    for i in track(range(0, len(images), batch), desc="encode", total=math.ceil(len(images) / batch)):
        dist = vae.encode(images[i : i + batch].to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae: Any, mean: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Decode posterior means back to CPU images ``[N, 3, 32, 32]`` in [-1, 1] (on the VAE's device)."""
    chunks = [
        vae.decode(mean[i : i + batch].to(vae.device)).sample.clamp(-1, 1).cpu()
        for i in range(0, len(mean), batch)
    ]
    return torch.cat(chunks)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild noise and blur, so the classifier judges concepts rather than the last bit of sharpness.

    Random numbers come from the CPU generator ``gen`` whatever ``x``'s device, so every device draws the same.
    """
    amount = torch.rand(len(x), 1, 1, 1, generator=gen)
    noise = (torch.randn(x.shape, generator=gen) * amount * 0.08).to(x.device)
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    pick = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.3).float().to(x.device)
    return pick * blurred + (1 - pick) * x + noise


def train_classifier(
    data: RenderSet,
    recon: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    log: Log,
    device: str = "cpu",
) -> MiniCanvasClassifier:
    """Train the object + style classifier on ground-truth renders and their VAE reconstructions.

    Args:
        data: the renders and their labels.
        recon: ``[N, 3, 32, 32]`` VAE reconstructions of ``data.images`` (same labels).
    """
    model = MiniCanvasClassifier(width=cfg.sizes.classifier_width).to(device)
    return _fit(model, data, recon, cfg.clf_steps, cfg, gen, log, "classifier", device)


def pretrain_tower(
    data: RenderSet, cfg: TrainConfig, gen: torch.Generator, log: Log, device: str
) -> nn.Module:
    """LiT's locked image tower: a classifier body trained on the renders' labels (not the evaluation classifier).

    It is initialised from its own seed, drawn from ``gen``, without touching torch's global generator, so the
    other networks' initialisation does not depend on whether this stage runs.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MiniCanvasClassifier(width=cfg.sizes.classifier_width).to(device)
    return _fit(model, data, None, cfg.clip_tower_steps, cfg, gen, log, "image tower", device).body


@torch.no_grad()
def _features(body: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    device = next(body.parameters()).device
    return torch.cat([body(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


def _fit(
    model: MiniCanvasClassifier,
    data: RenderSet,
    recon: torch.Tensor | None,
    steps: int,
    cfg: TrainConfig,
    gen: torch.Generator,
    log: Log,
    desc: str,
    device: str,
) -> MiniCanvasClassifier:
    """Cross-entropy on both heads with :func:`_augment`; half of each batch from ``recon`` when given."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clf_lr, weight_decay=0.01)
    sched = _schedule(opt, steps)
    for _, report in _steps(steps, desc, log):
        idx = _batch(len(data), cfg.clf_batch, gen)
        if recon is None:
            x = _augment(data.images[idx].to(device), gen)
        else:
            use_recon = (torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5).float()
            x = _augment((use_recon * recon[idx] + (1 - use_recon) * data.images[idx]).to(device), gen)
        obj_logits, sty_logits = model(x)
        cells = data.cells[idx].to(device)
        loss = F.cross_entropy(obj_logits, cells[:, 0]) + F.cross_entropy(sty_logits, cells[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report(loss.item())
    return model.cpu().eval()
