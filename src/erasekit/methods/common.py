"""Helpers shared by methods and attacks: selecting parameters by module path, freezing, training in place.

Parameter sets are chosen by whole dotted path components and module type, never by substrings: the
module ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` is "in attn2" because one of its path
components is exactly ``attn2``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.patch import Patch, resolve_param

LINEAR = (nn.Linear,)
LINEAR_OR_CONV = (nn.Linear, nn.Conv1d, nn.Conv2d)


def in_path(qualname: str, component: str) -> bool:
    """True when ``component`` is one whole dotted component of ``qualname``."""
    return component in qualname.split(".")


def select_modules(root: nn.Module, keep: Callable[[str, nn.Module], bool]) -> list[str]:
    """Qualified names of the modules of ``root`` for which ``keep(name, module)`` holds, in model order."""
    return [name for name, module in root.named_modules() if name and keep(name, module)]


def module_params(root: nn.Module, modules: Sequence[str]) -> list[str]:
    """Qualified names of the parameters owned directly by each of ``modules`` (weights and biases)."""
    names = []
    for mod in modules:
        names += [f"{mod}.{p}" for p, _ in root.get_submodule(mod).named_parameters(recurse=False)]
    return names


def attn2_linears(unet: nn.Module, projections: Sequence[str] | None = None) -> list[str]:
    """Linear modules of the UNet's cross-attention (``attn2``), optionally only the named projections.

    Args:
        projections: e.g. ``("to_k", "to_v")``: keep modules whose last path component is one of them.
    """

    def keep(name: str, module: nn.Module) -> bool:
        if not (isinstance(module, LINEAR) and in_path(name, "attn2")):
            return False
        return projections is None or name.split(".")[-1] in projections

    names = select_modules(unet, keep)
    if not names:
        raise ErasekitError("the UNet has no cross-attention (attn2) Linear modules to edit")
    return names


def non_attn2_layers(unet: nn.Module) -> list[str]:
    """Every Linear and Conv module of the UNet outside cross-attention (ESD-u's parameter set)."""
    return select_modules(unet, lambda n, m: isinstance(m, LINEAR_OR_CONV) and not in_path(n, "attn2"))


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for ``modules`` inside the block; both are restored after it."""
    states = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]
    try:
        for m in modules:
            m.eval().requires_grad_(False)
        yield
    finally:
        for m, training, flags in states:
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


@contextlib.contextmanager
def trained_in_place(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Make ``names`` trainable in place; on exit every one is put back to its original value, bit for bit.

    Yields:
        ``{name: live parameter}`` with ``requires_grad`` on; everything else in ``module`` is frozen.
    """
    params = {n: resolve_param(module, n) for n in names}
    saved = {n: p.detach().clone() for n, p in params.items()}
    with frozen(module):
        try:
            for p in params.values():
                p.requires_grad_(True)
            yield params
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])


def trainable_copies(module: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Detached copies of ``names`` with gradients on, to train through ``torch.func.functional_call``."""
    return {n: resolve_param(module, n).detach().clone().requires_grad_(True) for n in names}


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the only source of randomness of a method, so results do not depend on the device."""
    return torch.Generator("cpu").manual_seed(seed)


def check_positive(**values: float) -> None:
    """``ValueError`` naming the first non-positive value (used in configs' ``__post_init__``)."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def block_params(encoder: nn.Module, blocks: Sequence[int]) -> list[str]:
    """Every parameter name inside the given transformer blocks of a CLIP text encoder."""
    from erasekit.models.families import block_path

    prefixes = [block_path(encoder, b) + "." for b in blocks]
    return [n for n, _ in encoder.named_parameters() if n.startswith(tuple(prefixes))]


def drop_unchanged(patch: Patch, model: Any) -> Patch:
    """``patch`` without the tensors equal to the model's current ones (a trained tensor the loss never reached)."""
    import dataclasses

    from erasekit.patch import split_key

    def same(key: str) -> bool:
        comp, name = split_key(key)
        live = resolve_param(model.components[comp], name).detach()
        return torch.equal(patch.tensors[key].to(live.device, live.dtype), live)

    keep = [k for k in patch.tensors if not same(k)]
    return dataclasses.replace(
        patch,
        tensors={k: patch.tensors[k] for k in keep},
        fingerprints={k: patch.fingerprints[k] for k in keep},
    )


def lora_copy(
    unet: nn.Module, names: Sequence[str], rank: int, alpha: float, g: torch.Generator
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``unet`` with peft LoRA layers on ``names``: A drawn from ``g`` (kaiming-uniform, a = √5, as peft and
    the release initialise it), B zero. peft's own init runs under a forked RNG, so torch's global one is untouched."""
    import copy
    import math

    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    devices = [unet.device.index or 0] if unet.device.type == "cuda" else []
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(names), lora_dropout=0.0)
    with torch.random.fork_rng(devices=devices):
        adapted = inject_adapter_in_model(lora, copy.deepcopy(unet))
    layers = {n: adapted.get_submodule(n) for n in names}
    if not all(isinstance(layer, LoraLayer) for layer in layers.values()):
        raise ErasekitError("peft did not adapt every named layer")
    with torch.no_grad():
        for layer in layers.values():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            bound = 1.0 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(a)[0])
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=g))
            b.zero_()
            a.requires_grad_(True)
            b.requires_grad_(True)
    return adapted, layers


def peft_adapter(target: nn.Module, layer: Any, rank: int, alpha: float) -> Any:
    """A trained peft LoRA layer on ``target`` as the :class:`~erasekit.hooks.adapters.LowRankAdapter` a hooked
    artifact stores (scale ``alpha / rank``, checked against peft's own scaling), on the CPU in float32."""
    from erasekit.hooks.adapters import LowRankAdapter, low_rank_config_for

    with torch.device("meta"):  # no draw from the global generator; every weight is copied in below
        adapter = LowRankAdapter(low_rank_config_for(target, rank, alpha))
    adapter = adapter.to_empty(device="cpu")
    with torch.no_grad():
        adapter.down.weight.copy_(layer.lora_A["default"].weight)
        adapter.up.weight.copy_(layer.lora_B["default"].weight)
    if adapter.scale != layer.scaling["default"]:
        raise ErasekitError("peft's LoRA scaling differs from alpha / rank")
    return adapter.cpu().float()
