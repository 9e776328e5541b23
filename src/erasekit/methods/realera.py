"""RealEra: semantic-level concept erasure via neighbour-concept mining (Liu et al., arXiv 2410.09140), paper-level.

No code was released (searched 2026-12: no repository under the paper's name or authors); this follows the
paper's text, and everything it does not state is ours (docs/baselines.md, "RealEra"). Three parts:

1. **Neighbour-concept mining.** The concept's input token embeddings e ``[n_c, D_in]`` (flattened) are perturbed,
   e + η with η = ρ‖e‖u, u uniform on the unit sphere, ρ ~ U(0, D₁], kept when
   ``d(e, e + η)/‖e‖ ≤ D₁`` and ``S₁ ≤ cos(e, e + η) ≤ S₂`` (rejection sampling). Each template prompt is encoded
   with ``neighbours`` such perturbations (a removable hook on the token embedding): associated concepts the
   erasure must also cover. **Beyond concepts**: ``beyond`` perturbations with D₁ < ρ ≤ D₂ and cos in
   ``[B₁, B₂]``, just outside the neighbourhood, which must stay where they are.
2. **Closed form (MACE-style).** For every attn2 to_k / to_v W (MACE's refinement, :mod:`.mace_cfr`): the context
   rows of each template prompt with the concept *and of its neighbour prompts* (common prefix, suffix, padding)
   take the original W's values of the aligned rows of the prompt with ``mapping`` instead; every row of every
   beyond prompt keeps its own value::

       W* = (λW + Σ V Cᵀ + s_b W Σ_b c cᵀ + W K)(λI + Σ C Cᵀ + s_b Σ_b c cᵀ + K)⁻¹

   C ``[N, D]`` the target and neighbour context rows, V ``[N, out]`` their targets, K MACE's caches.
3. **LoRA on the noise prediction.** A rank-r LoRA (peft) on the same projections of the closed-form model,
   trained in ESD's loop (:func:`~erasekit.methods.esd.diffusion_loop`: x_t ``[1, C, h, w]`` from the frozen base
   model's partial DDIM of a target prompt) to align the noise prediction of the target and its neighbours with
   the base model's for the mapped prompt, and to keep the beyond prompts'::

       L = ‖ε_θ(x_t, c̃, t) − ε*(x_t, m, t)‖² + β ‖ε_θ(x_t, b, t) − ε*(x_t, b, t)‖²

   c̃ cycles through the target prompt and its neighbours, m is the mapped prompt, b one of its beyond prompts.
   The LoRA is merged (W* + (α/r) B A), so the result is a plain Patch of attn2 to_k / to_v.

D₁, S₁, S₂ and the LoRA settings were not recovered from the paper. Our bounds come from the MiniCanvas text
encoder's token embeddings: the world's synonyms sit at cos 0.38–0.61 (median 0.52) from their concept, the
other concepts of the kind at −0.43–0.27 (median −0.02). Neighbours span cos 0.5–0.9 (from near the target out
to the synonyms; D₁ = 1.75 admits ρ up to cos ≈ 0.5 for an isotropic η, so the cosine bounds bind and D₁ trims);
beyond concepts lie in cos 0.3–0.5, ρ ≤ 3 (the shell between the synonyms and the unrelated concepts). The LoRA
follows MACE's configs (rank 1, 50 steps, lr 1e-5 objects / 1e-4 styles, batch 1), RealEra's closed form and
LoRA being MACE's two stages with new rows and a new loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.denoising import predict_noise
from erasekit.errors import ErasekitError
from erasekit.methods._closed_form import (
    check_family,
    gram,
    kv_layers,
    ridge_edit,
    sequence_embeddings,
    token_ids,
    weight_patch,
    weights64,
)
from erasekit.methods.common import check_positive, frozen, generator, lora_copy
from erasekit.methods.esd import diffusion_loop
from erasekit.methods.mace_cfr import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    MACECFRConfig,
    cache_prompts,
    matching_rows,
)
from erasekit.patch import Patch
from erasekit.registry import Strength, register


@dataclass(frozen=True, kw_only=True)
class RealEraConfig(MACECFRConfig):
    """RealEra's settings: MACE's closed-form fields, the mining bounds and the LoRA stage (module docstring)."""

    neighbours: int = field(default=4, metadata={"help": "mined neighbour perturbations per template prompt"})
    max_distance: float = field(
        default=1.75, metadata={"help": "D₁: neighbours' largest ‖η‖ / ‖e‖ (relative distance)"}
    )
    min_cosine: float = field(default=0.5, metadata={"help": "S₁: neighbours' smallest cos(e, e + η)"})
    max_cosine: float = field(default=0.9, metadata={"help": "S₂: neighbours' largest cos(e, e + η)"})
    beyond: int = field(
        default=4, metadata={"help": "beyond-concept perturbations per template prompt (0: off)"}
    )
    beyond_distance: float = field(
        default=3.0, metadata={"help": "D₂: beyond concepts' largest ‖η‖ / ‖e‖ (their smallest is D₁)"}
    )
    beyond_min_cosine: float = field(default=0.3, metadata={"help": "B₁: beyond concepts' smallest cosine"})
    beyond_max_cosine: float = field(default=0.5, metadata={"help": "B₂: beyond concepts' largest cosine"})
    beyond_scale: float = field(
        default=1.0, metadata={"help": "s_b: weight of the beyond rows in the closed form"}
    )
    rank: int = field(default=1, metadata={"help": "LoRA rank r (MACE: 1)"})
    alpha: float = field(default=1.0, metadata={"help": "LoRA alpha: ΔW = (alpha / rank) B A"})
    iterations: int = field(default=50, metadata={"help": "LoRA steps, one x_t each (MACE: 50; 0: no LoRA)"})
    lr: float = field(
        default=1e-5, metadata={"help": "LoRA Adam learning rate (MACE: 1e-5 objects, 1e-4 styles)"}
    )
    beyond_weight: float = field(
        default=1.0, metadata={"help": "β: weight of the beyond term of the LoRA loss"}
    )
    ddim_steps: int = field(default=50, metadata={"help": "DDIM schedule x_t is sampled along"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the partial sampling of x_t"})
    seed: int = field(default=0, metadata={"help": "seed of the perturbations, the LoRA init and the noise"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(neighbours=self.neighbours, max_distance=self.max_distance, rank=self.rank,
                       alpha=self.alpha, lr=self.lr, ddim_steps=self.ddim_steps)  # fmt: skip
        if not -1.0 <= self.min_cosine < self.max_cosine <= 1.0:
            raise ValueError("need -1 <= min_cosine < max_cosine <= 1")
        if not -1.0 <= self.beyond_min_cosine < self.beyond_max_cosine <= 1.0:
            raise ValueError("need -1 <= beyond_min_cosine < beyond_max_cosine <= 1")
        if self.beyond and self.beyond_distance <= self.max_distance:
            raise ValueError("beyond_distance must exceed max_distance (beyond concepts lie outside D₁)")
        if min(self.beyond, self.iterations, self.beyond_scale, self.beyond_weight, self.start_guidance) < 0:
            raise ValueError(
                "beyond, iterations, beyond_scale, beyond_weight and start_guidance must be >= 0"
            )


def perturbations(
    e: torch.Tensor, count: int, rho: tuple[float, float], cosine: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """``count`` perturbations η ``[count, *e.shape]`` of ``e`` with ‖η‖/‖e‖ in ``rho`` and cos(e, e+η) in
    ``cosine``: η = ρ‖e‖u, ρ ~ U(rho), u uniform on the sphere, kept when the cosine falls in the bounds."""
    flat = e.detach().flatten().double().cpu()
    out: list[torch.Tensor] = []
    for _ in range(2000 * count):
        if len(out) == count:
            break
        u = torch.randn(flat.shape, generator=g, dtype=torch.float64)
        r = rho[0] + (rho[1] - rho[0]) * float(torch.rand((), generator=g, dtype=torch.float64))
        eta = r * flat.norm() * u / u.norm()
        if cosine[0] <= float(F.cosine_similarity(flat, flat + eta, dim=0)) <= cosine[1]:
            out.append(eta.view(e.shape))
    if len(out) < count:
        raise ErasekitError(
            f"no perturbation with ‖η‖/‖e‖ in {rho} reaches cos in {cosine}; widen the bounds"
        )
    return torch.stack(out).to(e.dtype)


@contextlib.contextmanager
def added_rows(encoder: nn.Module, rows: list[int], delta: torch.Tensor) -> Iterator[None]:
    """Inside the block the token embedding's output at ``rows`` gets ``delta`` ``[B, len(rows), D_in]`` added
    (one perturbation per sequence of the batch); a removable forward hook, removed in ``finally``."""
    from erasekit.models.families import token_embedding_path

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, rows] += delta.to(out.device, out.dtype)
        return out

    handle = encoder.get_submodule(token_embedding_path(encoder)).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Mined:
    """One template prompt of one concept, with its mapped prompt, neighbours and beyond concepts.

    Attributes:
        cond: ``[L, D]`` the prompt's conditioning; mapped: ``[L, D]`` the mapped prompt's.
        neighbours: ``[N, L, D]``; beyond: ``[Nb, L, D]`` (``Nb`` may be 0).
        rows, mapped_rows: MACE's aligned context rows of the prompt and of the mapped prompt.
    """

    cond: torch.Tensor
    mapped: torch.Tensor
    neighbours: torch.Tensor
    beyond: torch.Tensor
    rows: list[int]
    mapped_rows: list[int]


def mine(pipe: Any, concepts: list[str], config: RealEraConfig) -> list[Mined]:
    """Encode every template prompt, its mapped prompt and its perturbed versions (float64 on the CPU)."""
    g = generator(config.seed)
    table = pipe.text_encoder.get_input_embeddings().weight
    out = []
    for concept in concepts:
        for template in config.templates:
            prompt, mapped = template.format(concept), template.format(config.mapping)
            ids, mids = token_ids(pipe, prompt), token_ids(pipe, mapped)
            rows, mrows = matching_rows(ids, mids, pipe.tokenizer.model_max_length)
            own = [i for i in range(len(ids)) if i not in set(rows)]  # the concept's tokens in this prompt
            if not own:
                raise ErasekitError(f"{prompt!r} and {mapped!r} tokenise alike: no concept tokens to perturb")
            e = table[torch.tensor([ids[i] for i in own])].detach()  # [n_c, D_in]
            near = perturbations(e, config.neighbours, (0.0, config.max_distance),
                                 (config.min_cosine, config.max_cosine), g)  # fmt: skip
            far = (perturbations(e, config.beyond, (config.max_distance, config.beyond_distance),
                                 (config.beyond_min_cosine, config.beyond_max_cosine), g)
                   if config.beyond else e.new_zeros(0, *e.shape))  # fmt: skip
            both = torch.cat([near, far])  # [N + Nb, n_c, D_in]
            with torch.no_grad(), added_rows(pipe.text_encoder, own, both):
                perturbed = sequence_embeddings(pipe, [prompt] * both.shape[0])  # [N + Nb, L, D]
            seq = sequence_embeddings(pipe, [prompt, mapped])
            out.append(Mined(seq[0], seq[1], perturbed[: config.neighbours], perturbed[config.neighbours :],
                             rows, mrows))  # fmt: skip
    return out


def closed_form(
    model: Any, pipe: Any, mined: list[Mined], concepts: list[str], config: RealEraConfig
) -> Patch:
    """Stage 2: MACE's refinement over the target and neighbour prompts, beyond rows kept (module docstring)."""
    layers = kv_layers(pipe.unet, config.projections)
    sources, targets = [], []
    for m in mined:
        prompts = torch.cat([m.cond[None], m.neighbours])  # [1 + N, L, D]: the target and its neighbours
        sources.append(prompts[:, m.rows].reshape(-1, prompts.shape[-1]))  # [(1 + N) · rows, D]
        targets.append(m.mapped[m.mapped_rows].repeat(prompts.shape[0], 1))  # aligned mapped rows, each copy
    sources, targets = torch.cat(sources), torch.cat(targets)
    beyond = torch.cat([m.beyond.reshape(-1, m.beyond.shape[-1]) for m in mined])  # [Nb · L, D]
    keep = config.beyond_scale * beyond.T @ beyond if beyond.numel() and config.beyond_scale > 0 else None
    prior, domain = cache_prompts(concepts, config)
    for prompts, scale in ((prior, config.preserve_scale), (domain, config.domain_scale)):
        if prompts and scale > 0:
            keep = scale * gram(pipe, prompts) + (0 if keep is None else keep)
    new = {name: ridge_edit(w, config.lamb, [(sources, targets @ w.T, 1.0)], keep)
           for name, w in weights64(layers).items()}  # fmt: skip
    return weight_patch(model, layers, new)


def erase_realera(model: Any, concepts: list[str], config: RealEraConfig) -> Patch:
    """RealEra: mine neighbour concepts, remap them in closed form with beyond concepts kept, then a merged LoRA."""
    pipe = check_family(model, "realera")
    if config.iterations:
        model.require_capability("unet_training", "realera")
    with frozen(pipe.unet, pipe.text_encoder):
        mined = mine(pipe, concepts, config)
        stage = closed_form(model, pipe, mined, concepts, config)
        if not config.iterations:
            return stage
        with stage.applied(model):  # the LoRA trains on a copy of the closed-form UNet
            names = [n.removesuffix(".weight") for n in stage_names(stage)]
            adapted, layers = lora_copy(
                pipe.unet, names, config.rank, config.alpha, generator(config.seed + 1)
            )
        train_lora(pipe, adapted, layers, mined, config)
        merged = {f"{name}.weight": stage.tensors[f"unet/{name}.weight"].to(layer.weight.device)
                  + layer.get_delta_weight("default").detach().to(layer.weight.dtype)
                  for name, layer in layers.items()}  # fmt: skip
    return Patch.from_tensors(model, "unet", merged)


def stage_names(stage: Patch) -> list[str]:
    """The UNet parameter names a patch changes (``unet/x.weight`` -> ``x.weight``)."""
    return [k.split("/", 1)[1] for k in stage.tensors]


def train_lora(
    pipe: Any, adapted: nn.Module, layers: dict[str, Any], mined: list[Mined], config: RealEraConfig
) -> list[float]:
    """Stage 3 in ESD's loop: target / neighbour conditionings aligned to the mapped prompt, beyond ones kept."""
    dtype, device = pipe.unet.dtype, pipe.unet.device
    cast = {"dtype": dtype, "device": device}
    conds = torch.stack([m.cond for m in mined]).to(**cast)  # [K, L, D]: what x_t is sampled with
    params = {f"{n}.{ab}": getattr(layer, f"lora_{ab}")["default"].weight
              for n, layer in layers.items() for ab in ("A", "B")}  # fmt: skip
    seen = [0] * len(mined)

    def loss(k: int, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m, j = mined[k], seen[k]
        seen[k] += 1
        c = (
            m.cond
            if j % (1 + m.neighbours.shape[0]) == 0
            else m.neighbours[j % (1 + m.neighbours.shape[0]) - 1]
        )
        rows = [c.to(**cast)[None]]
        want_rows = [m.mapped.to(**cast)[None]]
        if m.beyond.shape[0] and config.beyond_weight > 0:
            b = m.beyond[j % m.beyond.shape[0]].to(**cast)[None]
            rows, want_rows = rows + [b], want_rows + [b]
        with torch.no_grad():
            want = predict_noise(pipe.unet, x_t.expand(len(rows), -1, -1, -1), t, torch.cat(want_rows))
        pred = predict_noise(adapted, x_t.expand(len(rows), -1, -1, -1), t, torch.cat(rows))
        out = F.mse_loss(pred[:1], want[:1])
        return out + config.beyond_weight * F.mse_loss(pred[1:], want[1:]) if len(rows) > 1 else out

    return diffusion_loop(pipe, params, conds, loss, config, "realera")


register(
    "realera",
    RealEraConfig,
    presets={
        # MACE's per-type closed-form settings (configs/art/erase_art_100.yaml, configs/object/erase_*.yaml) and
        # LoRA learning rates; RealEra's own values were not recovered.
        "paper": {
            "style": {
                "mapping": "art",
                "templates": STYLE_TEMPLATES,
                "lamb": 0.0,
                "preserve_scale": 1e-8,
                "domain_scale": 8e-4,
                "lr": 1e-4,
            },
            "object": {"mapping": "sky", "templates": OBJECT_TEMPLATES, "lamb": 100.0, "lr": 1e-5},
            "nsfw": {
                "mapping": "a person wearing clothes",
                "templates": OBJECT_TEMPLATES,
                "lamb": 0.0,
                "preserve_scale": 4.9e-13,
                "lr": 1e-5,
            },
        },
        "closed-form": {"iterations": 0},
    },  # fmt: skip
    strength=Strength("lamb", (1e5, 1e4, 1e3, 100.0, 0.0)),
    summary="RealEra (paper-level): mined neighbour concepts remapped in closed form, beyond concepts kept, "
    "then a merged LoRA aligning the noise prediction",
)(erase_realera)
