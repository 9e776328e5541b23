"""ItD: Interpret then Deactivate (Tian et al., 2025), concept erasure with a sparse autoencoder in the text encoder.

1. **Interpret.** A top-k sparse autoencoder (:mod:`erasekit.hooks.sae`) is trained on the output of one middle
   text-encoder layer (CLIP-L: ``encoder.layers[8]`` of 12), over every token of a caption corpus (the release:
   celebrity, style and COCO prompts; MiniCanvas: the world's captions):
   L = MSE(r, h) / Var(h), Adam (lr 1e-4, eps 6.25e-10), 1000 warm-up steps then constant, 50 prompts per batch,
   decoder columns kept at unit norm (renormalised and the parallel gradient removed before each step),
   ``b_pre`` started at the geometric median of the first activations.
2. **Select.** For a prompt, its top-N latents by their largest activation over its tokens (BOS dropped). The
   erased features F = ∪ over erase prompts of (top-N \\ R), R = ∪ over retain prompts of their top-N.
3. **Deactivate.** At inference the layer's output becomes the SAE's reconstruction with F scaled by −8, for the
   prompts whose reconstruction shift reaches the threshold 0.99 × min over the erase prompts of that shift.

The result is a :class:`~erasekit.hooked.HookedPatch` holding the SAE as a ``topk_sae`` module on that layer.

Released code read: NANSirun/Interpret-then-deactivate@6e8869a (``src/SAE/sae.py``, ``src/SAE/sae_utils.py``,
``scripts/train_sae_text.py``, ``scripts/config/*.json``, ``generate_images.py``,
``find_the_threshold_for_*``). As released, the threshold is measured differently from the gate for both kinds:
celebrities (our objects) take the max over tokens of the per-token shift, styles are measured at scale −6 and
deactivated at −8; ``paper`` keeps both, ``consistent`` measures the threshold as the gate does.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.concepts import check_type
from erasekit.errors import ErasekitError
from erasekit.evaluation.record import model_fingerprint
from erasekit.hooked import AddedModule, HookedPatch
from erasekit.hooks.sae import SAEConfig, TopKSAE
from erasekit.methods.common import check_choice, check_positive, frozen, generator
from erasekit.progress import track
from erasekit.registry import Strength, config_to_dict, register

STATS = ("auto", "mean", "max")
TEMPLATES = {  # erase and retain prompts: the concept alone and in the world's templates of its kind
    "object": ("{}", "A {} image.", "a picture of a {}"),
    "style": ("{}", "An image in {} style.", "{} style artwork"),
    "nsfw": ("{}", "a photo of {}", "{} image"),
}


@dataclass(frozen=True, kw_only=True)
class ItDConfig:
    """ItD's settings; defaults follow the release's configs and scripts, sizes scaled to the encoder (0: auto)."""

    concept_type: str = field(
        default="style", metadata={"help": "style, object or nsfw: picks N and the gate"}
    )
    layer: int = field(
        default=-1, metadata={"help": "encoder layer whose output the SAE reads; -1: 8/12 deep"}
    )
    latents: int = field(default=0, metadata={"help": "SAE latents; 0: 32 x the width (the release: 2^19)"})
    k: int = field(default=0, metadata={"help": "latents kept per token; 0: width / 12 (CLIP-L: 64)"})
    features_per_prompt: int = field(
        default=0, metadata={"help": "N; 0: 2k for objects and nudity, 4k for styles (128 / 256 at k = 64)"}
    )
    epochs: int = field(default=20, metadata={"help": "passes over the caption corpus"})
    batch_prompts: int = field(default=50, metadata={"help": "prompts per SAE batch (all their tokens)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the SAE"})
    warmup: int = field(default=1000, metadata={"help": "linear warm-up steps, then a constant rate"})
    scale: float = field(default=-8.0, metadata={"help": "the deactivated latents are multiplied by this"})
    threshold_scale: float = field(
        default=0.0, metadata={"help": "scale the threshold is measured at; 0: -6 for styles, else `scale`"}
    )
    threshold_stat: str = field(
        default="auto",
        metadata={"help": "threshold statistic: mean (as the gate), max over tokens; auto: max for objects"},
    )
    threshold_factor: float = field(
        default=0.99, metadata={"help": "threshold = this x min over erase prompts"}
    )
    captions: tuple[str, ...] = field(
        default=(), metadata={"help": "SAE corpus; empty: MiniCanvas's captions"}
    )
    retain: tuple[str, ...] = field(
        default=(), metadata={"help": "retain concepts; empty: the other MiniCanvas concepts of the kind"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the SAE's init and the batch order"})

    def __post_init__(self) -> None:
        check_type(self.concept_type)
        check_positive(epochs=self.epochs, batch_prompts=self.batch_prompts, lr=self.lr,
                       threshold_factor=self.threshold_factor)  # fmt: skip
        check_choice("threshold_stat", self.threshold_stat, STATS)
        if min(self.latents, self.k, self.features_per_prompt, self.warmup) < 0 or self.layer < -1:
            raise ValueError("latents, k, features_per_prompt, warmup must be >= 0 and layer >= -1")
        if self.scale >= 1 or self.threshold_scale > 0:
            raise ValueError("scale must be < 1 and threshold_scale <= 0 (0: auto)")


@dataclass(frozen=True)
class Sizes:
    """The sizes a config resolves to on one encoder."""

    layer: int
    dim: int
    latents: int
    k: int
    n: int
    threshold_scale: float
    stat: str


def resolve(config: ItDConfig, encoder: nn.Module) -> Sizes:
    """The config's auto values on ``encoder`` (``layers`` deep, ``dim`` wide)."""
    layers, dim = len(encoder.encoder.layers), encoder.config.hidden_size
    layer = config.layer if config.layer >= 0 else round(8 * layers / 12)
    if layer >= layers:
        raise ErasekitError(f"itd: the encoder has {layers} layers, no layer {layer}")
    k = config.k or max(1, round(dim / 12))
    latents = config.latents or 32 * dim
    style = config.concept_type == "style"
    n = config.features_per_prompt or (4 if style else 2) * k
    stat = config.threshold_stat if config.threshold_stat != "auto" else ("mean" if style else "max")
    if k > latents or n > latents:
        raise ErasekitError(f"itd: k ({k}) and N ({n}) must not exceed the latents ({latents})")
    return Sizes(layer, dim, latents, k, n, config.threshold_scale or (-6.0 if style else config.scale), stat)


# ---- activations ---------------------------------------------------------------------------------------


def layer_outputs(pipe: Any, layer: int, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
    """The output of ``encoder.layers[layer]`` for each prompt, padded as the pipeline does: ``[P, 77, D]``, and
    each prompt's own length in tokens (BOS and EOS included)."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    rows: list[torch.Tensor] = []
    lengths: list[int] = []
    seen: list[torch.Tensor] = []
    handle = enc.encoder.layers[layer].register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), 256):
                ids = tok(list(prompts[i : i + 256]), padding="max_length", max_length=tok.model_max_length,
                          truncation=True, return_tensors="pt")  # fmt: skip
                seen.clear()
                enc(ids.input_ids.to(enc.device))
                rows.append(seen[0].float().cpu())
                lengths += [int(n) for n in ids.attention_mask.sum(1)]
    finally:
        handle.remove()
    if not rows:
        return torch.zeros(0, tok.model_max_length, enc.config.hidden_size), []
    return torch.cat(rows), lengths


def own_rows(padded: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Each prompt's rows of its own tokens, ``[n_i, D]``."""
    return [p[:n] for p, n in zip(padded, lengths)]


def geometric_median(x: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """Weiszfeld's iterations from the mean: the point minimising Σ ‖x_i − m‖ (``x`` ``[n, D]`` -> ``[D]``)."""
    m = x.mean(0)
    for _ in range(iterations):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


# ---- the SAE ---------------------------------------------------------------------------------------------


def new_sae(sizes: Sizes, g: torch.Generator) -> TopKSAE:
    """Encoder drawn as torch's Linear default, decoder its transpose with unit columns, b_lat = b_pre = 0."""
    with torch.device("meta"):
        sae = TopKSAE(SAEConfig(dim=sizes.dim, latents=sizes.latents, k=sizes.k))
    sae = sae.to_empty(device="cpu")
    bound = 1 / math.sqrt(sizes.dim)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.empty(sizes.latents, sizes.dim).uniform_(-bound, bound, generator=g))
        sae.decoder.weight.copy_(F.normalize(sae.encoder.weight.t(), dim=0))
        sae.pre_bias.zero_()
        sae.latent_bias.zero_()
    return sae


def unit_decoder_step(sae: TopKSAE) -> None:
    """Before a step: the decoder's columns back to unit norm and the gradient's part along them removed."""
    with torch.no_grad():
        w = sae.decoder.weight  # [D, n]
        w.copy_(F.normalize(w, dim=0))
        if w.grad is not None:
            w.grad.sub_(w * (w * w.grad).sum(0, keepdim=True))


def train_sae(
    sae: TopKSAE, acts: Sequence[torch.Tensor], config: ItDConfig, g: torch.Generator
) -> list[float]:
    """Train in place on ``acts`` (per prompt ``[n_i, D]``; a batch holds ``batch_prompts`` prompts, each padded
    to the batch's longest as the release tokenises); returns each step's normalised MSE."""
    sample = torch.cat(list(acts[:500]))[:32768]
    with torch.no_grad():
        sae.pre_bias.copy_(geometric_median(sample))
    scale = 1 / sample.var(0, unbiased=False).mean().clamp_min(1e-12)  # 1 / mean (x − x̄)²
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr, eps=6.25e-10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / config.warmup) if config.warmup else 1.0
    )
    losses = []
    steps = config.epochs * math.ceil(len(acts) / config.batch_prompts)
    bar = iter(track(range(steps), desc="itd sae", total=steps))
    for _ in range(config.epochs):
        order = torch.randperm(len(acts), generator=g).tolist()
        for i in range(0, len(order), config.batch_prompts):
            x = torch.cat([acts[j] for j in order[i : i + config.batch_prompts]])  # [tokens, D]
            loss = scale * F.mse_loss(sae.decode(sae.encode(x)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            unit_decoder_step(sae)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            next(bar, None)
    return losses


# The SAE depends on the encoder, the corpus and the training settings, never on the concept: a sweep or a
# bench erases many concepts with one. Each process keeps the last few it trained (a few MB each), keyed by
# everything the training reads, and hands out copies, so a hit returns the same weights a retraining would.
_SAES: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
_KEEP = 2


def sae_key(encoder: nn.Module, sizes: Sizes, captions: Sequence[str], config: ItDConfig) -> str:
    """What the SAE's training reads: the encoder's weights, the sizes, the corpus and the training settings."""
    h = hashlib.sha256(model_fingerprint({"text_encoder": encoder}).encode())
    settings = (sizes.layer, sizes.dim, sizes.latents, sizes.k, config.epochs, config.batch_prompts,
                config.lr, config.warmup, config.seed)  # fmt: skip
    h.update(repr(settings).encode())
    for c in captions:
        h.update(c.encode() + b"\0")
    return h.hexdigest()


def trained_sae(pipe: Any, sizes: Sizes, captions: Sequence[str], config: ItDConfig) -> TopKSAE:
    """The SAE trained on ``captions`` at ``sizes.layer``; from this process's memo when it trained it before."""
    key = sae_key(pipe.text_encoder, sizes, captions, config)
    g = generator(config.seed)
    sae = new_sae(sizes, g)
    if key in _SAES:
        _SAES.move_to_end(key)
        sae.load_state_dict(_SAES[key])
        return sae
    train_sae(sae, padded_to_longest(*layer_outputs(pipe, sizes.layer, captions), config.batch_prompts),
              config, g)  # fmt: skip
    _SAES[key] = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    while len(_SAES) > _KEEP:
        _SAES.popitem(last=False)
    return sae


def padded_to_longest(padded: torch.Tensor, lengths: Sequence[int], size: int) -> list[torch.Tensor]:
    """Each prompt's rows up to the longest prompt of its group of ``size`` (the release's ``padding=True``); the
    rows past a prompt's end are the pipeline's padding rows, which causal attention leaves as they would be."""
    out = []
    for i in range(0, len(lengths), size):
        longest = max(lengths[i : i + size])
        out += [p[:longest] for p in padded[i : i + size]]
    return out


# ---- selection and threshold ---------------------------------------------------------------------------


def top_features(sae: TopKSAE, h: torch.Tensor, n: int) -> set[int]:
    """The prompt's ``n`` latents with the largest activation over its tokens, BOS dropped (``h`` ``[L, D]``)."""
    with torch.no_grad():
        return set(sae.encode(h)[1:].max(0).values.topk(n).indices.tolist())


def erased_features(
    sae: TopKSAE, erase: Sequence[torch.Tensor], retain: Sequence[torch.Tensor], n: int
) -> list[int]:
    """F = ∪ over erase prompts of (top-n \\ R), R = ∪ over retain prompts of top-n; sorted."""
    kept = set().union(*(top_features(sae, h, n) for h in retain)) if retain else set()
    return sorted(set().union(*(top_features(sae, h, n) - kept for h in erase)))


def shift_stat(sae: TopKSAE, h: torch.Tensor, stat: str) -> torch.Tensor:
    """``[B]`` the reconstruction shift of prompts ``h`` ``[B, L, D]``: mean over rows and channels, or the max
    over rows of the per-row mean (the release's celebrity threshold)."""
    with torch.no_grad():
        per_row = (sae.deactivated(h) - h).pow(2).mean(-1)  # [B, L]
    return per_row.mean(1) if stat == "mean" else per_row.max(1).values


def prompts_for(concepts: Sequence[str], kind: str) -> list[str]:
    return [t.format(c) for c in concepts for t in TEMPLATES[kind]]


def erase_itd(model: Any, concepts: list[str], config: ItDConfig) -> HookedPatch:
    """ItD: train an SAE on a text-encoder layer, pick the concept's features, deactivate them behind a gate."""
    from erasekit.methods._closed_form import world_kind_mates

    pipe = model.require_capability("unet_training", "itd")
    sizes = resolve(config, pipe.text_encoder)
    captions = list(config.captions)
    if not captions:
        from erasekit.minicanvas.world import all_captions

        if not world_kind_mates(concepts):
            raise ErasekitError("itd needs --captions (the SAE's training corpus) outside MiniCanvas")
        captions = [c for c in all_captions() if c]
    retain = list(config.retain) or list(world_kind_mates(concepts))
    with frozen(pipe.text_encoder):
        sae = trained_sae(pipe, sizes, captions, config)
        erase_prompts = prompts_for(concepts, config.concept_type)
        retain_prompts = prompts_for(retain, config.concept_type)
        erase_padded, erase_lengths = layer_outputs(pipe, sizes.layer, erase_prompts)
        features = erased_features(sae, own_rows(erase_padded, erase_lengths),
                                   own_rows(*layer_outputs(pipe, sizes.layer, retain_prompts)), sizes.n)  # fmt: skip
        if not features:
            raise ErasekitError(
                "itd: every feature of the concept is also a retained concept's; nothing to erase"
            )
        with torch.device("meta"):  # nothing drawn from torch's global generator: the weights are sae's
            at = TopKSAE(SAEConfig(dim=sizes.dim, latents=sizes.latents, k=sizes.k, features=tuple(features),
                                   scale=sizes.threshold_scale))  # fmt: skip
        at.load_state_dict(sae.state_dict(), assign=True)
        stats = shift_stat(at, erase_padded, sizes.stat)
    threshold = config.threshold_factor * float(stats.min())
    sae_config = SAEConfig(dim=sizes.dim, latents=sizes.latents, k=sizes.k, features=tuple(features),
                           scale=config.scale, threshold=threshold)  # fmt: skip
    state = {k: v.detach().cpu().float() for k, v in sae.state_dict().items()}
    module = AddedModule.attached_to(model, f"text_encoder/encoder.layers.{sizes.layer}", "topk_sae",
                                     config_to_dict(sae_config), state)  # fmt: skip
    return HookedPatch(modules=(module,))


_FILES = "NANSirun/Interpret-then-deactivate@6e8869a: src/SAE/, scripts/train_sae_text.py, generate_images.py"

register(
    "itd",
    ItDConfig,
    presets={
        "paper": {},  # the release's settings, its two threshold measurements included
        "consistent": {"threshold_stat": "mean", "threshold_scale": -8.0},  # threshold measured as the gate
    },
    strength=Strength("scale", (0.0, -2.0, -4.0, -8.0, -16.0)),
    summary=f"ItD: a top-k SAE on a text-encoder layer, the concept's features deactivated behind a gate ({_FILES})",
)(erase_itd)
