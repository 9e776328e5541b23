"""Text-space drift: how far an erasure moved the text encoder's output, per prompt group.

For each CLIP text encoder of the model and each prompt, the base and erased encoders' last hidden states are
compared token by token, over the prompt's real tokens (BOS through the first EOS; padding is ignored), and the
cosine similarities are averaged: first over tokens, then over the group's prompts. A successful targeted erasure
gives a low similarity on ``target`` (and ``synonym``) prompts and about 1.0 on ``retain`` prompts. It needs no
generation, so it is cheap and works on any model, including text-encoder-only folders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from erasekit.errors import ErasekitError

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


@torch.no_grad()
def encode_tokens(encoder: Any, tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states and a mask of the real tokens.

    Returns:
        ``(hidden [P, L, D] float32, mask [P, L] bool)``: ``mask`` is true from BOS through the first EOS.
    """
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # [P, L]
    device = next(encoder.parameters()).device
    hidden = encoder(ids.to(device)).last_hidden_state.float().cpu()  # [P, L, D]
    is_eos = ids == tokenizer.eos_token_id
    first_eos = torch.where(
        is_eos.any(1), is_eos.int().argmax(1), torch.full((ids.shape[0],), ids.shape[1] - 1)
    )
    mask = torch.arange(ids.shape[1])[None, :] <= first_eos[:, None]  # [P, L]
    return hidden, mask


def token_cosine(base: torch.Tensor, erased: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-prompt mean cosine over real tokens.

    Args:
        base: ``[P, L, D]``.
        erased: ``[P, L, D]``.
        mask: ``[P, L]`` bool.

    Returns:
        ``[P]``.
    """
    cos = torch.nn.functional.cosine_similarity(base, erased, dim=-1)  # [P, L]
    return (cos * mask).sum(1) / mask.sum(1)


def text_drift(model: LoadedModel, patch: Any | None, groups: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Cosine similarity between the base and the patched encoders, per prompt group and encoder.

    Args:
        model: a :class:`~erasekit.models.loading.LoadedModel` (unpatched).
        patch: the patch to measure (applied inside, removed after), or ``None`` (similarity 1 everywhere).
        groups: ``{"target": [...], "synonym": [...], "retain": [...]}``; empty groups are skipped.

    Returns:
        ``{"cosine": {group: mean over encoders}, "per_encoder": {encoder: {group: cosine}}, "prompts": counts}``.
    """
    groups = {g: list(p) for g, p in groups.items() if p}
    if not groups:
        raise ErasekitError("text drift needs at least one prompt")
    per_encoder: dict[str, dict[str, float]] = {}
    for name, encoder, tokenizer in model.clip_encoders():
        if tokenizer is None:
            raise ErasekitError(f"{model.source} has no tokenizer for {name}")
        base = {g: encode_tokens(encoder, tokenizer, p) for g, p in groups.items()}
        ctx = patch.applied(model) if patch is not None else contextlib.nullcontext()
        with ctx:
            erased = {g: encode_tokens(encoder, tokenizer, p)[0] for g, p in groups.items()}
        per_encoder[name] = {g: float(token_cosine(base[g][0], erased[g], base[g][1]).mean()) for g in groups}
    cosine = {g: sum(e[g] for e in per_encoder.values()) / len(per_encoder) for g in groups}
    return {"cosine": cosine, "per_encoder": per_encoder, "prompts": {g: len(p) for g, p in groups.items()}}
