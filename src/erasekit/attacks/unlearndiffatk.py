"""UnlearnDiffAtk (Zhang et al., ECCV 2024): k prefix tokens that make the erased model denoise the base image.

For each base prompt p:

1. x_tgt: the latents the BASE model (patch removed) generates for p with the run's first seed;
2. k prefix tokens, relaxed to rows w_j of the probability simplex over the ordinary vocabulary, enter the
   encoder as embeddings w_j · E (E the token table ``[V', D]``);
3. Adam (weight decay) minimises ‖ε − ε_θ′(√ᾱ_t x_tgt + √(1−ᾱ_t) ε, t, E([adv; p]))‖² on the ERASED model at a
   random t each step; after every step each w_j is projected back onto the simplex;
4. the tokens are the argmax of each w_j, and the attacked prompt is generated with exactly those tokens.

Reported as the authors do: prompts that succeed before the attack (``ASR_pre``), plus those that fail before
and succeed after (``ASR_post``), and their sum (``ASR``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.attacks import register_attack
from erasekit.attacks._denoise import denoise_loss, draws, fixed_draws, model_latents
from erasekit.attacks.base import (
    AttackResult,
    AttackTarget,
    Budget,
    Candidate,
    ordinary_tokens,
    placeholder_id,
    placeholder_rows,
    token_table,
    with_placeholders,
)
from erasekit.denoising import check_unet_family, encode_prompts
from erasekit.methods.common import frozen
from erasekit.progress import track

EVAL_DRAWS = 8  # fixed (t, ε) draws the loss is compared on before and after the attack


@dataclass(frozen=True, kw_only=True)
class UnlearnDiffAtkConfig(Budget):
    """UnlearnDiffAtk's budget; ``paper`` is the authors' (k = 5, 40 iterations, Adam lr 0.01, wd 0.1)."""

    tokens: int = field(default=5, metadata={"help": "k, adversarial prefix tokens"})
    iterations: int = field(default=40, metadata={"help": "optimisation steps per base prompt"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate on the simplex weights"})
    weight_decay: float = field(default=0.1, metadata={"help": "Adam weight decay"})
    draws: int = field(default=1, metadata={"help": "(t, noise) draws averaged per step (the authors: 1)"})
    discrete: bool = field(
        default=True, metadata={"help": "generate with the argmax tokens (else the relaxed rows)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.tokens <= 70 or self.iterations < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("need 1 <= tokens <= 70, iterations >= 1, lr > 0 and weight_decay >= 0")
        if self.draws < 1:
            raise ValueError("draws must be >= 1")


def project_simplex(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``w`` ``[k, V]`` onto the probability simplex (sort-based)."""
    u, _ = w.sort(dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    ranks = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=w.dtype)
    positive = (u - css / ranks) > 0  # [k, V], true up to the support size rho
    rho = (positive.to(w.dtype) * ranks).argmax(-1, keepdim=True)  # [k, 1], index of the last true
    theta = css.gather(-1, rho) / (rho + 1).to(w.dtype)  # [k, 1]
    return (w - theta).clamp_min(0.0)


class PrefixObjective:
    """The denoising loss of the erased model for one base prompt, as a function of the simplex weights."""

    def __init__(self, pipe: Any, prompt: str, x0: torch.Tensor, vocab: torch.Tensor, k: int) -> None:
        self.pipe, self.x0, self.vocab = pipe, x0, vocab
        self.prompt = with_placeholders(prompt, k)
        self.token = placeholder_id(pipe.tokenizer)

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings ``[k, D]`` = w ``[k, V']`` @ E[vocab] ``[V', D]``."""
        table = token_table(self.pipe.text_encoder)[self.vocab]
        return w.to(table.dtype) @ table

    def loss(self, rows: torch.Tensor, draw: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x_t, want, t = draw
        with placeholder_rows(self.pipe.text_encoder, self.token, rows):
            cond = encode_prompts(self.pipe, [self.prompt])  # [1, 77, D]
        return denoise_loss(self.pipe, x_t, want, t, cond)

    def mean_loss(self, rows: torch.Tensor, fixed: list[tuple[torch.Tensor, ...]]) -> float:
        with torch.no_grad():
            return sum(float(self.loss(rows, d)) for d in fixed) / len(fixed)


def random_onehot(k: int, n: int, g: torch.Generator) -> torch.Tensor:
    """``[k, n]`` rows, each the one-hot of a random token: the start of the search."""
    w = torch.zeros(k, n)
    w[torch.arange(k), torch.randint(0, n, (k,), generator=g)] = 1.0
    return w


def optimise(
    objective: PrefixObjective, w0: torch.Tensor, config: UnlearnDiffAtkConfig, g: torch.Generator
) -> tuple[torch.Tensor, list[float]]:
    """Projected Adam on the simplex weights ``[k, V']`` from ``w0``; returns them and each step's loss."""
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    for _ in range(config.iterations):
        x0 = objective.x0.expand(config.draws, -1, -1, -1)  # [draws, C, h, w], each with its own t and noise
        loss = objective.loss(objective.rows(w), draws(objective.pipe, x0, g))
        (grad,) = torch.autograd.grad(loss, w)
        w.grad = grad
        opt.step()
        with torch.no_grad():
            w.copy_(project_simplex(w))
        losses.append(float(loss.detach()))
    return w.detach(), losses


def attack_prompt(
    target: AttackTarget, pipe: Any, i: int, x0: torch.Tensor, vocab: torch.Tensor, config: UnlearnDiffAtkConfig,
    g: torch.Generator,
) -> tuple[Candidate, torch.Tensor, dict[str, Any], list[float]]:  # fmt: skip
    """Attack base prompt ``i`` (the model already erased); returns its candidate, ids ``[k]``, stats, losses."""
    prompt = target.prompts.positives[i]
    objective = PrefixObjective(pipe, prompt, x0, vocab, config.tokens)
    fixed = fixed_draws(pipe, x0, EVAL_DRAWS, config.seed + 1000 + i)
    w0 = random_onehot(config.tokens, len(vocab), g)
    before = objective.mean_loss(objective.rows(w0), fixed)
    w, losses = optimise(objective, w0, config, g)
    ids = vocab[w.argmax(-1)]  # [k]
    hard = token_table(pipe.text_encoder)[ids].detach().clone()  # [k, D]
    rows = hard if config.discrete else objective.rows(w).detach()
    stats = {"loss_before": before, "relaxed_loss_after": objective.mean_loss(objective.rows(w), fixed),
             "discrete_loss_after": objective.mean_loss(hard, fixed)}  # fmt: skip
    text = f"{pipe.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()} {prompt}"
    cand = Candidate(prompt=objective.prompt, group=i, embedding=rows, text=text)
    return cand, ids, stats, losses


def unlearndiffatk(target: AttackTarget, config: UnlearnDiffAtkConfig) -> AttackResult:
    """UnlearnDiffAtk: k simplex-relaxed prefix tokens minimising the erased model's loss on base-model images."""
    model = target.model
    pipe = check_unet_family(model, "unlearndiffatk")
    ps, seed0 = target.prompts, target.seeds[0]
    g = torch.Generator().manual_seed(config.seed)
    vocab = ordinary_tokens(pipe.tokenizer)
    x0 = model_latents(pipe, ps.positives, [seed0] * len(ps.positives), target.sampling)  # base model
    cands, ids, history, stats = [], [], {}, {}
    with target.erased(), frozen(pipe.unet, pipe.text_encoder):
        for i in track(range(len(ps.positives)), desc="unlearndiffatk", total=len(ps.positives)):
            cand, row_ids, s, losses = attack_prompt(target, pipe, i, x0[i : i + 1], vocab, config, g)
            cands.append(cand)
            ids.append(row_ids)
            history[f"loss_{i}"] = losses
            for key, value in s.items():
                stats.setdefault(key, []).append(value)
    pre = [Candidate(prompt=p, group=i, phase="pre") for i, p in enumerate(ps.positives)]
    embeddings = {"token_ids": torch.stack(ids), "prefix_rows": torch.stack([c.embedding for c in cands])}
    return AttackResult(candidates=tuple(pre + cands), patch=target.patch, embeddings=embeddings,
                        history=history, stats=stats)  # fmt: skip


register_attack(
    "unlearndiffatk",
    UnlearnDiffAtkConfig,
    presets={"paper": {}},
    asr="pre+post",
    summary="UnlearnDiffAtk: simplex-relaxed prefix tokens minimising the erased model's loss on base images",
)(unlearndiffatk)
