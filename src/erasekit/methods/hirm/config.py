"""HiRM's configuration: one frozen, keyword-only dataclass per method, and the presets.

``hirm-r`` misdirects toward a scaled random vector (:class:`HirmConfig`); ``hirm-s`` toward the frozen
encoder's representation of a super-category anchor (:class:`HirmSConfig`). Everything else is shared.
Fields left ``None`` (steps, lr, anchor) are resolved per concept type in ``__post_init__``, so a saved
config always states the values that were used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from erasekit.concepts import CONCEPT_TYPES

TARGETS = ("random", "semantic")
LOSS_POSITIONS = ("all", "no_bos", "content")
MULTI_MODES = ("joint", "average")
COEFFICIENT_MODES = ("absolute", "relative")
TARGET_DISTRIBUTIONS = ("uniform", "centered", "gaussian")
PARTS = ("attn", "mlp")
WORLD_RETAIN = ("none", "kind", "all")

# The released code's nudity prompt, kept byte for byte (including the space before the first comma).
NUDITY_PROMPT = "naked ,nude, bare, exposed, Stripped, topless, male genitalia, penis, buttocks"

# The released README's step counts and the paper's learning rates.
PAPER_STEPS = {"style": 20, "object": 15, "nsfw": 50}
# HiRM-S's own step counts in the paper's notes (shared/reference/hirm.md); its ``paper`` preset uses them.
HIRM_S_PAPER_STEPS = {"style": 30, "object": 15, "nsfw": 25}
PAPER_LR = {"style": 5e-5, "object": 5e-5, "nsfw": 1e-4}

# HiRM-S anchors when none is given. "painting" is the paper's own example for a style ("Van Gogh" ->
# "painting"): every UnlearnCanvas style prompt is "a painting of ... in X style", so the anchor keeps the
# medium and drops the artist. "object" is the most generic noun that fits every UnlearnCanvas object class
# (animals, buildings, waterfalls, sandwiches). nsfw has no anchor: it uses safe misdirection (see eta).
DEFAULT_ANCHORS: dict[str, str | None] = {"style": "painting", "object": "object", "nsfw": None}

_SUPERVISION = re.compile(r"^(attn_out|block):(-?\d+)$|^last_hidden_state$")


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class HirmConfig:
    """HiRM-R: update early blocks so the concept's late representation hits a scaled random vector."""

    concept_type: Literal["style", "object", "nsfw"] = field(
        default="style", metadata=_help("concept type: sets the default steps, lr and anchor")
    )
    target: Literal["random", "semantic"] = field(
        default="random", metadata=_help("misdirection target: random (hirm-r) or semantic (hirm-s)")
    )
    steps: int | None = field(
        default=None,
        metadata=_help("optimisation steps; None = released README's (style 20, object 15, nsfw 50)"),
    )
    lr: float | None = field(
        default=None, metadata=_help("AdamW learning rate; None = 5e-5 (style/object), 1e-4 (nsfw)")
    )
    betas: tuple[float, float] = field(default=(0.9, 0.98), metadata=_help("AdamW betas"))
    eps: float = field(default=1e-6, metadata=_help("AdamW eps"))
    weight_decay: float = field(default=1e-8, metadata=_help("AdamW weight decay"))
    seed: int = field(default=42, metadata=_help("seed of the random target (drawn on the CPU)"))
    coefficient: float = field(
        default=5000.0, metadata=_help("steering coefficient c: the target's Frobenius norm (R) or scale (S)")
    )
    coefficient_mode: Literal["absolute", "relative"] = field(
        default="absolute",
        metadata=_help(
            "hirm-r: absolute (paper: the target's norm is c) or relative (c x the norm of the concept's own "
            "frozen activation at the supervision point, so c means the same on every encoder)"
        ),
    )
    target_distribution: Literal["uniform", "centered", "gaussian"] = field(
        default="uniform",
        metadata=_help(
            "hirm-r: the random draw before scaling: uniform U(0,1) (paper, all positive), centered U(0,1)-0.5 "
            "or gaussian N(0,1) (both zero-mean)"
        ),
    )
    anchor: str | None = field(
        default=None,
        metadata=_help("hirm-s super-category prompt; None = per type (style: painting, object: object)"),
    )
    eta: float = field(
        default=3.0, metadata=_help("hirm-s nsfw without anchor: target = rep(prompt) - eta * nudity vector")
    )
    nudity_prompt: str = field(
        default=NUDITY_PROMPT, metadata=_help("for type nsfw, the prompt trained for the concept 'nudity'")
    )
    blocks: tuple[int, ...] = field(
        default=(0,), metadata=_help("indices of the trained blocks (negative from end)")
    )
    parts: tuple[Literal["attn", "mlp"], ...] = field(
        default=("attn", "mlp"),
        metadata=_help("trained parts of each block: attn (q/k/v/out) and/or mlp (fc1/fc2)"),
    )
    train_layernorm: bool = field(
        default=False, metadata=_help("also train the trained blocks' two LayerNorms")
    )
    train_embeddings: bool = field(default=False, metadata=_help("also train token and position embeddings"))
    supervision: str = field(
        default="attn_out:-1",
        metadata=_help(
            "where the loss looks: attn_out:N (self-attn out_proj), block:N, or last_hidden_state"
        ),
    )
    loss_positions: Literal["all", "no_bos", "content"] = field(
        default="all",
        metadata=_help("positions in the loss: all 77 (paper), no_bos, or content (no BOS, no padding)"),
    )
    templates: tuple[str, ...] = field(
        default=(),
        metadata=_help("extra prompts per concept, '{}' marks the concept (e.g. 'in the style of {}')"),
    )
    synonyms: tuple[str, ...] = field(
        default=(), metadata=_help("other names of the (single) concept, trained with the same target")
    )
    retain_prompts: tuple[str, ...] = field(
        default=(), metadata=_help("prompts whose representation is kept at the frozen encoder's value")
    )
    world_retain: Literal["none", "kind", "all"] = field(
        default="none",
        metadata=_help(
            "with MiniCanvas targets, also keep other MiniCanvas concepts as bare names: kind (the other "
            "concepts of the target's kind, SPEED's retain set) or all (those and every concept of the other "
            "kind); nothing is added for concepts outside MiniCanvas"
        ),
    )
    preserve_weight: float = field(
        default=1.0, metadata=_help("weight of the retain-prompt preservation loss")
    )
    preserve_at: str = field(
        default="",
        metadata=_help(
            "where the preservation loss reads: empty = the supervision point, or attn_out:N, block:N, "
            "last_hidden_state (the encoder output the denoiser reads)"
        ),
    )
    preserve_unconditional: bool = field(
        default=False,
        metadata=_help(
            "also keep the empty prompt (the unconditional embedding classifier-free guidance uses) at its "
            "frozen value, in the preservation loss"
        ),
    )
    multi: Literal["joint", "average"] = field(
        default="joint",
        metadata=_help(
            "several concepts: joint (one run, each its own target) or average (paper: mean of runs)"
        ),
    )

    def __post_init__(self) -> None:
        _check_choice("concept_type", self.concept_type, CONCEPT_TYPES)
        _check_choice("target", self.target, TARGETS)
        _check_choice("loss_positions", self.loss_positions, LOSS_POSITIONS)
        _check_choice("multi", self.multi, MULTI_MODES)
        _check_choice("coefficient_mode", self.coefficient_mode, COEFFICIENT_MODES)
        _check_choice("target_distribution", self.target_distribution, TARGET_DISTRIBUTIONS)
        _check_choice("world_retain", self.world_retain, WORLD_RETAIN)
        random_only = {"coefficient_mode": "absolute", "target_distribution": "uniform"}
        changed = [k for k, v in random_only.items() if getattr(self, k) != v]
        if self.target != "random" and changed:
            raise ValueError(
                f"{changed[0]} applies to random targets (hirm-r) only; for target={self.target!r} use hirm-s"
            )
        self._resolve("steps", PAPER_STEPS[self.concept_type])
        self._resolve("lr", PAPER_LR[self.concept_type])
        if self.target == "semantic":
            self._resolve("anchor", DEFAULT_ANCHORS[self.concept_type])
        self._check_numbers()
        self._check_parameters()
        self._check_prompts()
        for name in ("supervision", "preserve_at"):
            value = getattr(self, name)
            if not _SUPERVISION.match(value) and not (name == "preserve_at" and value == ""):
                raise ValueError(f"{name} {value!r}: use attn_out:N, block:N or last_hidden_state")

    def _resolve(self, name: str, value: Any) -> None:
        if getattr(self, name) is None:
            object.__setattr__(self, name, value)  # frozen: fill a derived default once, at construction

    def _check_numbers(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0 or not self.eps > 0 or self.weight_decay < 0:
            raise ValueError("lr and eps must be positive and weight_decay non-negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.coefficient > 0:
            raise ValueError(f"coefficient must be positive, got {self.coefficient!r}")
        if self.eta < 0 or self.preserve_weight < 0:
            raise ValueError("eta and preserve_weight must be non-negative")

    def _check_parameters(self) -> None:
        if not self.blocks or not all(isinstance(b, int) and not isinstance(b, bool) for b in self.blocks):
            raise ValueError(f"blocks must be a non-empty tuple of integers, got {self.blocks!r}")
        if len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"blocks repeats an index: {self.blocks!r}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts must be distinct values among {PARTS}, got {self.parts!r}")
        if not (self.parts or self.train_layernorm or self.train_embeddings):
            raise ValueError("nothing to train: give parts, or train_layernorm / train_embeddings")

    def _check_prompts(self) -> None:
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise ValueError(f"template {bad[0]!r} has no '{{}}' placeholder for the concept")
        if any(not s.strip() for s in (*self.synonyms, *self.retain_prompts)):
            raise ValueError("synonyms and retain prompts must be non-blank")
        if self.anchor is not None and not self.anchor.strip():
            raise ValueError("anchor must be non-blank")
        if not self.nudity_prompt.strip():
            raise ValueError("nudity_prompt must be non-blank")


@dataclass(frozen=True, kw_only=True)
class HirmSConfig(HirmConfig):
    """HiRM-S: misdirect toward the frozen encoder's representation of a super-category anchor."""

    target: Literal["random", "semantic"] = field(
        default="semantic", metadata=_help("misdirection target: random (hirm-r) or semantic (hirm-s)")
    )
    coefficient: float = field(
        default=1.0, metadata=_help("steering coefficient c: the target's Frobenius norm (R) or scale (S)")
    )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")


# ---- presets ---------------------------------------------------------------------------------------------

_PAPER_COMMON = {
    "seed": 42,
    "supervision": "attn_out:-1",
    "loss_positions": "all",
    "blocks": (0,),
    "parts": ("attn", "mlp"),
    "multi": "average",
}


def paper_preset(coefficient: float, steps: dict[str, int] = PAPER_STEPS) -> dict[str, Any]:
    """The released code's settings: raw concept padded to 77, batch 1, ``steps`` per type, seed 42."""
    typed = {t: {"steps": steps[t], "lr": PAPER_LR[t]} for t in CONCEPT_TYPES}
    return {**_PAPER_COMMON, "coefficient": coefficient, **typed}


def presets(
    coefficient: float, default_changes: dict[str, Any] | None = None, steps: dict[str, int] = PAPER_STEPS
) -> dict[str, dict[str, Any]]:
    """``paper`` and ``default``: ``default`` is ``paper`` plus ``default_changes`` (shared fields, and per
    concept type a dict merged into that type's own), chosen on the dev concepts (docs/hirm.md). ``steps``: per
    concept type (hirm-s: the paper's notes)."""
    paper = paper_preset(coefficient, steps)
    default = dict(paper)
    for key, value in (default_changes or {}).items():
        default[key] = {**paper[key], **value} if key in CONCEPT_TYPES else value
    return {"paper": paper, "default": default}


#: Prompts that name no concept: they hold the shared tokens (BOS, the end-of-text padding, common template words)
#: at their frozen representation while the concept's moves. None of them is a MiniCanvas grid caption, and none
#: is specific to MiniCanvas, so they carry to any CLIP encoder.
GENERIC_RETAIN = ("an image", "a picture", "A image in style.", "style artwork", "a photo of a thing")

#: What hirm-r's ``default`` changes from ``paper``, for styles and objects (nudity keeps ``paper``: not measured).
#: Chosen on the dev concepts only (docs/hirm.md, "Choosing `default` on dev"; benchmarks/hirm_default_search.py):
#: - the target is scale-free: a zero-mean Gaussian direction whose norm is ``coefficient`` (2) times the norm of
#:   the concept's own frozen activation, instead of U(0, 1) scaled to norm 5000 (190 times MiniCanvas's
#:   activation, a different multiple on every encoder);
#: - the loss reads the encoder's output (``last_hidden_state``, what the denoiser reads) rather than the last
#:   block's attention ``out_proj``;
#: - preserved at weight 20: the generic prompts above, the empty prompt and, for MiniCanvas targets, every other
#:   MiniCanvas concept as a bare name (``world_retain="all"``: the world's analogue of the concept lists SPEED
#:   and UCE retain; on other models pass your own ``retain_prompts``);
#: - lr 1e-4 and the steps the leaderboard's dev sweep chose by its rule: 75 for styles, 50 for objects
#:   (docs/hirm.md, docs/leaderboard.md; the paper: 20 / 15 at 5e-5). More steps erase more and cost
#:   retention (the dev frontier).
_DEFAULT_TYPED = {
    "coefficient_mode": "relative",
    "coefficient": 2.0,
    "target_distribution": "gaussian",
    "supervision": "last_hidden_state",
    "retain_prompts": GENERIC_RETAIN,
    "world_retain": "all",
    "preserve_unconditional": True,
    "preserve_weight": 20.0,
    "lr": 1e-4,
}
HIRM_R_DEFAULT = {"style": {**_DEFAULT_TYPED, "steps": 75}, "object": {**_DEFAULT_TYPED, "steps": 50}}
