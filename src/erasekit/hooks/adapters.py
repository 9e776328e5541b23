"""``low_rank_adapter``: a LoRA pair added to one ``nn.Linear`` or ``nn.Conv2d``'s output (SPM's adapters)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.hooks import ModuleType, register_module_type

LAYERS = ("linear", "conv2d")


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


register_module_type(ModuleType("low_rank_adapter", LowRankConfig, LowRankAdapter, _low_rank_misfit,
                                "a LoRA pair added to one Linear or Conv2d's output"))  # fmt: skip


# ---- Receler's eraser ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EraserConfig:
    """Receler's eraser on one cross-attention: ``dim -> rank -> dim`` with a GELU between."""

    dim: int = field(metadata={"help": "the attention's output width"})
    rank: int = field(metadata={"help": "the eraser's hidden width"})

    def __post_init__(self) -> None:
        if min(self.dim, self.rank) < 1:
            raise ValueError("dim and rank must be >= 1")


class AdapterEraser(nn.Module):
    """``up(GELU(down(y)))``, fed the attention's output ``y`` ``[B, HW, dim]``; the result is added to ``y``."""

    def __init__(self, config: EraserConfig) -> None:
        super().__init__()
        self.down = nn.Linear(config.dim, config.rank)
        self.up = nn.Linear(config.rank, config.dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(y)))


def attention_width(target: nn.Module) -> int | None:
    """The output width of a diffusers ``Attention`` (``to_out[0]``), or ``None`` for anything else."""
    from diffusers.models.attention_processor import Attention

    if not isinstance(target, Attention) or not isinstance(target.to_out[0], nn.Linear):
        return None
    return target.to_out[0].out_features


def _eraser_misfit(config: EraserConfig, target: nn.Module) -> str | None:
    width = attention_width(target)
    if width is None:
        return f"an eraser attaches to a diffusers Attention, not {type(target).__name__}"
    return None if width == config.dim else f"the attention is {width} wide, the eraser {config.dim}"


register_module_type(ModuleType("adapter_eraser", EraserConfig, AdapterEraser, _eraser_misfit,
                                "Receler's eraser: Linear, GELU, Linear on an attention's output",
                                reads="output"))  # fmt: skip
