"""Shared pieces of the closed-form cross-attention editors (UCE, RECE, SPEED, MACE's refinement stage).

Text embeddings are what the UNet cross-attends to: the pipeline's own ``encode_prompt`` output (SD1.x/SD2.x:
the text encoder's ``last_hidden_state`` after the final LayerNorm; SDXL: both encoders' penultimate states
concatenated, 2048 wide). A concept's vector ``c`` is its **last token's** row: position ``n`` for a prompt of
``n`` BPE tokens (position 0 is BOS, so the empty prompt's last token is BOS).

All solves run in float64 on the CPU and the results are cast back to the layer's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from erasekit.denoising import encode_prompts
from erasekit.methods.common import attn2_linears, check_choice
from erasekit.patch import Patch

PROJECTIONS = ("to_k", "to_v")


def check_family(model: Any, method: str) -> Any:
    """The pipeline of ``model``, or an error when ``method`` does not support its family."""
    return model.require_capability("cross_attention_edit", method)


def check_projections(projections: Sequence[str]) -> None:
    if not projections:
        raise ValueError("projections must name at least one of to_k, to_v")
    for p in projections:
        check_choice("projection", p, PROJECTIONS)


def n_tokens(pipe: Any, prompt: str) -> int:
    """How many BPE tokens ``prompt`` has between BOS and EOS (truncated to fit 77)."""
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    return len(ids) - 2


@torch.no_grad()
def sequence_embeddings(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``[B, 77, D]`` conditioning of each prompt, float64 on the CPU."""
    return encode_prompts(pipe, list(prompts)).to("cpu", torch.float64)


def last_token_embeddings(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``[B, D]``: each prompt's last-token row of :func:`sequence_embeddings` (BOS for ``""``)."""
    if not prompts:
        return torch.zeros(0, 0, dtype=torch.float64)
    seq = sequence_embeddings(pipe, prompts)
    idx = torch.tensor([n_tokens(pipe, p) for p in prompts])
    return seq[torch.arange(len(prompts)), idx]


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
) -> torch.Tensor:
    """W* = (λ W₀ + Σ_k s_k V_kᵀ C_k)(λ I + Σ_k s_k C_kᵀ C_k)⁻¹: least squares with a pull toward W₀.

    It minimises λ‖W − W₀‖² + Σ_k s_k Σ_i ‖W c_ki − v_ki‖².

    Args:
        base: W₀ ``[out, D]``.
        lam: λ ≥ 0 (λ = 0 needs the inputs to span D).
        inputs: ``(C [n, D], V [n, out], s)`` triples: inputs, wanted outputs, scale.

    Returns:
        ``[out, D]`` float64.
    """
    d = base.shape[1]
    lhs = lam * base.clone()
    gram = lam * torch.eye(d, dtype=torch.float64)
    for c, v, s in inputs:
        if c.numel():
            lhs += s * v.T @ c
            gram += s * c.T @ c
    # W* gram = lhs  <=>  gram^T W*^T = lhs^T (gram is symmetric)
    return torch.linalg.solve(gram, lhs.T).T


def weight_patch(model: Any, layers: dict[str, nn.Linear], new: dict[str, torch.Tensor]) -> Patch:
    """A UNet patch from new float64 weights ``{module name: [out, D]}`` of ``layers``."""
    values = {f"{n}.weight": new[n].to(layers[n].weight.dtype) for n in new}
    return Patch.from_tensors(model, "unet", values)
