"""``guidance_mix``: UnGuide's per-prompt mix of the base model's and the unlearned (LoRA) model's predictions.

For a prompt p (piotrmwojcik/UnGuide, ``compute_lora_diff.py``, ``autoguide.py``):

    d(p) = mean over R probes of ‖ε_LoRA(z, t, p) − ε_base(z, t, p)‖₂        (the flattened [C, h, w] difference)

z: ``probe_stop`` steps of a ``probe_steps``-step DDIM run of the base model from seeded noise at guidance
``probe_guidance``; t drawn in ``[probe_t, probe_t + 20)``; the same noise and t for every prompt. Then
w(p) = ``w_concept`` (−1) when d(p) > d("") else ``w_other`` (2), and the UNet returns

    ε = w · ε_base + (1 − w) · ε_LoRA

on every row of the batch, both halves of a classifier-free-guidance batch taking the conditional row's w. That is
the release's w · ε_base^CFG + (1 − w) · ε_LoRA^CFG exactly, since guidance is linear and both models run the same
two rows. The gated modules (the LoRA pairs) run at gate 1 for ε_LoRA and 0 for ε_base.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.hooks import Gate, HookKind, register_hook_kind
from erasekit.hooks.prompt_gate import row_key


@dataclass(frozen=True, kw_only=True)
class GuidanceMixConfig:
    """UnGuide's gate and mix; defaults follow the README's ``compute_lora_diff.py`` command."""

    w_concept: float = field(
        default=-1.0, metadata={"help": "w when d(p) > d(''): the unlearned model leads"}
    )
    w_other: float = field(default=2.0, metadata={"help": "w otherwise: away from the unlearned model"})
    repeats: int = field(default=30, metadata={"help": "R, probes per prompt (the README: 30 x 1)"})
    probe_steps: int = field(default=50, metadata={"help": "the probe's DDIM schedule"})
    probe_stop: int = field(default=11, metadata={"help": "DDIM steps the probe takes (t_enc 40 of 50: 11)"})
    probe_t: int = field(default=800, metadata={"help": "the probe's noise predictions at t in [this, +20)"})
    probe_guidance: float = field(default=7.5, metadata={"help": "CFG scale of the probe's sampling"})
    seed: int = field(default=2024, metadata={"help": "seed of the probes' noise and timesteps"})
    unet: str = field(default="unet", metadata={"help": "the denoiser component"})
    text_encoder: str = field(default="text_encoder", metadata={"help": "the text encoder component"})
    tokenizer: str = field(default="tokenizer", metadata={"help": "the tokenizer component"})
    scheduler: str = field(default="scheduler", metadata={"help": "the scheduler component (its config)"})

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.probe_steps < 2 or not 0 <= self.probe_stop < self.probe_steps:
            raise ValueError("repeats >= 1, probe_steps >= 2 and 0 <= probe_stop < probe_steps")
        if not 0 <= self.probe_t <= 979 or self.probe_guidance < 0:
            raise ValueError("probe_t must be in [0, 979] and probe_guidance >= 0")


class GuidanceMixState:
    """The hook of one install: d of each conditioning row (cached by :func:`row_key`), and the mixing."""

    MAX_ROWS = 4096

    def __init__(self, components: Mapping[str, Any], config: GuidanceMixConfig, gate: Gate) -> None:
        self.config, self.gate = config, gate
        self.unet: nn.Module = components[config.unet]
        self.scheduler_config = components[config.scheduler].config
        tok, enc = components[config.tokenizer], components[config.text_encoder]
        ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            self.null = enc(ids.to(enc.device))[0].detach()  # [1, L, D]
        self.distances: OrderedDict[str, float] = OrderedDict()
        self.null_distance: float | None = None
        self.busy = False

    # ---- the probe -------------------------------------------------------------------------------------

    def _unet(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, lora: bool) -> torch.Tensor:
        self.gate.value = torch.full((x.shape[0],), 1.0 if lora else 0.0, device=x.device)
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def distance(self, cond: torch.Tensor) -> float:
        """d of one conditioning row ``cond`` ``[L, D]`` (the probe, module docstring)."""
        from diffusers import DDIMScheduler

        c = self.config
        g = torch.Generator("cpu").manual_seed(c.seed)
        dev, dtype = cond.device, cond.dtype
        noise = torch.randn((c.repeats, *self._latent()), generator=g).to(dev, dtype)
        t_probe = torch.randint(c.probe_t, c.probe_t + 20, (c.repeats,), generator=g).to(dev)
        sched = DDIMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(c.probe_steps)
        rows = cond.unsqueeze(0).expand(c.repeats, -1, -1)
        null = self.null.to(dev, dtype).expand(c.repeats, -1, -1)
        z = noise * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps[: c.probe_stop]:
                both = self._unet(torch.cat([z, z]), t, torch.cat([null, rows]), lora=False)
                e_u, e_c = both.chunk(2)
                z = sched.step(e_u + c.probe_guidance * (e_c - e_u), t, z).prev_sample
            diff = self._unet(z, t_probe, rows, lora=True) - self._unet(z, t_probe, rows, lora=False)
        return float(diff.flatten(1).float().norm(dim=1).mean())

    def _latent(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def weights(self, cond: torch.Tensor) -> torch.Tensor:
        """``[N]`` w of each conditioning row ``cond`` ``[N, L, D]``."""
        if self.null_distance is None:
            self.null_distance = self.distance(self.null[0].to(cond.device, cond.dtype))
        out = []
        for row in cond:
            key = row_key(row)
            if key not in self.distances:
                self.distances[key] = self.distance(row)
                while len(self.distances) > self.MAX_ROWS:
                    self.distances.popitem(last=False)
            d = self.distances[key]
            out.append(self.config.w_concept if d > self.null_distance else self.config.w_other)
        return torch.tensor(out, dtype=torch.float32)

    # ---- the hooks -------------------------------------------------------------------------------------

    def around_unet(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.busy:
            return None
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        cond = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        self.busy = True
        try:
            w = self.weights(cond)
            n = w.shape[0]
            if n % 2 == 0 and n > 0 and torch.equal(sample[: n // 2], sample[n // 2 :]):
                w = w[n // 2 :].repeat(2)  # the conditional half's w for both halves of each image
            lora = output.sample if hasattr(output, "sample") else output[0]
            rest = {
                k: v for k, v in kwargs.items() if k not in ("sample", "timestep", "encoder_hidden_states")
            }
            self.gate.value = torch.zeros(n, device=sample.device)
            base = self.unet(sample, t, encoder_hidden_states=cond, **{**rest, "return_dict": True}).sample
        finally:
            self.gate.value = None
            self.busy = False
        w = w.to(lora.device, lora.dtype).view(-1, *([1] * (lora.ndim - 1)))
        mixed = w * base + (1 - w) * lora
        if hasattr(output, "sample"):
            output.sample = mixed
            return output
        return (mixed, *output[1:])


def _attach_points(config: GuidanceMixConfig) -> tuple[str, ...]:
    return (config.unet,)


def _install(components: Mapping[str, Any], config: GuidanceMixConfig, gate: Gate) -> list[Any]:
    for name in (config.unet, config.text_encoder, config.tokenizer, config.scheduler):
        if components.get(name) is None:
            raise ErasekitError(f"the guidance mix needs component {name!r}, which the model does not have")
    state = GuidanceMixState(components, config, gate)
    unet = components[config.unet]
    return [unet.register_forward_hook(state.around_unet, with_kwargs=True)]


register_hook_kind(HookKind("guidance_mix", GuidanceMixConfig, _attach_points, _install, modifies=True,
                            summary="UnGuide: per-prompt mix of the base and the unlearned predictions"))  # fmt: skip
