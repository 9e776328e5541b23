"""UnlearnDiffAtk (Zhang et al., ECCV 2024): k prefix tokens that make the erased model denoise the base image.

The ``paper`` preset follows the authors' release, OPTML-Group/Diffusion-MU-Attack at commit 5a3e5d37
(``src/attackers/text_grad_.py``, ``src/tasks/classifier_.py``, ``configs/{style,object,nudity}/text_grad_*.json``).
For each base prompt p:

1. x_tgt: the latents the BASE model (patch removed) generates for p with the run's first seed;
2. k prefix tokens are rows w_j of the probability simplex over the ordinary vocabulary, starting uniform;
3. the ``sequential`` schedule: for each of 50 fixed timesteps t (10, 30, ..., 990 of 1000), 40 Adam steps
   (weight decay) on ‖ε − ε_θ′(√ᾱ_t x_tgt + √(1−ᾱ_t) ε, t, E([adv; p]))‖² on the ERASED model, fresh ε each
   step. The forward pass draws one token per row from w_j (multinomial) and feeds its one-hot vector; the
   backward pass hands the one-hot gradient, clipped to [−1, 1], straight through to w_j. After every step each
   w_j is projected back onto the simplex;
4. after each timestep the argmax tokens are generated and judged (``AttackTarget.judge``); the search stops at
   the first success. A base prompt that already succeeds without the attack is not attacked.

Reported as the authors do: prompts that succeed before the attack (``ASR_pre``), plus those that fail before
and succeed after (``ASR_post``), and their sum (``ASR``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.attacks import register_attack
from erasekit.attacks._denoise import FixedTimestepNoise, denoise_loss, model_latents
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

EVAL_DRAWS = 8  # fixed ε draws (at the optimised timesteps) the loss is compared on, before and after
START_DRAWS = 8  # prefixes drawn from the uniform start, whose mean loss is the "before"
NOT_ATTACKED = -1  # token id saved for a base prompt that already succeeds without the attack


@dataclass(frozen=True, kw_only=True)
class UnlearnDiffAtkConfig(Budget):
    """UnlearnDiffAtk's budget; ``paper`` is OPTML-Group/Diffusion-MU-Attack's ``configs/*/text_grad_*.json`` and
    ``text_grad_.py`` at 5a3e5d37: k = 3 (style, object) or 5 (nudity), 50 timesteps × 40 iterations, Adam lr
    0.01 with weight decay 0.1, stop at the first success. The judge is the run's detector (on MiniCanvas its
    classifier) instead of the release's per-concept classifiers."""

    tokens: int = field(default=5, metadata={"help": "k, adversarial prefix tokens"})
    timesteps: int = field(
        default=50, metadata={"help": "fixed timesteps of the sequential schedule (evenly spaced)"}
    )
    iterations: int = field(default=40, metadata={"help": "optimisation steps at each timestep"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate on the simplex weights"})
    weight_decay: float = field(default=0.1, metadata={"help": "Adam weight decay (L2, as torch.optim.Adam)"})
    stop_early: bool = field(
        default=True,
        metadata={"help": "judge after each timestep and stop at the first success (needs a detector)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.tokens <= 70 or self.iterations < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("need 1 <= tokens <= 70, iterations >= 1, lr > 0 and weight_decay >= 0")
        if self.timesteps < 1:
            raise ValueError("timesteps must be >= 1")


def sequential_timesteps(train_timesteps: int, n: int) -> list[int]:
    """The ``n`` fixed timesteps, ascending: the midpoints of ``n`` equal bins (T = 1000, n = 50: 10, 30, ..., 990)."""
    if not 1 <= n <= train_timesteps:
        raise ValueError(f"need 1 <= timesteps <= {train_timesteps}, got {n}")
    width = train_timesteps // n
    return [width // 2 + i * width for i in range(n)]


def project_simplex(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``w`` ``[k, V]`` onto the probability simplex (sort-based)."""
    u, _ = w.sort(dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    ranks = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=w.dtype)
    positive = (u - css / ranks) > 0  # [k, V], true up to the support size rho
    rho = (positive.to(w.dtype) * ranks).argmax(-1, keepdim=True)  # [k, 1], index of the last true
    theta = css.gather(-1, rho) / (rho + 1).to(w.dtype)  # [k, 1]
    return (w - theta).clamp_min(0.0)


class SampledOneHot(torch.autograd.Function):
    """Forward: one token per row of ``w`` ``[k, V]`` drawn with probabilities w (multinomial), as one-hot rows.
    Backward: the one-hot's gradient clipped to [−1, 1] (hardtanh), passed straight through to ``w``."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        picks = torch.multinomial(w.detach(), 1, generator=generator).squeeze(-1)  # [k]
        return F.one_hot(picks, w.shape[-1]).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.clamp(-1.0, 1.0), None


class PrefixObjective:
    """The denoising loss of the erased model for one base prompt, as a function of the prefix's token rows."""

    def __init__(self, pipe: Any, prompt: str, x0: torch.Tensor, vocab: torch.Tensor, k: int) -> None:
        self.pipe, self.x0, self.vocab, self.base = pipe, x0, vocab, prompt
        self.prompt = with_placeholders(prompt, k)
        self.token = placeholder_id(pipe.tokenizer)

    def rows(self, onehot: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings ``[k, D]`` = one-hot (or simplex) rows ``[k, V']`` @ E[vocab] ``[V', D]``."""
        table = token_table(self.pipe.text_encoder)[self.vocab]
        return onehot.to(table.dtype) @ table

    def loss(self, rows: torch.Tensor, draw: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x_t, want, t = draw
        with placeholder_rows(self.pipe.text_encoder, self.token, rows):
            cond = encode_prompts(self.pipe, [self.prompt])  # [1, 77, D]
        return denoise_loss(self.pipe, x_t, want, t, cond)

    def mean_loss(self, ids: torch.Tensor, fixed: list[tuple[torch.Tensor, ...]]) -> float:
        """Mean loss over ``fixed`` draws of the prefix made of vocabulary positions ``ids`` ``[k]``."""
        rows = self.rows(F.one_hot(ids, len(self.vocab)).float())
        with torch.no_grad():
            return sum(float(self.loss(rows, d)) for d in fixed) / len(fixed)


def optimise_at(
    objective: PrefixObjective, w: torch.Tensor, opt: torch.optim.Optimizer, t: int, iterations: int,
    noise: FixedTimestepNoise, g: torch.Generator,
) -> list[float]:  # fmt: skip
    """``iterations`` straight-through Adam steps on ``w`` ``[k, V']`` (a leaf, updated in place) at timestep ``t``,
    each followed by the projection onto the simplex; returns each step's loss."""
    losses = []
    for _ in range(iterations):
        onehot = SampledOneHot.apply(w, g)  # [k, V']
        loss = objective.loss(objective.rows(onehot), noise(objective.x0, t, g))
        (w.grad,) = torch.autograd.grad(loss, w)
        opt.step()
        with torch.no_grad():
            w.copy_(project_simplex(w))
        losses.append(float(loss.detach()))
    return losses


def attack_prompt(
    target: AttackTarget, pipe: Any, i: int, x0: torch.Tensor, vocab: torch.Tensor, config: UnlearnDiffAtkConfig,
    g: torch.Generator,
) -> tuple[Candidate, torch.Tensor, dict[str, Any], list[float]]:  # fmt: skip
    """Attack base prompt ``i`` (the model already erased); returns its candidate, ids ``[k]``, stats, losses."""
    prompt = target.prompts.positives[i]
    judge = target.judge if config.stop_early else None
    if judge is not None and judge([Candidate(prompt=prompt, group=i, phase="pre")])[0]:
        # the authors' loop returns before optimising when the unattacked prompt already succeeds
        stats = {"loss_before": None, "loss_after": None, "timesteps_run": 0, "success_timestep": None}
        plain = Candidate(prompt=prompt, group=i, text=f"(not attacked: already succeeds) {prompt}")
        return plain, torch.full((config.tokens,), NOT_ATTACKED), stats, []
    objective = PrefixObjective(pipe, prompt, x0, vocab, config.tokens)
    noise = FixedTimestepNoise(pipe)
    w = torch.full((config.tokens, len(vocab)), 1.0 / len(vocab), requires_grad=True)  # uniform start
    starts = torch.multinomial(w.detach(), START_DRAWS, replacement=True, generator=g).T  # [START_DRAWS, k]
    opt = torch.optim.Adam([w], lr=config.lr, weight_decay=config.weight_decay)
    losses, done, success = [], [], None
    for t in sequential_timesteps(noise.train_timesteps, config.timesteps):
        losses += optimise_at(objective, w, opt, t, config.iterations, noise, g)
        done.append(t)
        cand = _candidate(objective, pipe, w, i)
        if judge is not None and judge([cand])[0]:
            success = t
            break
    picks = w.detach().argmax(-1)  # [k] positions in vocab
    fixed = _eval_draws(noise, x0, done, config.seed + 1000 + i)
    before = sum(objective.mean_loss(ids, fixed) for ids in starts) / len(starts)  # the start's expected loss
    stats = {"loss_before": before, "loss_after": objective.mean_loss(picks, fixed), "timesteps_run": len(done),
             "success_timestep": success}  # fmt: skip
    return cand, vocab[picks], stats, losses


def _eval_draws(noise: FixedTimestepNoise, x0: torch.Tensor, timesteps: list[int], seed: int) -> list[Any]:
    """:data:`EVAL_DRAWS` fixed noise draws at the timesteps the attack optimised, in turn."""
    g = torch.Generator().manual_seed(seed)
    return [noise(x0, timesteps[j % len(timesteps)], g) for j in range(EVAL_DRAWS)]


def _candidate(objective: PrefixObjective, pipe: Any, w: torch.Tensor, i: int) -> Candidate:
    """The attacked prompt with the argmax tokens of ``w``, as exact embedding rows."""
    ids = objective.vocab[w.detach().argmax(-1)]  # [k]
    rows = token_table(pipe.text_encoder)[ids].detach().clone()  # [k, D]
    text = f"{pipe.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()} {objective.base}"
    return Candidate(prompt=objective.prompt, group=i, embedding=rows, text=text)


def unlearndiffatk(target: AttackTarget, config: UnlearnDiffAtkConfig) -> AttackResult:
    """UnlearnDiffAtk: k prefix tokens, straight-through over the simplex, on the erased model's denoising loss."""
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
    stats["judged"] = target.judge is not None and config.stop_early
    pre = [Candidate(prompt=p, group=i, phase="pre") for i, p in enumerate(ps.positives)]
    return AttackResult(candidates=tuple(pre + cands), patch=target.patch,
                        embeddings={"token_ids": torch.stack(ids)}, history=history, stats=stats)  # fmt: skip


register_attack(
    "unlearndiffatk",
    UnlearnDiffAtkConfig,
    presets={"paper": {"style": {"tokens": 3}, "object": {"tokens": 3}, "nsfw": {"tokens": 5}}},
    asr="pre+post",
    summary="UnlearnDiffAtk: straight-through prefix tokens on the erased model's loss, sequential over 50 timesteps",
)(unlearndiffatk)
