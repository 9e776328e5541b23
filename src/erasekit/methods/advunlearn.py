"""AdvUnlearn (Zhang et al., NeurIPS 2024): adversarial training of the text encoder, with a retain set.

Objective: min_θ E[ℓ_ESD(θ; δ* ⊕ c)] + γ ℓ_retain, trained on the text encoder θ with the UNet frozen. The
``paper`` preset follows the authors' ``train-scripts/AdvUnlearn.py`` with ``utils/get_loss.py`` and
``utils/attack_util.py`` (OPTML-Group/AdvUnlearn at 9d231249f9af13626e8bb9dcef5521f11d262498) and the README's
command (``--attack_init random --attack_step 30 --retain_train reg --dataset_retain coco_object
--train_method text_encoder_full --retain_loss_w 0.3``). Each iteration:

1. Draw a concept c. After ``warmup_iterations`` clean iterations, find δ*: ``attack_tokens`` prefix input
   embeddings (k random vocabulary rows to start), optimised by Adam (``attack_lr``) for ``attack_steps`` steps
   to make ε(x_t, E_θ(δ ⊕ c)) match the frozen ε*(x_t, E*(c)). Every attack step draws its own x_t, and the
   gradients are never zeroed between steps, as released; the δ returned is the one of the last forward pass.
2. Draw one stopping step and sample x_t from c and one x_t per retain prompt r (``retain_batch`` of them,
   drawn without replacement until the set is used up), all by partial DDIM of the frozen model.
3. ℓ_ESD = ‖ε(x_t, E_θ(δ* ⊕ c)) − [ε*_∅ − η (ε*_c − ε*_∅)]‖² (the clean c during warm-up) and
   ℓ_retain = ‖ε(x_r, E_θ(r)) − ε*(x_r, E*(r))‖²; one Adam step on θ.

``trainable``: ``full`` (the release's ``text_encoder_full``: every transformer block and the final LayerNorm, not
the token or position embeddings), ``all-blocks`` (the blocks only) or ``block-0``. The encoder is trained in
place and restored exactly before returning.

Retain prompts (``retain_set``): ``coco`` is the release's ``coco_object_retain.csv``, 243 prompts "a photo of
{object}". The MiniCanvas text encoder knows none of those words, so on the shipped MiniCanvas model ``auto``
substitutes the world's analogue: every MiniCanvas object not being erased, in the world's two object-only
captions (``A {object} image.``, ``a picture of a {object}``). ``retain`` names objects explicitly instead.

Still different from the release (docs/baselines.md): x_t comes from :func:`erasekit.denoising.sample_until`, whose
timestep is exactly the latent's; the release labels its latent with a DDPM timestep drawn about 50 steps noisier.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.denoising import (
    check_unet_family,
    encode_prompts,
    predict_noise,
    prefix_embeddings,
    sample_until,
    with_prefix,
)
from erasekit.methods.common import (
    block_params,
    check_choice,
    check_positive,
    frozen,
    generator,
    trained_in_place,
)
from erasekit.models.families import clip_prefix, num_blocks
from erasekit.patch import Patch
from erasekit.progress import track
from erasekit.registry import Strength, register

TRAINABLE = ("full", "all-blocks", "block-0")
RETAIN_SETS = ("auto", "coco", "minicanvas")
ATTACK_INITS = ("random", "latest")
#: The objects of the release's data/prompts/train/coco_object_retain.csv, in its order (243 rows, as spelled).
COCO_OBJECTS = (
    "chair", "fridge", "banana", "street sign", "headlights", "printer", "handbag", "skis", "skateboard",
    "chopping board", "goat", "playing cards", "tire", "toy cars", "box", "pasta", "moon", "basketball",
    "radio", "ipad", "goldfish", "jetpack", "bicycle", "couch", "microwave", "bread", "umbrella", "window",
    "teddy bear", "pans", "hot dog", "snowboard", "helicopter", "washer", "magazine", "home", "phone", "towel",
    "necklace", "bracelet", "platypus", "grapes", "road", "telephone", "fences", "aardvark", "iphone", "robot",
    "car", "potted plant", "sink", "apple", "scissors", "door", "desk", "tie", "stapler", "table", "lamp",
    "tomato", "lion", "key", "Pig", "hyppo", "tablet", "bat", "pancake", "shark", "fountain", "movie",
    "goal net", "dinosaur", "hoop", "crusher", "motorcycle", "tv", "oven", "book", "keyboard", "fire hydrant",
    "computer", "stop sign", "sports ball", "basketball", "hoop", "egg", "tree", "monkey", "frame",
    "strawberries", "can", "corn", "balloon", "cabinet", "swan", "fax machine", "football", "toys", "unicycle",
    "hen", "animal crackers", "bird", "cow", "toaster", "boat", "backpack", "traffic light", "bowl",
    "refrigerator", "surfboard", "broccoli", "donut", "door handle", "hair brush", "cupcake", "pumpkin",
    "dollar bill", "ladder", "gloves", "whale", "bat", "goose", "engine", "honey", "basketball court", "cat",
    "airplane", "bus", "plate", "steering wheel", "eyeglasses", "teapot", "pizza", "sandwich", "suitcase",
    "vase", "power", "outlet", "pillow", "light switch", "fan", "van", "doll", "pineapple", "milk", "dryer",
    "towel", "hot air balloon", "soccer ball", "legos", "table cloth", "horn", "dog", "hat", "train",
    "cell phone", "wine glass", "cup", "fork", "squirrel", "pen", "carrot", "baseball bat", "tennis racket",
    "frogs", "kangaroo", "soup", "candle", "side table", "cereal", "field goal posts", "fly", "soccer nets",
    "firefly", "horse", "license plate", "mirror", "mouse", "chicken", "blender", "knife", "duck", "kite",
    "chandelier", "baseball glove", "tiger", "cake", "rhinoceros", "meat", "desktop", "wheelchair", "lizard",
    "gate", "seahorse", "raft", "roof", "turkey", "sheep", "bed", "dining table", "remote", "zebra",
    "hair drier", "spoon", "frisbee", "orange", "parking meter", "giraffe", "table", "house", "owl",
    "sailboat", "window", "carpet", "building", "beans", "rocket", "rooster", "tennis net", "baseball",
    "nectar", "bottle", "laptop", "elephant", "clock", "wheel", "bear", "guitar", "toothbrush", "fish",
    "jacket", "coffee table", "bench", "cheese", "scarf", "deer", "muffins", "cookie", "bacon", "cabinets",
    "copier", "seats", "mat",
)  # fmt: skip

#: One partial-DDIM draw for the attack: ``() -> (x_t [1, C, h, w], t, ε*(x_t, E*(c)) [1, C, h, w])``.
Draw = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, kw_only=True)
class AdvUnlearnConfig:
    """AdvUnlearn's settings; defaults are the release's (1000 iterations, 200 warm-up, lr 1e-5, γ 0.3, Adam 30 × 1e-3)."""

    trainable: str = field(
        default="full", metadata={"help": f"text-encoder tensors to train: {', '.join(TRAINABLE)}"}
    )
    iterations: int = field(default=1000, metadata={"help": "training iterations (the strength knob)"})
    warmup_iterations: int = field(
        default=200, metadata={"help": "first iterations trained on the clean prompt, without the attack"}
    )
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the text encoder"})
    retain_weight: float = field(default=0.3, metadata={"help": "γ, weight of the retain loss"})
    retain_set: str = field(
        default="auto",
        metadata={
            "help": "retain prompts: coco (the release's 243), minicanvas (the world's other objects), "
            "auto (minicanvas on the shipped MiniCanvas model, else coco)"
        },
    )
    retain: tuple[str, ...] = field(
        default=(), metadata={"help": "retain objects in retain_template, instead of retain_set"}
    )
    retain_template: str = field(
        default="a photo of {}", metadata={"help": "template of the coco and explicit retain objects"}
    )
    retain_batch: int = field(default=5, metadata={"help": "retain prompts per iteration, each its own x_t"})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of the ESD target"})
    attack_tokens: int = field(default=1, metadata={"help": "length k of the adversarial prefix"})
    attack_steps: int = field(default=30, metadata={"help": "attack (Adam) steps per iteration"})
    attack_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the attack"})
    attack_init: str = field(
        default="random",
        metadata={"help": "δ's start each iteration: random (k vocabulary rows) or latest (the last δ*)"},
    )
    ddim_steps: int = field(default=50, metadata={"help": "length of the DDIM schedule x_t is sampled along"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the frozen partial sampling"})
    seed: int = field(
        default=0, metadata={"help": "seed of concepts, noise, stopping steps, retain picks and δ"}
    )

    def __post_init__(self) -> None:
        check_choice("trainable", self.trainable, TRAINABLE)
        check_choice("retain_set", self.retain_set, RETAIN_SETS)
        check_choice("attack_init", self.attack_init, ATTACK_INITS)
        check_positive(
            iterations=self.iterations, lr=self.lr, ddim_steps=self.ddim_steps, attack_lr=self.attack_lr
        )
        check_positive(attack_tokens=self.attack_tokens, retain_batch=self.retain_batch)
        if min(self.retain_weight, self.attack_steps, self.negative_guidance, self.warmup_iterations) < 0:
            raise ValueError(
                "retain_weight, attack_steps, negative_guidance and warmup_iterations must be >= 0"
            )
        if self.retain_template.count("{}") != 1:
            raise ValueError("retain_template must contain exactly one '{}'")
        if any(not r.strip() for r in self.retain):
            raise ValueError("retain objects must be non-blank")


def trainable_names(encoder: torch.nn.Module, trainable: str) -> list[str]:
    """The text-encoder parameter names of one of :data:`TRAINABLE` (``full``: blocks and final LayerNorm)."""
    blocks = block_params(encoder, list(range(num_blocks(encoder))) if trainable != "block-0" else [0])
    if trainable != "full":
        return blocks
    final_norm = f"{clip_prefix(encoder)}final_layer_norm."
    return blocks + [n for n, _ in encoder.named_parameters() if n.startswith(final_norm)]


def retain_prompts(model: Any, concepts: Sequence[str], config: AdvUnlearnConfig) -> list[str]:
    """The retain prompts: ``config.retain`` if given, else the COCO set or its MiniCanvas substitute."""
    if config.retain:
        return [config.retain_template.format(o) for o in config.retain]
    if config.retain_set == "minicanvas" or config.retain_set == "auto" and _minicanvas_model(model):
        from erasekit.minicanvas.world import OBJECT_NAMES, OBJECT_TEMPLATES

        erased = {c.strip().lower() for c in concepts}
        return [t.format(object=o) for o in OBJECT_NAMES if o not in erased for t in OBJECT_TEMPLATES]
    return [config.retain_template.format(o) for o in COCO_OBJECTS]


def _minicanvas_model(model: Any) -> bool:
    """True for a MiniCanvas model (shipped or retrained: its folder names the ``minicanvas`` family)."""
    return model.family.name == "minicanvas"


def retain_picks(n: int, batch: int, g: torch.Generator) -> Iterator[list[int]]:
    """Batches of indices into ``n`` prompts drawn without replacement, restarting when fewer than ``batch`` remain."""
    unseen: list[int] = []
    while True:
        if len(unseen) < batch:
            unseen = torch.randperm(n, generator=g).tolist()
        pick, unseen = unseen[:batch], unseen[batch:]
        yield pick


def attack(pipe: Any, prompt: str, delta: torch.Tensor, draw: Draw, config: AdvUnlearnConfig) -> torch.Tensor:
    """Adam on the prefix ``delta`` ``[k, D]`` minimising ‖ε(x_t, E_θ(δ ⊕ c)) − ε*(x_t, E*(c))‖².

    Each step takes a fresh sample from ``draw``. As in the release, the gradients add up over the steps (they
    are never zeroed) and the δ returned is the one the last step evaluated, before its update.
    """
    delta = delta.detach().clone().requires_grad_(True)
    opt, used = torch.optim.Adam([delta], lr=config.attack_lr), delta.detach().clone()
    for _ in range(config.attack_steps):
        x_t, t, want = draw()
        used = delta.detach().clone()
        with prefix_embeddings(pipe.text_encoder, delta):
            emb = encode_prompts(pipe, [with_prefix(prompt, config.attack_tokens)])
        (grad,) = torch.autograd.grad(F.mse_loss(predict_noise(pipe.unet, x_t, t, emb), want), [delta])
        delta.grad = grad if delta.grad is None else delta.grad + grad
        opt.step()
    return used


def esd_target(e_c: torch.Tensor, e_0: torch.Tensor, eta: float) -> torch.Tensor:
    """The release's ESD target ε*_∅ − η (ε*_c − ε*_∅) (``get_loss.py``), any shape."""
    return e_0 - eta * (e_c - e_0)


class Sampler:
    """Partial-DDIM draws from the frozen model for one run: ``(x_t, t)`` for a batch of frozen embeddings."""

    def __init__(self, pipe: Any, null: torch.Tensor, config: AdvUnlearnConfig, g: torch.Generator) -> None:
        self.pipe, self.null, self.config, self.g = pipe, null, config, g

    def stop(self) -> int:
        return int(torch.randint(0, self.config.ddim_steps, (), generator=self.g))

    def __call__(self, cond: torch.Tensor, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cond`` ``[B, 77, D]`` frozen embeddings; returns ``(x_t [B, C, h, w], t)``, one noise per row."""
        null = self.null.expand(cond.shape[0], -1, -1)
        cfg = self.config
        return sample_until(
            self.pipe,
            cond,
            null,
            steps=cfg.ddim_steps,
            stop=stop,
            guidance=cfg.start_guidance,
            generator=self.g,
        )

    @torch.no_grad()
    def attack_draw(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One attack sample: ``(x_t, t, ε*(x_t, cond))`` at a fresh stopping step."""
        x_t, t = self(cond, self.stop())
        return x_t, t, predict_noise(self.pipe.unet, x_t, t, cond)


def iteration_loss(
    pipe: Any,
    prompt: str,
    delta: torch.Tensor | None,
    frozen_c: torch.Tensor,
    retain: tuple[list[str], torch.Tensor] | None,
    sampler: Sampler,
) -> torch.Tensor:
    """ℓ_ESD on ``δ ⊕ prompt`` (the clean prompt when ``delta`` is None) plus γ ℓ_retain, at one stopping step.

    Args:
        frozen_c: ``[1, 77, D]`` the frozen encoder's embedding of ``prompt``.
        retain: ``(prompts, their frozen embeddings [R, 77, D])`` of this iteration, or None.
    """
    unet, cfg, stop = pipe.unet, sampler.config, sampler.stop()
    with torch.no_grad():
        x_t, t = sampler(frozen_c, stop)
        e_c, e_0 = predict_noise(
            unet, x_t.expand(2, -1, -1, -1), t, torch.cat([frozen_c, sampler.null])
        ).chunk(2)
        x_r, _ = sampler(retain[1], stop) if retain else (None, None)
    if delta is None:
        emb = encode_prompts(pipe, [prompt])
    else:
        with prefix_embeddings(pipe.text_encoder, delta):
            emb = encode_prompts(pipe, [with_prefix(prompt, cfg.attack_tokens)])
    loss = F.mse_loss(predict_noise(unet, x_t, t, emb), esd_target(e_c, e_0, cfg.negative_guidance))
    if retain:
        with torch.no_grad():
            want = predict_noise(unet, x_r, t, retain[1])
        loss = loss + cfg.retain_weight * F.mse_loss(
            predict_noise(unet, x_r, t, encode_prompts(pipe, retain[0])), want
        )
    return loss


def train(
    pipe: Any,
    concepts: list[str],
    retain: list[str],
    config: AdvUnlearnConfig,
    params: dict[str, torch.Tensor],
) -> list[float]:
    """Adversarial unlearning of the (live, trainable) text-encoder ``params``; returns each iteration's loss."""
    g, enc = generator(config.seed), pipe.text_encoder
    with torch.no_grad():  # the frozen encoder's embeddings, before any step
        conds, null = encode_prompts(pipe, concepts), encode_prompts(pipe, [""])
        retain_emb = encode_prompts(pipe, retain) if retain and config.retain_weight > 0 else None
    sampler, picks = Sampler(pipe, null, config, g), retain_picks(len(retain), config.retain_batch, g)
    table, delta = enc.get_input_embeddings().weight, None
    opt, losses = torch.optim.Adam(params.values(), lr=config.lr), []
    for i in track(range(config.iterations), desc="advunlearn", total=config.iterations):
        k = int(torch.randint(len(concepts), (), generator=g))
        c = conds[k : k + 1]
        if i >= config.warmup_iterations:
            if delta is None or config.attack_init == "random":
                delta = table[torch.randint(0, table.shape[0], (config.attack_tokens,), generator=g)]
            delta = attack(pipe, concepts[k], delta, functools.partial(sampler.attack_draw, c), config)
        pick = next(picks) if retain_emb is not None else None
        batch = ([retain[j] for j in pick], retain_emb[pick]) if pick else None
        loss = iteration_loss(pipe, concepts[k], delta, c, batch, sampler)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def erase_advunlearn(model: Any, concepts: list[str], config: AdvUnlearnConfig) -> Patch:
    """AdvUnlearn: adversarially robust ESD unlearning in the text encoder, with a retain loss."""
    pipe = check_unet_family(model, "advunlearn")
    names = trainable_names(pipe.text_encoder, config.trainable)
    retain = retain_prompts(model, concepts, config)
    with frozen(pipe.unet), trained_in_place(pipe.text_encoder, names) as params:
        train(pipe, concepts, retain, config, params)
        new = {n: p.detach().clone() for n, p in params.items()}
    return Patch.from_tensors(model, "text_encoder", new)


#: The leaderboard's budget on MiniCanvas (docs/baselines.md): 1/10 of the release's iterations with the same 1:4
#: warm-up split, and 3 of its 30 attack steps; about 2% of the release's compute per concept.
BUDGET = {"trainable": "full", "iterations": 100, "warmup_iterations": 20, "attack_steps": 3}

register(
    "advunlearn",
    AdvUnlearnConfig,
    presets={
        "paper": {"trainable": "full"},
        "budget": BUDGET,
        "all-blocks": {"trainable": "all-blocks"},
        "block0": {"trainable": "block-0"},
    },
    strength=Strength("iterations", (25, 50, 100, 200), preset="budget"),
    summary="AdvUnlearn: adversarial (prefix-embedding) ESD training of the text encoder with a retain loss",
)(erase_advunlearn)
