"""``concept_perturb``: IRECE's inference-time defence, the concept's region of the latents perturbed while sampling.

At each UNet call whose timestep is at least ``until_t`` (M-ErasureBench's IRECE; paper-level, no code released):

1. **Localise.** A pass of the UNet on the call's latents x ``[N, C, h, w]`` with each erased prompt's embedding
   records the cross-attention probabilities of its tokens (``erasekit.hooks.attention_maps``); the binary mask
   M ``[N, 1, h, w]`` is their normalised average at the mask resolution, thresholded, upsampled (nearest) to the
   latent and maxed over the erased prompts.
2. **Perturb.** The call runs on x̃ = x + strength · std(x) · M ⊙ ξ, ξ ~ N(0, I) drawn from the seed and the
   timestep alone (the same ξ for every image, so an image's perturbation does not depend on its batch); both
   halves of a guidance batch get the same x̃.

The erased prompts are encoded when the hook is installed, before a composite's tensors and modules are applied
(``before_edits``), so they are the base text encoder's embeddings even when IRECE is stacked on a text-encoder
erasure; the localisation pass runs on the UNet as it is while sampling (stacked on a UNet erasure: the erased
UNet, where the paper localises with the un-erased backbone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.hooks import Gate, HookKind, register_hook_kind
from erasekit.hooks.attention_maps import attention_probs, concept_mask


@dataclass(frozen=True, kw_only=True)
class ConceptPerturbConfig:
    """IRECE's localisation and perturbation (our reading of the paper; module docstring)."""

    prompts: tuple[str, ...] = field(metadata={"help": "the erased prompts whose tokens are localised"})
    strength: float = field(default=1.0, metadata={"help": "the perturbation, in units of the latents' std"})
    until_t: int = field(
        default=500, metadata={"help": "perturb the calls at timesteps >= this (early steps)"}
    )
    threshold: float = field(default=0.5, metadata={"help": "threshold of the normalised attention map"})
    mask_resolution: int = field(
        default=0, metadata={"help": "maps' side; 0: the coarsest above the smallest"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the perturbation"})
    unet: str = field(default="unet", metadata={"help": "the denoiser component"})
    text_encoder: str = field(default="text_encoder", metadata={"help": "the text encoder component"})
    tokenizer: str = field(default="tokenizer", metadata={"help": "the tokenizer component"})

    def __post_init__(self) -> None:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError("concept_perturb needs non-empty erased prompts")
        if self.strength < 0 or not 0 <= self.threshold < 1 or self.until_t < 0 or self.mask_resolution < 0:
            raise ValueError("strength, until_t, mask_resolution must be >= 0 and threshold in [0, 1)")


def step_noise(shape: tuple[int, ...], t: int, seed: int) -> torch.Tensor:
    """``shape`` standard normal noise for timestep ``t``, from (seed, t) alone: the same for every image, so an
    image's perturbation depends neither on its batch nor on the last bits of its latents."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed * 1009 + t))


class ConceptPerturbState:
    """The hook of one install: the erased prompts' embeddings and token positions, and the UNet pre-hook."""

    def __init__(self, components: Mapping[str, Any], config: ConceptPerturbConfig) -> None:
        self.config = config
        self.unet: nn.Module = components[config.unet]
        tok, enc = components[config.tokenizer], components[config.text_encoder]
        ids = tok(list(config.prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            self.embeds = enc(ids.input_ids.to(enc.device))[0].detach()  # [P, L, D]
        self.tokens = [list(range(1, int(n) - 1)) for n in ids.attention_mask.sum(1)]
        if any(not t for t in self.tokens):
            raise ErasekitError("an erased prompt has no tokens to localise")
        self.attentions = [
            m for n, m in self.unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_q")
        ]
        self.busy = False

    def mask(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """``[N, 1, h, w]`` the concept mask of latents ``x`` (max over the erased prompts)."""
        masks = []
        for emb, tokens in zip(self.embeds, self.tokens):
            cond = emb.to(x.device, x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            maps = self._maps(x, t, cond)
            m = concept_mask(
                maps, tokens, tuple(x.shape[-2:]), self.config.threshold, self.config.mask_resolution
            )
            masks.append(F.interpolate(m, size=tuple(x.shape[-2:]), mode="nearest"))
        return torch.stack(masks).amax(0)

    def _maps(self, x: torch.Tensor, t: Any, cond: torch.Tensor) -> list[torch.Tensor]:
        """Every cross-attention's probabilities ``[N, heads, HW, L]`` in one UNet pass on ``cond``."""
        maps: list[torch.Tensor] = []

        def record(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            maps.append(attention_probs(mod, args[0], kwargs["encoder_hidden_states"]))

        handles = [a.register_forward_pre_hook(record, with_kwargs=True) for a in self.attentions]
        try:
            self.unet(x, t, encoder_hidden_states=cond)
        finally:
            for h in handles:
                h.remove()
        return maps

    def before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.busy:
            return None
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        if torch.is_tensor(t) and t.numel() > 1 and not bool((t == t.flatten()[0]).all()):
            raise ErasekitError("the concept perturbation needs one timestep per UNet call")
        t = t.flatten()[0] if torch.is_tensor(t) else t
        step = int(t)
        if step < self.config.until_t or self.config.strength == 0:
            return None
        n = sample.shape[0]
        cfg = n % 2 == 0 and n > 0 and torch.equal(sample[: n // 2], sample[n // 2 :])
        x = sample[n // 2 :] if cfg else sample  # one row per image
        self.busy = True
        try:
            with torch.no_grad():
                mask = self.mask(x, t)
        finally:
            self.busy = False
        noise = step_noise(tuple(x.shape[1:]), step, self.config.seed).to(x.device, x.dtype)
        std = x.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        perturbed = x + self.config.strength * std * mask.to(x.dtype) * noise
        if cfg:
            perturbed = torch.cat([perturbed, perturbed])
        if args:
            return (perturbed, *args[1:]), kwargs
        return args, {**kwargs, "sample": perturbed}


def _attach_points(config: ConceptPerturbConfig) -> tuple[str, ...]:
    return (config.unet,)


def _install(components: Mapping[str, Any], config: ConceptPerturbConfig, gate: Gate) -> list[Any]:
    for name in (config.unet, config.text_encoder, config.tokenizer):
        if components.get(name) is None:
            raise ErasekitError(
                f"the concept perturbation needs component {name!r}, which the model does not have"
            )
    state = ConceptPerturbState(components, config)
    return [components[config.unet].register_forward_pre_hook(state.before_unet, with_kwargs=True)]


register_hook_kind(HookKind("concept_perturb", ConceptPerturbConfig, _attach_points, _install, modifies=True,
                            summary="IRECE: perturb the latents where the base model attends to the concept",
                            before_edits=True))  # fmt: skip
