"""``prompt_gate``: SPM's Facilitated Transport, a per-prompt scale of an artifact's adapters.

s(p) = max over the erased prompts e of max(cos(flat E_p, flat E_e), |T_p ∩ T_e| / |T_e|), E the text encoder's
``[L, D]`` output and T the token ids less the special ones (Con6924/SPM, ``infer_spm.py``,
``calculate_matching_score`` with ``clipcos_tokenuni``). The gated adapters run at ``s ** exponent``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.hooks import Gate, HookKind, register_hook_kind

METRICS = ("clipcos", "tokenuni", "clipcos_tokenuni")


@dataclass(frozen=True, kw_only=True)
class PromptGateConfig:
    """Facilitated Transport: scale the gated adapters by s(p)^exponent for the prompt p of each image."""

    prompts: tuple[str, ...] = field(metadata={"help": "the erased prompts s is measured against"})
    metric: str = field(
        default="clipcos_tokenuni",
        metadata={
            "help": f"s: {', '.join(METRICS)} (cosine of flattened embeddings, token overlap, their max)"
        },
    )
    exponent: int = field(
        default=1, metadata={"help": "adapters scaled by s**exponent (the release scales both factors: 2)"}
    )
    unet: str = field(default="unet", metadata={"help": "the denoiser component"})
    text_encoder: str = field(default="text_encoder", metadata={"help": "the text encoder component"})
    tokenizer: str = field(default="tokenizer", metadata={"help": "the tokenizer component"})

    def __post_init__(self) -> None:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError("prompt_gate needs non-empty erased prompts")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.exponent not in (1, 2):
            raise ValueError(f"exponent must be 1 or 2, got {self.exponent}")


@dataclass(frozen=True)
class Targets:
    """The erased prompts as the live text encoder sees them.

    Attributes:
        embeds: ``[n, L·D]`` float32 flattened ``last_hidden_state`` rows.
        tokens: per prompt, its token ids less the special ones.
        special: the tokenizer's special token ids.
    """

    embeds: torch.Tensor
    tokens: tuple[frozenset[int], ...]
    special: frozenset[int]


def encode_targets(tokenizer: Any, encoder: nn.Module, prompts: Sequence[str]) -> Targets:
    """Tokenize (padded to the encoder's context) and encode ``prompts``, as SD1.x pipelines do."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        embeds = encoder(ids.to(encoder.device))[0]  # [n, L, D]
    special = frozenset(int(i) for i in tokenizer.all_special_ids)
    tokens = tuple(frozenset(int(i) for i in row.tolist()) - special for row in ids)
    if any(not t for t in tokens):
        raise ErasekitError("an erased prompt has no ordinary tokens, so its token overlap is undefined")
    return Targets(embeds.detach().flatten(1).float().cpu(), tokens, special)


def permeability(ids: torch.Tensor | None, embeds: torch.Tensor, targets: Targets, metric: str) -> float:
    """s(p) = max over erased prompts e of max(cos(flat E_p, flat E_e), |T_p ∩ T_e| / |T_e|) (``metric`` picks).

    Args:
        ids: ``[L]`` the prompt's token ids, or ``None`` when unknown (conditioning given as embeddings: the token
            overlap then counts as 0).
        embeds: ``[L, D]`` the prompt's encoder output.
    """
    scores = []
    if "clipcos" in metric:
        flat = embeds.detach().flatten().float().cpu()
        scores.append(torch.nn.functional.cosine_similarity(flat.unsqueeze(0), targets.embeds, dim=-1))
    if "tokenuni" in metric:
        own = frozenset(int(i) for i in ids.tolist()) - targets.special if ids is not None else frozenset()
        scores.append(torch.tensor([len(own & t) / len(t) for t in targets.tokens]))
    return float(torch.stack(scores).max())


def row_key(row: torch.Tensor) -> str:
    """A digest of one row's dtype, shape and bytes: finds the encoder's output again among the UNet's inputs."""
    t = row.detach().contiguous().cpu()
    return hashlib.sha256(
        f"{t.dtype}|{tuple(t.shape)}|".encode() + t.view(torch.uint8).numpy().tobytes()
    ).hexdigest()


class PromptGateState:
    """The hooks of one prompt gate. Kept per install, so two gated artifacts never share state.

    - text encoder, forward hook: for each encoded row, s(p) from its token ids and output, by :func:`row_key`;
    - UNet, forward pre-hook: s of each row of ``encoder_hidden_states`` (a row never encoded here, e.g. learned
      conditioning passed as embeddings, gets the cosine part alone). When the batch's two halves hold the same
      latents it is a classifier-free-guidance batch, unconditional half first (diffusers' pipelines and
      :mod:`erasekit.denoising` lay it out so): both halves take the conditional row's s, as the release loads one
      multiplier per prompt for the whole call. The gate is ``s ** exponent``;
    - UNet, forward hook (always called): the gate goes back to ``None``.
    """

    MAX_ROWS = 4096

    def __init__(self, targets: Targets, config: PromptGateConfig, gate: Gate) -> None:
        self.targets, self.config, self.gate = targets, config, gate
        self.scores: OrderedDict[str, float] = OrderedDict()
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (conditioning, its version, s [N])

    def on_text(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        out = output[0]  # [B, L, D] last_hidden_state
        for row_ids, row in zip(ids, out):
            key = row_key(row)
            self.scores[key] = permeability(row_ids, row, self.targets, self.config.metric)
            self.scores.move_to_end(key)
        while len(self.scores) > self.MAX_ROWS:
            self.scores.popitem(last=False)

    def row_scores(self, cond: torch.Tensor) -> torch.Tensor:
        """``[N]`` s of each conditioning row ``cond`` ``[N, L, D]`` (cached while the same tensor comes back)."""
        if self._last is not None and self._last[0] is cond and self._last[1] == cond._version:
            return self._last[2]
        s = []
        for row in cond:
            key = row_key(row)
            s.append(
                self.scores[key]
                if key in self.scores
                else permeability(None, row, self.targets, self.config.metric)
            )
        scores = torch.tensor(s, dtype=torch.float32)
        self._last = (cond, cond._version, scores)
        return scores

    def on_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        cond = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        s = self.row_scores(cond)
        n = s.shape[0]
        if n % 2 == 0 and n > 0 and torch.equal(sample[: n // 2], sample[n // 2 :]):
            s = s[n // 2 :].repeat(2)  # the conditional half's s for both halves of each image
        self.gate.value = (s**self.config.exponent).to(sample.device)

    def after_unet(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.gate.value = None


def _gate_attach_points(config: PromptGateConfig) -> tuple[str, ...]:
    return (config.unet, config.text_encoder)


def _install_prompt_gate(components: Mapping[str, Any], config: PromptGateConfig, gate: Gate) -> list[Any]:
    for name in (config.unet, config.text_encoder, config.tokenizer):
        if components.get(name) is None:
            raise ErasekitError(f"the prompt gate needs component {name!r}, which the model does not have")
    encoder, unet = components[config.text_encoder], components[config.unet]
    state = PromptGateState(
        encode_targets(components[config.tokenizer], encoder, config.prompts), config, gate
    )
    handles: list[Any] = []
    try:
        handles.append(encoder.register_forward_hook(state.on_text, with_kwargs=True))
        handles.append(unet.register_forward_pre_hook(state.on_unet, with_kwargs=True))
        handles.append(unet.register_forward_hook(state.after_unet, always_call=True))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


register_hook_kind(HookKind("prompt_gate", PromptGateConfig, _gate_attach_points, _install_prompt_gate,
                            modifies=False, summary="SPM's Facilitated Transport: per-prompt adapter scale"))  # fmt: skip
