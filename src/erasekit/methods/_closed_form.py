"""Shared pieces of the closed-form cross-attention editors (UCE, RECE, SPEED, MACE's refinement stage).

Text embeddings are what the UNet cross-attends to: the pipeline's own ``encode_prompt`` output (SD1.x/SD2.x:
the text encoder's ``last_hidden_state`` after the final LayerNorm; SDXL: both encoders' penultimate states
concatenated, 2048 wide). Every prompt is padded to the tokenizer's length L (77). A prompt of ``n`` BPE tokens
has BOS at row 0, its tokens at rows 1..n, the first EOS at row n + 1 and padding after; its **last token** is
row ``n`` (the authors' ``attention_mask.sum() - 2``), so the empty prompt's last token is BOS.

All solves run in float64 on the CPU and the results are cast back to the layer's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from erasekit.denoising import encode_prompts
from erasekit.methods.common import attn2_linears, check_choice
from erasekit.patch import Patch

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

PROJECTIONS = ("to_k", "to_v")
CHUNK = 256  # prompts encoded per call when summing Gram matrices over many prompts


def check_family(model: LoadedModel, method: str) -> Any:
    """The pipeline of ``model``, or an error when ``method`` does not support its family."""
    return model.require_capability("cross_attention_edit", method)


def check_projections(projections: Sequence[str]) -> None:
    if not projections:
        raise ValueError("projections must name at least one of to_k, to_v")
    for p in projections:
        check_choice("projection", p, PROJECTIONS)


def token_ids(pipe: Any, prompt: str) -> list[int]:
    """BOS, the BPE tokens of ``prompt`` and EOS, unpadded (truncated to fit L)."""
    return pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids


def n_tokens(pipe: Any, prompt: str) -> int:
    """How many BPE tokens ``prompt`` has between BOS and EOS: the row of its last token."""
    return len(token_ids(pipe, prompt)) - 2


@torch.no_grad()
def sequence_embeddings(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``[B, L, D]`` conditioning of each prompt, float64 on the CPU."""
    return encode_prompts(pipe, list(prompts)).to("cpu", torch.float64)


def last_token_embeddings(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``[B, D]``: each prompt's last-token row of :func:`sequence_embeddings` (BOS for ``""``)."""
    if not prompts:
        return torch.zeros(0, 0, dtype=torch.float64)
    rows = []
    for i in range(0, len(prompts), CHUNK):  # the authors' lists run to 1734 names
        part = prompts[i : i + CHUNK]
        seq = sequence_embeddings(pipe, part)
        rows.append(seq[torch.arange(len(part)), torch.tensor([n_tokens(pipe, p) for p in part])])
    return torch.cat(rows)


def all_rows(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``[B * L, D]``: every row of every prompt (BOS, tokens, EOS and padding)."""
    seq = sequence_embeddings(pipe, prompts)
    return seq.reshape(-1, seq.shape[-1])


def gram(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``Σ c cᵀ`` ``[D, D]`` over all L rows of every prompt, encoded ``CHUNK`` prompts at a time."""
    total = None
    for i in range(0, len(prompts), CHUNK):
        rows = all_rows(pipe, prompts[i : i + CHUNK])
        total = rows.T @ rows if total is None else total + rows.T @ rows
    if total is None:
        raise ValueError("gram needs at least one prompt")
    return total


def kv_layers(unet: nn.Module, projections: Sequence[str]) -> dict[str, nn.Linear]:
    """``{module name: Linear}`` of the cross-attention projections to edit (e.g. every attn2 ``to_v``)."""
    return {name: unet.get_submodule(name) for name in attn2_linears(unet, tuple(projections))}


def weights64(layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """``{module name: W [out, D]}`` in float64 on the CPU."""
    return {n: m.weight.detach().to("cpu", torch.float64) for n, m in layers.items()}


def ridge_edit(
    base: torch.Tensor,
    lam: float,
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """W* = (λ W₀ + Σ_k s_k V_kᵀ C_k + W₀ K)(λ I + Σ_k s_k C_kᵀ C_k + K)⁻¹: least squares with a pull toward W₀.

    It minimises λ‖W − W₀‖² + Σ_k s_k Σ_i ‖W c_ki − v_ki‖² + Σ_j ‖(W − W₀) k_j‖².

    Args:
        base: W₀ ``[out, D]``.
        lam: λ ≥ 0; with λ = 0 the inverse is a pseudo-inverse (directions the inputs miss keep W* at 0).
        inputs: ``(C [n, D], V [n, out], s)`` triples: inputs, wanted outputs, scale.
        keep: an optional weighted Gram ``K = Σ_j k_j k_jᵀ`` ``[D, D]`` of inputs whose outputs under W₀ are kept
            (MACE's caches).

    Returns:
        ``[out, D]`` float64.
    """
    d = base.shape[1]
    lhs = lam * base.clone()
    rhs = lam * torch.eye(d, dtype=torch.float64)
    for c, v, s in inputs:
        if c.numel():
            lhs += s * v.T @ c
            rhs += s * c.T @ c
    if keep is not None:
        lhs += base @ keep
        rhs += keep
    if lam == 0:  # the final LayerNorm can leave a direction no embedding reaches: a least-squares solution
        return lhs @ torch.linalg.pinv(rhs, hermitian=True)
    # W* rhs = lhs  <=>  rhs^T W*^T = lhs^T (rhs is symmetric)
    return torch.linalg.solve(rhs, lhs.T).T


def weight_patch(model: LoadedModel, layers: dict[str, nn.Linear], new: dict[str, torch.Tensor]) -> Patch:
    """A UNet patch from new float64 weights ``{module name: [out, D]}`` of ``layers``."""
    values = {f"{n}.weight": new[n].to(layers[n].weight.dtype) for n in new}
    return Patch.from_tensors(model, "unet", values)


def _world_kinds(concepts: Sequence[str]) -> tuple[tuple, tuple, set[str]] | None:
    """(the concepts' MiniCanvas kind, the other kind, the erased names), or ``None`` unless every one of
    ``concepts`` is a MiniCanvas concept (canonical name, case-insensitive) and all are of one kind."""
    from erasekit.minicanvas.world import OBJECTS, STYLES

    by_name = {c.name: c for c in OBJECTS + STYLES}
    found = [by_name.get(c.strip().lower()) for c in concepts]
    if not found or None in found or len({c.kind for c in found}) != 1:
        return None
    own, other = (OBJECTS, STYLES) if found[0].kind == "object" else (STYLES, OBJECTS)
    return own, other, {c.name for c in found}


def world_kind_mates(concepts: Sequence[str]) -> tuple[str, ...]:
    """The other MiniCanvas concepts of the concepts' kind, or ``()`` unless all are MiniCanvas concepts of one kind.

    This is how the methods substitute the authors' long lists of same-kind concepts (1734 artists, 1352
    instances) on MiniCanvas: the method sees only the concept strings, so a concept counts as MiniCanvas's
    when its canonical name (case-insensitive) is one of the world's.
    """
    kinds = _world_kinds(concepts)
    if kinds is None:
        return ()
    own, _, erased = kinds
    return tuple(c.name for c in own if c.name not in erased)


def world_other_kind(concepts: Sequence[str]) -> tuple[str, ...]:
    """The MiniCanvas concepts of the *other* kind (styles for objects, objects for styles), under the same
    condition as :func:`world_kind_mates`: every one of ``concepts`` a MiniCanvas concept of one kind."""
    kinds = _world_kinds(concepts)
    return () if kinds is None else tuple(c.name for c in kinds[1])
