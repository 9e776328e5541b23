"""ESD: Erased Stable Diffusion (Gandikota et al., ICCV 2023), fine-tuning the UNet with negative guidance.

Each iteration draws x_t by partial DDIM from the frozen model (:func:`erasekit.denoising.sample_until`) and
regresses the trainable UNet's ε(x_t, c, t) onto ``ε*(x_t, c_from, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))``,
where ε* is the frozen model. Training runs on copies of the selected parameters through
``torch.func.functional_call``; the loaded model is never modified.

Parameter sets (by module path component and type, see :mod:`erasekit.methods.common`):

- ``attn2`` (esd-x): every ``nn.Linear`` under a module path component ``attn2`` (to_q, to_k, to_v, to_out.0);
- ``attn2-kv`` (esd-x ``strict`` preset): only the ``to_k`` and ``to_v`` Linears of ``attn2``;
- ``non-attn2`` (esd-u): every ``nn.Linear`` and ``nn.Conv2d`` outside ``attn2``.

Presets: ``paper`` follows the current release, ``esd_sd.py`` of rohitgandikota/erasing at
25613d27892326e0c7770f7f3555bea4be150089 (200 iterations, Adam 5e-5, η = 2, partial sampling at guidance 3 over
50 steps), in fp32. ``bf16`` is the same with ``train_dtype="bfloat16"``, as that script runs: the frozen UNet
that samples x_t and gives the targets, the trained tensors, the loss and Adam's state are all bfloat16, so an
Adam step of 5e-5 is lost on any weight above about 0.016 in magnitude (below half a bfloat16 ulp).
``legacy`` is the older ``train-scripts/train-esd.py``'s budget (1000 iterations, lr 1e-5, η = 1).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.denoising import check_unet_family, encode_prompts, predict_noise, sample_until, start_noise
from erasekit.methods.common import (
    attn2_linears,
    check_choice,
    check_positive,
    frozen,
    generator,
    module_params,
    non_attn2_layers,
    trainable_copies,
)
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import Strength, register

PARAMETER_SETS = ("attn2", "attn2-kv", "non-attn2")
TRAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class ESDConfig:
    """ESD's settings; defaults follow the authors' newer code (200 iterations, Adam 5e-5, η = 2)."""

    parameters: str = field(
        default="attn2", metadata={"help": f"which UNet tensors train: {', '.join(PARAMETER_SETS)}"}
    )
    iterations: int = field(default=200, metadata={"help": "gradient steps (one concept, one x_t each)"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate"})
    negative_guidance: float = field(
        default=2.0, metadata={"help": "η, the strength of the negative guidance"}
    )
    ddim_steps: int = field(default=50, metadata={"help": "length of the DDIM schedule x_t is sampled along"})
    start_guidance: float = field(
        default=3.0, metadata={"help": "CFG scale of the frozen model's partial sampling"}
    )
    erase_from: str = field(
        default="", metadata={"help": "c_from: the concept the target is taken from ('' = itself)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the noise and the stopping steps"})
    train_dtype: str = field(
        default="float32",
        metadata={
            "help": "precision of the frozen UNet, the trained tensors and Adam's state: float32, or "
            "bfloat16 as the released esd_sd.py"
        },
    )

    def __post_init__(self) -> None:
        check_choice("train_dtype", self.train_dtype, tuple(TRAIN_DTYPES))
        check_choice("parameters", self.parameters, PARAMETER_SETS)
        check_positive(iterations=self.iterations, lr=self.lr, ddim_steps=self.ddim_steps)
        if self.negative_guidance < 0 or self.start_guidance < 0:
            raise ValueError("negative_guidance and start_guidance must be >= 0")


def parameter_names(unet: torch.nn.Module, parameters: str) -> list[str]:
    """Qualified UNet parameter names of one of :data:`PARAMETER_SETS`."""
    if parameters == "attn2":
        modules = attn2_linears(unet)
    elif parameters == "attn2-kv":
        modules = attn2_linears(unet, ("to_k", "to_v"))
    else:
        modules = non_attn2_layers(unet)
    return module_params(unet, modules)


def esd_loss(
    unet: torch.nn.Module,
    params: dict[str, torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    emb: dict[str, torch.Tensor],
    eta: float,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """‖ε_θ(x_t, c, t) − [ε*(x_t, c_from, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))]‖² (mean over elements).

    Args:
        params: the trainable copies (``{name: tensor}``) standing in for the UNet's own.
        x_t: ``[1, C, h, w]`` latents.
        emb: ``{"c", "from", "null"}`` each ``[1, 77, D]``.
        cond: ``[1, 77, D]`` the condition the trained UNet sees instead of ``emb["c"]`` (RACE: c + δ).
    """
    target = esd_target(frozen_predictions(unet, x_t, t, emb), eta)
    return F.mse_loss(predict_noise(unet, x_t, t, emb["c"] if cond is None else cond, params), target)


def frozen_predictions(
    unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ε*(x_t, c_from, t), ε*(x_t, c, t), ε*(x_t, ∅, t) of the frozen UNet, one batch of 3 (no gradients)."""
    with torch.no_grad():
        both = torch.cat([emb["from"], emb["c"], emb["null"]])
        e_from, e_c, e_null = predict_noise(unet, x_t.expand(3, -1, -1, -1), t, both).chunk(3)
    return e_from, e_c, e_null


def esd_target(frozen: tuple[torch.Tensor, torch.Tensor, torch.Tensor], eta: float) -> torch.Tensor:
    """ESD's regression target ``ε*(c_from) − η (ε*(c) − ε*(∅))`` from :func:`frozen_predictions`."""
    e_from, e_c, e_null = frozen
    return e_from - eta * (e_c - e_null)


def diffusion_loop(
    pipe: Any,
    params: dict[str, torch.Tensor],
    conds: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    config: Any,
    desc: str,
    *,
    iterations: int | None = None,
    generator_: torch.Generator | None = None,
    sample_trained: bool = False,
    give_noise: bool = False,
    unet: torch.nn.Module | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """ESD's training loop, shared by the methods trained on partial DDIM trajectories.

    Iteration ``i`` takes ``k = i % K``, draws a stopping step uniformly from ``[0, ddim_steps)`` and the start
    noise x_T, samples x_t conditioned on ``conds[k]`` (guidance ``start_guidance``), and takes one Adam step on
    ``loss_fn(k, x_t, t)``.

    Args:
        params: the trainable copies, trained in place.
        conds: ``[K, 77, D]`` the conditionings x_t is sampled with.
        loss_fn: ``(k, x_t [1, C, h, w], t) -> scalar loss``; ``(k, x_t, t, x_T)`` with ``give_noise``.
        config: has ``iterations``, ``lr``, ``ddim_steps``, ``start_guidance`` and ``seed``.
        iterations: run this many instead of ``config.iterations`` (RACE's two stages).
        generator_: continue this generator instead of a fresh ``generator(config.seed)``.
        sample_trained: sample x_t with ``params`` (the model being trained, as the older ESD script and the
            RACE and ANT releases do) instead of the frozen model.
        give_noise: also pass the start noise x_T ``[1, C, h, w]`` to ``loss_fn`` (RACE's attack target).
        unet: the UNet that samples x_t (``None``: the pipeline's own; ESD's ``bf16`` passes a bfloat16 copy;
            ACE and UnGuide pass their peft LoRA copy, so x_t comes from the model being trained). Sampling runs
            without gradients. ``conds`` must be in its dtype.
        after_step: called with the number of iterations done after each Adam step (:func:`snapshots_at`).

    Returns:
        The loss of every iteration.
    """
    if give_noise:
        losses_of = lambda k, x_t, t, noise: iter([loss_fn(k, x_t, t, noise)])  # noqa: E731
    else:
        losses_of = lambda k, x_t, t, noise: iter([loss_fn(k, x_t, t)])  # noqa: E731
    return joint_diffusion_loop(pipe, [params], conds, losses_of, config, desc, iterations=iterations,
                                generator_=generator_, sample_trained=sample_trained, unet=unet,
                                after_step=after_step)[0]  # fmt: skip


def joint_diffusion_loop(
    pipe: Any,
    param_sets: Sequence[dict[str, torch.Tensor]],
    conds: torch.Tensor,
    losses_of: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Iterator[torch.Tensor]],
    config: Any,
    desc: str,
    *,
    iterations: int | None = None,
    generator_: torch.Generator | None = None,
    sample_trained: bool = False,
    unet: torch.nn.Module | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """:func:`diffusion_loop` for several parameter sets trained side by side on the same x_t.

    Each iteration draws its stopping step, start noise and x_t once, then takes one Adam step per set (each
    its own optimizer) on the losses ``losses_of(k, x_t, t, x_T)`` yields, one per set in order. A set's
    loss is made, back-propagated and stepped before the next is made, so each set sees exactly what
    :func:`diffusion_loop` would show it alone: the same draws, the same x_t, the same operations. Only the
    frozen model may sample x_t (``sample_trained`` works with one set alone).

    Returns:
        Every iteration's loss, per set.
    """
    if sample_trained and len(param_sets) != 1:
        raise ValueError("x_t sampled by the trained model cannot be shared between parameter sets")
    g = generator_ if generator_ is not None else generator(config.seed)
    # sample_until reads only .unet and .scheduler: sample with ``unet`` without touching the pipeline
    sampler = pipe if unet is None else types.SimpleNamespace(unet=unet, scheduler=pipe.scheduler)
    with torch.no_grad():
        null = encode_prompts(pipe, [""]).to(conds.dtype)
    opts = [torch.optim.Adam(params.values(), lr=config.lr) for params in param_sets]
    losses: list[list[float]] = [[] for _ in param_sets]
    total = config.iterations if iterations is None else iterations
    for i in track(range(total), desc=desc, total=total):
        k = i % conds.shape[0]
        stop = int(torch.randint(0, config.ddim_steps, (), generator=g))
        noise = start_noise(sampler, 1, g)
        x_t, t = sample_until(
            sampler,
            conds[k : k + 1],
            null,
            steps=config.ddim_steps,
            stop=stop,
            guidance=config.start_guidance,
            generator=g,
            noise=noise,
            params=detached(param_sets[0]) if sample_trained else None,
        )
        made = 0
        for j, loss in enumerate(losses_of(k, x_t, t, noise)):
            opts[j].zero_grad(set_to_none=True)
            loss.backward()
            opts[j].step()
            losses[j].append(loss.item())
            made += 1
        if made != len(param_sets):
            raise ValueError(f"losses_of yielded {made} losses for {len(param_sets)} parameter sets")
        if after_step is not None:
            after_step(i + 1)
    return losses


def snapshots_at(
    params: dict[str, torch.Tensor], keep: Sequence[int]
) -> tuple[Callable[[int], None], dict[int, dict[str, torch.Tensor]]]:
    """An ``after_step`` for :func:`diffusion_loop` that copies ``params`` after each iteration count in ``keep``.

    Nothing in the loop depends on its length (no schedule: the draws of iteration i are the same in a run of
    any length), so the copy after n iterations of a longer run is the run of n iterations: the methods whose
    strength knob is ``iterations`` erase a grid of them in one run of the longest.

    Returns:
        The callback and ``{iterations: {name: tensor}}``, filled as the loop runs.
    """
    wanted, kept = set(keep), {}

    def after(done: int) -> None:
        if done in wanted:
            kept[done] = {n: p.detach().clone() for n, p in params.items()}

    return after, kept


def iteration_prefixes(configs: Sequence[Any]) -> tuple[Any, list[int]]:
    """The longest of ``configs`` (which differ only in ``iterations``) and every config's iterations."""
    longest = max(configs, key=lambda c: c.iterations)
    return longest, [c.iterations for c in configs]


def detached(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainable copies without their gradient tape, to sample or attack with."""
    return {n: p.detach() for n, p in params.items()}


def train(
    pipe: Any,
    unet: torch.nn.Module,
    concepts: Sequence[str],
    config: ESDConfig,
    params: dict[str, torch.Tensor],
) -> list[float]:
    """Run ESD on ``params`` (trainable copies of ``unet``'s tensors) in place; returns every iteration's loss.

    Args:
        unet: the frozen UNet that samples x_t and gives the targets: the pipeline's own, or a bfloat16 copy.
    """
    return train_jointly(pipe, unet, concepts, [config], [params])[0]


def train_jointly(
    pipe: Any,
    unet: torch.nn.Module,
    concepts: Sequence[str],
    configs: Sequence[ESDConfig],
    param_sets: Sequence[dict[str, torch.Tensor]],
) -> list[list[float]]:
    """ESD with several η at once: ``param_sets[j]`` trains with ``configs[j].negative_guidance``.

    The frozen model samples x_t and its three predictions do not depend on η, so they are made once per
    iteration and each set regresses onto its own target from them (:func:`joint_diffusion_loop`). The configs
    must agree in everything but ``negative_guidance``.
    """
    dtype = unet.dtype
    config = configs[0]
    with torch.no_grad():  # the text encoder stays fp32: its embeddings are cast to the training dtype
        conds = encode_prompts(pipe, list(concepts)).to(dtype)
        froms = encode_prompts(pipe, [config.erase_from or c for c in concepts]).to(dtype)
        null = encode_prompts(pipe, [""]).to(dtype)

    def losses_of(k: int, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> Iterator[torch.Tensor]:
        emb = {"c": conds[k : k + 1], "from": froms[k : k + 1], "null": null}
        frozen_out = frozen_predictions(unet, x_t, t, emb)
        for c, params in zip(configs, param_sets, strict=True):
            target = esd_target(frozen_out, c.negative_guidance)
            yield F.mse_loss(predict_noise(unet, x_t, t, emb["c"], params), target)

    sampler = None if unet is pipe.unet else unet
    return joint_diffusion_loop(pipe, param_sets, conds, losses_of, config, "esd", unet=sampler)


def erase_esd(model: Any, concepts: list[str], config: ESDConfig) -> Patch:
    """ESD: fine-tune the selected UNet tensors so the concept's noise prediction points away from it."""
    return erase_esd_jointly(model, concepts, [config])[0]


def erase_esd_jointly(model: Any, concepts: list[str], configs: Sequence[ESDConfig]) -> list[Patch]:
    """ESD for several η in one run (:func:`train_jointly`): one patch per config, each the patch
    :func:`erase_esd` makes for that config alone (the leaderboard's sweep over η)."""
    pipe = check_unet_family(model, "esd")
    dtype = TRAIN_DTYPES[configs[0].train_dtype]
    with frozen(pipe.unet, pipe.text_encoder):
        unet = pipe.unet if pipe.unet.dtype == dtype else copy.deepcopy(pipe.unet).to(dtype)
        names = parameter_names(unet, configs[0].parameters)
        param_sets = [trainable_copies(unet, names) for _ in configs]
        train_jointly(pipe, unet, concepts, configs, param_sets)
    return [Patch.from_tensors(model, "unet", {n: p.detach() for n, p in ps.items()}) for ps in param_sets]


_LEGACY = {"iterations": 1000, "lr": 1e-5, "negative_guidance": 1.0}
_BF16 = {"train_dtype": "bfloat16"}

register(
    "esd-x",
    ESDConfig,
    presets={
        "paper": {"parameters": "attn2"},
        "strict": {"parameters": "attn2-kv"},
        "bf16": {"parameters": "attn2", **_BF16},
        "legacy": {"parameters": "attn2", **_LEGACY},
    },
    strength=Strength("negative_guidance", (1.0, 2.0, 4.0, 8.0, 16.0), joint=erase_esd_jointly),
    summary="ESD-x: fine-tune every cross-attention Linear of the UNet with negative guidance",
)(erase_esd)
register(
    "esd-u",
    ESDConfig,
    presets={
        "paper": {"parameters": "non-attn2"},
        "bf16": {"parameters": "non-attn2", **_BF16},
        "legacy": {"parameters": "non-attn2", **_LEGACY},
    },
    strength=Strength("negative_guidance", (1.0, 2.0, 4.0, 8.0, 16.0), joint=erase_esd_jointly),
    summary="ESD-u: fine-tune every Linear and Conv of the UNet outside cross-attention",
)(erase_esd)
