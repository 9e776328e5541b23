"""What HiRM trains on: the prompts, where the loss looks (a forward hook), and the misdirection targets.

Shapes: ``B`` prompts in a batch, ``N`` the tokenizer's padded length (77), ``L <= N`` the positions actually
run, ``d`` the encoder width. Targets are drawn and computed on the CPU/frozen encoder before any update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.methods.hirm.config import HirmConfig
from erasekit.models.families import attention_out_path, block_path, clip_core, clip_prefix

NUDITY_CONCEPTS = ("nudity",)


class _StopForward(Exception):
    """Raised by the supervision hook to skip the layers after the supervision point."""


@dataclass(frozen=True)
class Prompts:
    """The concept prompts of one run.

    Attributes:
        texts: every prompt trained toward a target (concept, its synonyms, their templates).
        owners: index into the concept list for each prompt.
        anchors: each prompt with the HiRM-S anchor in place of the concept (``None`` without an anchor).
    """

    texts: tuple[str, ...]
    owners: tuple[int, ...]
    anchors: tuple[str, ...] | None


def concept_prompts(concepts: Sequence[str], config: HirmConfig) -> Prompts:
    """Expand concepts into prompts: each name (concept, then synonyms), then each template of each name.

    For type ``nsfw`` the concept ``nudity`` is trained as ``config.nudity_prompt`` (the released code's string).
    """
    if config.synonyms and len(concepts) > 1:
        raise ErasekitError("synonyms apply to a single concept; erase one concept at a time to use them")
    texts, owners, anchors = [], [], []
    for k, concept in enumerate(concepts):
        is_nudity = config.concept_type == "nsfw" and concept.strip().lower() in NUDITY_CONCEPTS
        for name in (config.nudity_prompt if is_nudity else concept, *config.synonyms):
            for form in ("{}", *config.templates):
                texts.append(form.replace("{}", name))
                anchors.append(form.replace("{}", config.anchor or ""))
                owners.append(k)
    return Prompts(tuple(texts), tuple(owners), tuple(anchors) if config.anchor else None)


def supervision_point(encoder: torch.nn.Module, spec: str) -> str:
    """Qualified name of the module whose output the loss reads (``attn_out:N``, ``block:N``, ``last_hidden_state``)."""
    if spec == "last_hidden_state":
        return f"{clip_prefix(encoder)}final_layer_norm"
    kind, index = spec.split(":")
    return attention_out_path(encoder, int(index)) if kind == "attn_out" else block_path(encoder, int(index))


def padded_length(encoder: torch.nn.Module, tokenizer: Any) -> int:
    """The padded prompt length ``N``: the tokenizer's ``model_max_length`` (77 for every SD encoder)."""
    positions = clip_core(encoder).config.max_position_embeddings
    return min(int(tokenizer.model_max_length), positions)


def tokenize(tokenizer: Any, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, N)`` padded and truncated to ``length``, and the tokenizer's real-token mask ``(B, N)``.

    As SD pipelines do, the ids go to the encoder without an attention mask; the mask only marks padding.
    """
    if tokenizer is None:
        raise ErasekitError("the model has a CLIP text encoder without its tokenizer")
    enc = tokenizer(
        list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return enc.input_ids, enc.attention_mask.bool()


def supervised_forward(
    encoder: torch.nn.Module, input_ids: torch.Tensor, point: str, stop_early: bool = True
) -> torch.Tensor:
    """Run the encoder on ``input_ids`` ``(B, L)`` and return the output of module ``point``, ``(B, L, d)``.

    A removable forward hook reads the activation. With ``stop_early`` the hook then aborts the forward: the
    layers after the supervision point (for HiRM's default, the last block's MLP and the final LayerNorm)
    cannot change the loss, so they are not run. The returned tensor is identical either way.
    """
    return forward_points(encoder, input_ids, (point,), stop_early)[0]


def forward_points(
    encoder: torch.nn.Module, input_ids: torch.Tensor, points: Sequence[str], stop_early: bool = True
) -> list[torch.Tensor]:
    """The outputs ``(B, L, d)`` of the modules ``points`` (distinct names) in one forward, in that order.

    With ``stop_early`` the forward is aborted once the last of them has been read.
    """
    captured: dict[str, torch.Tensor] = {}

    def reader(name: str) -> Any:
        def read_output(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[name] = output[0] if isinstance(output, tuple) else output
            if stop_early and len(captured) == len(points):
                raise _StopForward

        return read_output

    handles = [encoder.get_submodule(p).register_forward_hook(reader(p)) for p in points]
    try:
        clip_core(encoder)(input_ids=input_ids.to(_device(encoder)))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [captured[p] for p in points]


@torch.no_grad()
def frozen_activations(
    encoder: torch.nn.Module, tokenizer: Any, texts: Sequence[str], point: str, length: int
) -> torch.Tensor:
    """The current encoder's activations at ``point`` for ``texts``, padded to ``length``: ``(B, N, d)``, CPU."""
    ids, _ = tokenize(tokenizer, texts, length)
    return supervised_forward(encoder, ids, point).float().cpu()


def random_targets(
    num: int,
    length: int,
    width: int,
    seed: int,
    coefficient: float | Sequence[float],
    distribution: str = "uniform",
) -> torch.Tensor:
    """HiRM-R targets ``(num, N, d)``: a draw ``U`` from a CPU generator seeded with ``seed``, then ``U / ||U||_F * c``.

    Each slice is normalised on its own and scaled by its own ``c`` (one float for all, or one per slice).
    ``distribution``: ``uniform`` (``rand``: the paper's; slice 0 equals the released code's
    ``torch.manual_seed(seed); torch.rand(1, N, d)``, drawn here on the CPU so the target does not depend on
    the device), ``centered`` (``rand - 0.5``) or ``gaussian`` (``randn``): the last two are zero-mean, so
    the target points in a different direction at every position.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if distribution == "gaussian":
        u = torch.randn(num, length, width, generator=gen)
    else:
        u = torch.rand(num, length, width, generator=gen)
        u = u - 0.5 if distribution == "centered" else u
    scales = [float(coefficient)] * num if isinstance(coefficient, (int, float)) else list(coefficient)
    return torch.stack([u[k] / u[k].norm() * scales[k] for k in range(num)])


def nudity_vector(encoder: torch.nn.Module, tokenizer: Any, point: str, length: int) -> torch.Tensor:
    """Mean over :data:`~erasekit.methods.nudity_pairs.NUDITY_PAIRS` of ``rep(with) - rep(without)``: ``(N, d)``."""
    from erasekit.methods.nudity_pairs import NUDITY_PAIRS

    with_, without = zip(*NUDITY_PAIRS)
    diff = frozen_activations(encoder, tokenizer, with_, point, length)
    diff -= frozen_activations(encoder, tokenizer, without, point, length)
    return diff.mean(0)


def concept_targets(
    encoder: torch.nn.Module, tokenizer: Any, prompts: Prompts, config: HirmConfig, point: str, length: int
) -> torch.Tensor:
    """One target per prompt, ``(B, N, d)``; all prompts of one concept share their concept's target (R).

    - ``random``: :func:`random_targets`, one per concept.
    - ``semantic`` with an anchor: ``c * rep(anchor prompt)`` from the frozen encoder.
    - ``semantic`` without one (nsfw): safe misdirection, ``c * (rep(prompt) - eta * nudity_vector)``.
    """
    if config.target == "random":
        width = clip_core(encoder).config.hidden_size
        num = max(prompts.owners) + 1
        scale = _coefficients(encoder, tokenizer, prompts, config, point, length, num)
        targets = random_targets(num, length, width, config.seed, scale, config.target_distribution)
        return targets[list(prompts.owners)]
    if prompts.anchors is not None:
        return config.coefficient * frozen_activations(encoder, tokenizer, prompts.anchors, point, length)
    reps = frozen_activations(encoder, tokenizer, prompts.texts, point, length)
    return config.coefficient * (reps - config.eta * nudity_vector(encoder, tokenizer, point, length))


def _coefficients(
    encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: Prompts,
    config: HirmConfig,
    point: str,
    length: int,
    num: int,
) -> float | list[float]:
    """The random targets' norms: ``c`` (absolute), or per concept ``c * ||rep(concept)||_F`` (relative), where
    ``rep`` is the frozen activation ``(N, d)`` of the concept's first prompt (its bare name)."""
    if config.coefficient_mode == "absolute":
        return config.coefficient
    first = [prompts.texts[prompts.owners.index(k)] for k in range(num)]
    reps = frozen_activations(encoder, tokenizer, first, point, length)  # (num, N, d)
    return [config.coefficient * float(r.norm()) for r in reps]


def position_weights(real: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Loss weights ``(B, N)`` from the real-token mask, or ``None`` for ``all`` (a plain mean, as the paper).

    ``no_bos`` drops position 0, identical for every prompt under causal attention; ``content`` also drops the
    padding after the first end-of-text token (which itself stays: it carries the pooled vector).
    """
    if mode == "all":
        return None
    weights = real.float() if mode == "content" else torch.ones(real.shape)
    weights[:, 0] = 0.0
    return weights


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
