"""HiRM's training loop for one CLIP text encoder, and the parameter selection by module path.

The encoder is trained in place and restored exactly on exit from :func:`trained` (values, gradients and
``requires_grad`` flags), so a loaded model is never left modified; the patch is read inside the ``with``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError
from erasekit.methods._closed_form import world_kind_mates, world_other_kind
from erasekit.methods.hirm.config import HirmConfig
from erasekit.methods.hirm.targets import (
    concept_prompts,
    concept_targets,
    forward_points,
    frozen_activations,
    padded_length,
    position_weights,
    supervision_point,
    tokenize,
)
from erasekit.models.families import block_linear_names, block_path, clip_prefix, token_embedding_path
from erasekit.progress import track


def trainable_modules(encoder: torch.nn.Module, config: HirmConfig) -> list[str]:
    """Qualified names of the modules whose parameters HiRM trains, from the family layout helpers."""
    names: list[str] = []
    for block in config.blocks:
        names += block_linear_names(encoder, block, config.parts) if config.parts else []
        if config.train_layernorm:
            names += [f"{block_path(encoder, block)}.layer_norm{i}" for i in (1, 2)]
    if config.train_embeddings:
        names += [token_embedding_path(encoder), f"{clip_prefix(encoder)}embeddings.position_embedding"]
    return names


def trainable_names(encoder: torch.nn.Module, config: HirmConfig) -> list[str]:
    """Qualified parameter names (weights and biases) of :func:`trainable_modules`, in that order, once each
    (``blocks=(0, -12)`` names one block twice in a 12-block encoder)."""
    names = [
        f"{module}.{name}"
        for module in trainable_modules(encoder, config)
        for name, _ in encoder.get_submodule(module).named_parameters(recurse=False)
    ]
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def training_only(encoder: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Make exactly ``names`` trainable; yield copies of their base values; restore everything on exit."""
    params = [encoder.get_parameter(n) for n in names]
    if any(p.dtype != torch.float32 for p in params):
        raise ErasekitError("HiRM trains in float32; load the model with dtype float32")
    flags = [(p, p.requires_grad) for p in encoder.parameters()]
    grads = [p.grad for p in params]
    base = {n: p.detach().clone() for n, p in zip(names, params)}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield base
    finally:
        with torch.no_grad():
            for n, p, g in zip(names, params, grads):
                p.copy_(base[n])
                p.grad = g
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass(frozen=True)
class Batch:
    """Everything one training step needs, built with the frozen encoder before training.

    Attributes:
        input_ids: ``(B, L)`` token ids: the concept prompts, then the retain prompts.
        targets: ``(B, L, d)`` per-prompt targets (retain rows: the frozen activations at ``preserve_point``).
        weights: ``(B, L)`` loss weights per position, or ``None`` for a plain mean over everything.
        point: qualified name of the supervised module.
        preserve_point: qualified name of the module the retain rows' loss reads (may be ``point``).
        num_concept: how many leading rows are concept prompts.
        preserve_weight: weight of the retain rows' loss.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor | None
    point: str
    num_concept: int
    preserve_weight: float
    preserve_point: str = ""

    @property
    def points(self) -> tuple[str, ...]:
        """The modules one training forward reads: the supervision point, then the preservation point."""
        if self.preserve_point in ("", self.point) or self.num_concept == self.input_ids.shape[0]:
            return (self.point,)
        return (self.point, self.preserve_point)

    def loss(self, act: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Misdirection MSE of ``act`` over the concept rows, plus the weighted preservation MSE over the retain
        rows of ``kept`` (the activations at ``preserve_point``; ``act`` when it is the same point)."""
        n = self.num_concept
        kept = act if kept is None else kept
        loss = _mse(act[:n], self.targets[:n], None if self.weights is None else self.weights[:n])
        if n < act.shape[0]:
            retain = _mse(kept[n:], self.targets[n:], None if self.weights is None else self.weights[n:])
            loss = loss + self.preserve_weight * retain
        return loss


def _mse(act: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``mse_loss`` when ``weights`` is ``None``, else the mean squared error over weighted positions."""
    if weights is None:
        return F.mse_loss(act, target)
    sq = (act - target).pow(2).sum(-1)  # (B, L)
    return (sq * weights).sum() / (weights.sum() * act.shape[-1])


def world_prompts(concepts: Sequence[str], config: HirmConfig) -> tuple[str, ...]:
    """What ``world_retain`` adds for ``concepts``: the MiniCanvas kind-mates (none of the concepts among them)
    and, with ``"all"``, the concepts of the other kind."""
    mates = world_kind_mates(concepts) if config.world_retain != "none" else ()
    return mates + world_other_kind(concepts) if config.world_retain == "all" else mates


def retain_texts(concepts: Sequence[str], config: HirmConfig) -> tuple[str, ...]:
    """The preserved prompts: ``retain_prompts``, then :func:`world_prompts`, then (``preserve_unconditional``)
    ``""``; each once, in that order."""
    mates = world_prompts(concepts, config)
    empty = ("",) if config.preserve_unconditional else ()
    return tuple(dict.fromkeys((*config.retain_prompts, *mates, *empty)))


def build_batch(
    encoder: torch.nn.Module, tokenizer: Any, concepts: Sequence[str], config: HirmConfig
) -> Batch:
    """Tokenize the prompts, compute the targets, and cut the sequence to the positions the loss needs.

    With ``loss_positions="content"`` only positions up to the longest prompt's end-of-text token count;
    attention is causal, so the positions after it cannot change them and are not run (``L < N``).
    """
    prompts = concept_prompts(concepts, config)
    point = supervision_point(encoder, config.supervision)
    length = padded_length(encoder, tokenizer)
    retain = retain_texts(concepts, config)
    ids, real = tokenize(tokenizer, prompts.texts + retain, length)
    targets = concept_targets(encoder, tokenizer, prompts, config, point, length)
    keep_point = supervision_point(encoder, config.preserve_at) if config.preserve_at else point
    if retain:
        kept = frozen_activations(encoder, tokenizer, retain, keep_point, length)
        targets = torch.cat([targets, kept])
    run = int(real.sum(1).max()) if config.loss_positions == "content" else length
    weights = position_weights(real, config.loss_positions)
    device = next(encoder.parameters()).device
    return Batch(
        input_ids=ids[:, :run].to(device),
        targets=targets[:, :run].to(device),
        weights=None if weights is None else weights[:, :run].to(device),
        point=point,
        num_concept=len(prompts.texts),
        preserve_weight=config.preserve_weight,
        preserve_point=keep_point,
    )


@dataclass(frozen=True)
class TrainResult:
    """What :func:`trained` yields: trained parameter names, their base values, and the loss per step."""

    names: list[str]
    base: dict[str, torch.Tensor]
    losses: list[float]


@contextlib.contextmanager
def trained(
    encoder: torch.nn.Module, tokenizer: Any, concepts: Sequence[str], config: HirmConfig, desc: str = "hirm"
) -> Iterator[TrainResult]:
    """Train ``encoder`` in place with HiRM; inside the ``with`` it holds the trained values, after it the base.

    One step: forward to the supervision point (the hook stops the forward there), the loss of
    :meth:`Batch.loss`, backward, and one AdamW step, in fp32.
    """
    batch = build_batch(encoder, tokenizer, concepts, config)
    names = trainable_names(encoder, config)
    with training_only(encoder, names) as base:
        params = [encoder.get_parameter(n) for n in names]
        opt = torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        losses = []
        for _ in track(range(config.steps), desc=desc, total=config.steps):
            loss = batch.loss(*forward_points(encoder, batch.input_ids, batch.points))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        yield TrainResult(names, base, losses)
