"""UNet training on cached VAE latents and cached frozen-text-encoder states (eps-prediction, caption dropout)."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.minicanvas.data import sample_captions, tokenize
from erasekit.minicanvas.models import build_unet, train_scheduler
from erasekit.minicanvas.train import Log, TrainConfig, _batch, _schedule, _steps
from erasekit.progress import track


@torch.no_grad()
def encode_captions(text_encoder: Any, tokenizer: Any, captions: list[str], batch: int = 256) -> torch.Tensor:
    """The frozen encoder's last hidden states, exactly as the pipeline computes them (on the encoder's device).

    Returns:
        CPU float ``[len(captions), 77, hidden]``.
    """
    out = []
    for i in track(
        range(0, len(captions), batch), desc="text states", total=math.ceil(len(captions) / batch)
    ):
        ids = tokenize(tokenizer, captions[i : i + batch]).to(text_encoder.device)
        out.append(text_encoder(ids).last_hidden_state.cpu())
    return torch.cat(out)


def plan_captions(
    cells: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, list[str]]:
    """Draw every UNet step's image indices and captions up front, so each distinct caption is encoded once.

    Args:
        cells: int ``[N, 2]`` cells of the training latents.

    Returns:
        ``(plan, captions)``: ``plan`` is int ``[steps, batch, 2]`` of (image index, caption index).
    """
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    index: dict[str, int] = {"": 0}
    plan = torch.empty(cfg.unet_steps, cfg.unet_batch, 2, dtype=torch.int64)
    for step in range(cfg.unet_steps):
        idx = _batch(len(cells), cfg.unet_batch, gen)
        captions, _ = sample_captions(cells[idx], rng, dropout=cfg.caption_dropout)
        plan[step, :, 0] = idx
        plan[step, :, 1] = torch.tensor([index.setdefault(c, len(index)) for c in captions])
    return plan, list(index)


class EMA:
    """An exponential moving average of a module's floating parameters."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm start, as diffusers' EMAModel does
        for avg, p in zip(self.shadow.parameters(), module.parameters()):
            avg.lerp_(p, 1.0 - decay)


def train_unet(
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling: float,
    states: torch.Tensor,
    plan: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    log: Log,
    device: str = "cpu",
) -> Any:
    """Train the ``UNet2DConditionModel`` with eps-prediction; returns the EMA weights.

    Args:
        latents: posterior ``(mean, std)``, each ``[N, C, 8, 8]``, unscaled.
        scaling: the VAE's ``scaling_factor``.
        states: ``[n_captions, 77, hidden]`` frozen text states; row 0 is the empty caption.
        plan: int ``[steps, batch, 2]`` from :func:`plan_captions`.
        device: where to train; random numbers are drawn on the CPU from ``gen`` for every device.
    """
    mean, std = latents
    unet = build_unet(cfg.sizes, latent_size=mean.shape[-1]).to(device)
    mean, std, states = mean.to(device), std.to(device), states.to(device)
    ema = EMA(unet, cfg.ema_decay)
    noise_sched = train_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.unet_steps)
    unet.train()
    for step, report in _steps(cfg.unet_steps, "unet", log):
        idx, cap = plan[step, :, 0].to(device), plan[step, :, 1].to(device)
        eps = torch.randn(len(idx), *mean.shape[1:], generator=gen).to(device)
        z0 = (mean[idx] + std[idx] * eps) * scaling  # [B, C, 8, 8]
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        pred = unet(noise_sched.add_noise(z0, noise, t), t, encoder_hidden_states=states[cap]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(unet, step)
        report(loss.item())
    return ema.shadow.cpu()
