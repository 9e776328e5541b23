"""What a hooked artifact may add to a model: known module types and named hook kinds, both registered in code.

An artifact names a type or a kind and gives its config as JSON; the code that runs is always this module's, never
anything read from a file. Two registries:

- **Module types** (:data:`MODULE_TYPES`): ``low_rank_adapter``, a LoRA pair ``up(down(x)) · scale`` built for one
  ``nn.Linear`` or ``nn.Conv2d``. An added module is attached as a *residual*: a forward hook on the module it
  attaches to adds ``gate · module(x)`` to that module's output (the gate is 1 unless a hook scales it).
- **Hook kinds** (:data:`HOOK_KINDS`): ``prompt_gate``, SPM's Facilitated Transport: a per-prompt scale of the
  artifact's adapters from the prompt's similarity to the erased prompts, computed while the pipeline runs.

A hook kind says where it registers hooks (``attach_points``) and whether it changes what it attaches to
(``modifies``): two artifacts whose hooks both modify one module cannot be composed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError

LAYERS = ("linear", "conv2d")
METRICS = ("clipcos", "tokenuni", "clipcos_tokenuni")


class Gate:
    """The scale a hook sets for the modules it gates: ``None`` (1 everywhere) or one value per batch row."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None  # [N] while a UNet call runs

    def scale_for(self, out: torch.Tensor) -> torch.Tensor | float:
        """The gate broadcast against ``out`` ``[N, ...]`` (batch first)."""
        if self.value is None:
            return 1.0
        if self.value.shape[0] != out.shape[0]:
            raise ErasekitError(
                f"a gated module saw a batch of {out.shape[0]}, its gate has {self.value.shape[0]}"
            )
        return self.value.to(out.device, out.dtype).view(-1, *([1] * (out.ndim - 1)))


# ---- module types ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleType:
    """A kind of module an artifact may add.

    Attributes:
        name: the name artifacts use (``low_rank_adapter``).
        config_cls: frozen dataclass of the JSON config (unknown keys are errors).
        build: ``build(config) -> nn.Module`` (weights are loaded into it afterwards, strictly).
        misfit: ``misfit(config, target) -> reason`` why the module cannot attach to ``target``, or ``None``.
        summary: one line.
    """

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    misfit: Callable[[Any, nn.Module], str | None]
    summary: str = ""


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    """A LoRA pair for one Linear (``in -> rank -> out``) or Conv2d (down: the target's kernel; up: 1x1)."""

    layer: str = field(metadata={"help": f"the layer it attaches to: {', '.join(LAYERS)}"})
    in_features: int = field(metadata={"help": "input features / channels of the target"})
    out_features: int = field(metadata={"help": "output features / channels of the target"})
    rank: int = field(default=1, metadata={"help": "rank of the pair"})
    scale: float = field(default=1.0, metadata={"help": "alpha / rank: the output is up(down(x)) * scale"})
    kernel_size: tuple[int, int] = field(default=(1, 1), metadata={"help": "conv2d: the target's kernel"})
    stride: tuple[int, int] = field(default=(1, 1), metadata={"help": "conv2d: the target's stride"})
    padding: tuple[int, int] = field(default=(0, 0), metadata={"help": "conv2d: the target's padding"})
    dilation: tuple[int, int] = field(default=(1, 1), metadata={"help": "conv2d: the target's dilation"})

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {self.layer!r}")
        if min(self.in_features, self.out_features, self.rank) < 1:
            raise ValueError("in_features, out_features and rank must be >= 1")
        for name in ("kernel_size", "stride", "padding", "dilation"):
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(v, int) for v in value):
                raise ValueError(f"{name} must be two integers, got {value!r}")


class LowRankAdapter(nn.Module):
    """``up(down(x)) · scale``: a LoRA pair, its output added to the target's (shapes as the target's)."""

    def __init__(self, config: LowRankConfig) -> None:
        super().__init__()
        c = config
        self.scale = c.scale
        if c.layer == "linear":
            self.down: nn.Module = nn.Linear(c.in_features, c.rank, bias=False)
            self.up: nn.Module = nn.Linear(c.rank, c.out_features, bias=False)
        else:
            self.down = nn.Conv2d(
                c.in_features, c.rank, c.kernel_size, c.stride, c.padding, c.dilation, bias=False
            )
            self.up = nn.Conv2d(c.rank, c.out_features, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The same map folded into the target's weight: ``[out, in]`` or ``[out, in, kh, kw]``.

        Exact for a conv because ``up`` is 1x1: ``conv(conv(x, A), B) = conv(x, Σ_r B[:, r] A[r])``.
        """
        up = self.up.weight.flatten(1)  # [out, rank]
        down = self.down.weight  # [rank, in] or [rank, in, kh, kw]
        return torch.einsum("or,r...->o...", up, down) * self.scale


def low_rank_config_for(target: nn.Module, rank: int, alpha: float) -> LowRankConfig:
    """The adapter config that fits ``target`` (an ``nn.Linear`` or ``nn.Conv2d``); ``scale = alpha / rank``."""
    if isinstance(target, nn.Linear):
        return LowRankConfig(layer="linear", in_features=target.in_features, out_features=target.out_features,
                             rank=rank, scale=alpha / rank)  # fmt: skip
    if isinstance(target, nn.Conv2d) and target.groups == 1 and isinstance(target.padding, tuple):
        return LowRankConfig(layer="conv2d", in_features=target.in_channels, out_features=target.out_channels,
                             rank=rank, scale=alpha / rank, kernel_size=tuple(target.kernel_size),
                             stride=tuple(target.stride), padding=tuple(target.padding),
                             dilation=tuple(target.dilation))  # fmt: skip
    raise ErasekitError(
        f"a low-rank adapter attaches to a Linear or an ungrouped Conv2d, not {type(target).__name__}"
    )


def _low_rank_misfit(config: LowRankConfig, target: nn.Module) -> str | None:
    try:
        fitting = low_rank_config_for(target, config.rank, config.scale * config.rank)
    except ErasekitError as e:
        return str(e)
    if dataclasses.replace(fitting, scale=config.scale) != config:
        return f"the adapter was made for a different {type(target).__name__} ({config})"
    return None


MODULE_TYPES: dict[str, ModuleType] = {}


def register_module_type(spec: ModuleType) -> None:
    if spec.name in MODULE_TYPES:
        raise ValueError(f"module type {spec.name!r} registered twice")
    MODULE_TYPES[spec.name] = spec


def module_type(name: str) -> ModuleType:
    """The module type called ``name``, or a one-line error (an artifact naming an unknown type is refused)."""
    if name not in MODULE_TYPES:
        raise ErasekitError(
            f"unknown module type {name!r}; this erasekit knows {', '.join(sorted(MODULE_TYPES))}"
        )
    return MODULE_TYPES[name]


register_module_type(ModuleType("low_rank_adapter", LowRankConfig, LowRankAdapter, _low_rank_misfit,
                                "a LoRA pair added to one Linear or Conv2d's output"))  # fmt: skip


# ---- hook kinds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookKind:
    """A kind of hook an artifact may name.

    Attributes:
        name: the name artifacts use (``prompt_gate``).
        config_cls: frozen dataclass of the JSON config (unknown keys are errors).
        attach_points: ``attach_points(config) -> ("unet", "text_encoder", ...)``: the components or
            ``component/qualified`` modules it registers hooks on.
        install: ``install(components, config, gate) -> [RemovableHandle]``; it sets ``gate`` for the modules it
            scales. On error it must leave nothing registered.
        modifies: whether it changes the computation of what it attaches to (not only reads it and sets its gate);
            two hooks that modify one attach point cannot be composed.
        summary: one line.
    """

    name: str
    config_cls: type
    attach_points: Callable[[Any], tuple[str, ...]]
    install: Callable[[Mapping[str, Any], Any, Gate], list[Any]]
    modifies: bool
    summary: str = ""


HOOK_KINDS: dict[str, HookKind] = {}


def register_hook_kind(spec: HookKind) -> None:
    if spec.name in HOOK_KINDS:
        raise ValueError(f"hook kind {spec.name!r} registered twice")
    HOOK_KINDS[spec.name] = spec


def hook_kind(name: str) -> HookKind:
    """The hook kind called ``name``, or a one-line error (an artifact naming an unknown kind is refused)."""
    if name not in HOOK_KINDS:
        raise ErasekitError(
            f"unknown hook kind {name!r}; this erasekit knows {', '.join(sorted(HOOK_KINDS))}"
        )
    return HOOK_KINDS[name]


def parse_config(config_cls: type, data: Mapping[str, Any], what: str) -> Any:
    """``config_cls`` from JSON data (lists become tuples); unknown keys and invalid values are one-line errors."""
    from erasekit.registry import build

    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ErasekitError(f"{what}: unknown config key(s) {unknown}")
    values = {k: _tuples(v) for k, v in data.items()}
    return build(config_cls, values, what)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


# ---- prompt_gate: SPM's Facilitated Transport -----------------------------------------------------------


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
