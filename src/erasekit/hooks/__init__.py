"""What a hooked artifact may add to a model: known module types and named hook kinds, both registered in code.

An artifact names a type or a kind and gives its config as JSON; the code that runs is always erasekit's, never
anything read from a file. Two registries, filled by the modules of this package:

- **Module types** (:data:`MODULE_TYPES`): ``low_rank_adapter`` (:mod:`.adapters`), a LoRA pair
  ``up(down(x)) · scale`` for one ``nn.Linear`` or ``nn.Conv2d``; ``adapter_eraser`` (:mod:`.adapters`), Receler's
  ``up(GELU(down(y)))`` on an attention's output. An added module is attached as a *residual*: a forward hook on
  the module it attaches to adds ``gate · module(x)`` (or ``gate · module(y)``, ``y`` the module's output, as the
  type's ``reads`` says) to that module's output (the gate is 1 unless a hook scales it); ``topk_sae``
  (:mod:`.sae`), ItD's sparse autoencoder on a text-encoder layer, which returns the shift that deactivates its
  features for the prompts its own gate lets through.
- **Hook kinds** (:data:`HOOK_KINDS`): ``prompt_gate`` (:mod:`.prompt_gate`), SPM's Facilitated Transport: a
  per-prompt scale of the artifact's adapters from the prompt's similarity to the erased prompts, computed while
  the pipeline runs; ``guidance_mix`` (:mod:`.guidance_mix`), UnGuide's per-prompt mix of the UNet's predictions
  with its gated adapters on and off; ``concept_perturb`` (:mod:`.concept_perturb`), IRECE's perturbation of
  the latents where cross-attention finds the concept.

A hook kind says where it registers hooks (``attach_points``) and whether it changes what it attaches to
(``modifies``): two artifacts whose hooks both modify one module cannot be composed. :class:`AddedModule` and
:class:`HookSpec` are the artifact's entries that name them (:mod:`erasekit.hooked`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.fingerprint import dtype_name, fingerprints, tensor_sha256
from erasekit.patch import _components_of, split_key


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
        reads: what the module is fed: ``"input"``, the target's first argument (a LoRA pair), or ``"output"``,
            the target's output (Receler's eraser after attn2, ItD's autoencoder on an encoder layer).
    """

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    misfit: Callable[[Any, nn.Module], str | None]
    summary: str = ""
    reads: str = "input"

    def __post_init__(self) -> None:
        if self.reads not in ("input", "output"):
            raise ValueError(f"reads must be 'input' or 'output', got {self.reads!r}")


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
        before_edits: install it before the artifact's tensors are written and its modules attached, so what it
            reads at install (a prompt's embedding) is the base model's, not the composite's (IRECE's un-erased
            backbone); ``False``: after them (SPM's gate measures prompts with the patched encoder).
    """

    name: str
    config_cls: type
    attach_points: Callable[[Any], tuple[str, ...]]
    install: Callable[[Mapping[str, Any], Any, Gate], list[Any]]
    modifies: bool
    summary: str = ""
    before_edits: bool = False


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


# ---- an artifact's entries ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AddedModule:
    """One added module.

    Attributes:
        name: unique within the artifact (SPM uses the attach point).
        type: a registered module type (:data:`erasekit.hooks.MODULE_TYPES`).
        config: its JSON config.
        attach: ``"component/qualified.module"``: its output is added to that module's.
        tensors: its own weights by parameter name (``down.weight``).
        fingerprints: ``{"component/qualified.module.param": {dtype: sha256}}`` of every tensor of the base module it
            attaches to.
    """

    name: str
    type: str
    config: dict[str, Any]
    attach: str
    tensors: dict[str, torch.Tensor]
    fingerprints: dict[str, dict[str, str]]

    def __post_init__(self) -> None:
        split_key(self.attach)
        if not self.fingerprints or any(not k.startswith(f"{self.attach}.") for k in self.fingerprints):
            raise ErasekitError(f"module {self.name}: fingerprints must name the tensors of {self.attach}")
        self.parsed()

    @classmethod
    def attached_to(
        cls, model: Any, attach: str, type: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> AddedModule:
        """A module attached to ``attach`` of ``model`` (only read), named after it; its base is fingerprinted."""
        target = resolve_point(_components_of(model), attach)
        prints = {f"{attach}.{n}": fingerprints(t) for n, t in target.state_dict().items()}
        own = {k: v.detach().to("cpu", torch.float32).clone() for k, v in tensors.items()}
        return cls(name=attach, type=type, config=config, attach=attach, tensors=own, fingerprints=prints)

    def parsed(self) -> Any:
        return parse_config(module_type(self.type).config_cls, self.config, f"module {self.name}")

    def build(self, device: Any = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """The module with its weights loaded strictly (missing, unexpected or misshapen weights are errors).

        Built on the meta device first, so building draws nothing from torch's global random generator."""
        with torch.device("meta"):
            module = module_type(self.type).build(self.parsed())
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in self.tensors.items()}
        if want != have:
            raise ErasekitError(f"module {self.name}: weights {sorted(have)} do not fit a {self.type} {want}")
        module = module.to_empty(device=device)
        module.load_state_dict(self.tensors, strict=True)
        if dtype is not None:
            module = module.to(dtype)
        return module.eval().requires_grad_(False)

    def check(self, components: Any) -> None:
        """Raise unless the live module at :attr:`attach` fits this module and matches its base fingerprints."""
        target = resolve_point(components, self.attach)
        reason = module_type(self.type).misfit(self.parsed(), target)
        if reason:
            raise ErasekitError(f"module {self.name} cannot attach to {self.attach}: {reason}")
        live = {f"{self.attach}.{n}": t for n, t in target.state_dict().items()}
        if set(live) != set(self.fingerprints):
            raise ErasekitError(
                f"wrong base model: {self.attach} does not hold the tensors the artifact was made on"
            )
        for key, t in live.items():
            if self.fingerprints[key].get(dtype_name(t.dtype)) != tensor_sha256(t):
                raise ErasekitError(f"wrong base model: {key}, which module {self.name} attaches to, differs")

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


@dataclass(frozen=True, kw_only=True)
class HookSpec:
    """A named, configured hook: a registered kind (:data:`erasekit.hooks.HOOK_KINDS`), its JSON config, and the
    added modules (by name) whose gate it sets."""

    name: str
    kind: str
    config: dict[str, Any]
    gates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.parsed()

    def parsed(self) -> Any:
        return parse_config(hook_kind(self.kind).config_cls, self.config, f"hook {self.name}")

    @property
    def attach(self) -> tuple[str, ...]:
        """The components or ``component/qualified`` modules it registers hooks on."""
        return tuple(hook_kind(self.kind).attach_points(self.parsed()))


def resolve_point(components: Any, point: str) -> nn.Module:
    """The live module at ``component`` or ``component/qualified``, or a one-line error."""
    comp, _, qual = point.partition("/")
    if components.get(comp) is None:
        raise ErasekitError(f"the artifact needs component {comp!r}, which the model does not have")
    try:
        return components[comp].get_submodule(qual) if qual else components[comp]
    except AttributeError:
        raise ErasekitError(f"wrong base model: it has no module {point}") from None


def attach_residual(components: Any, module: AddedModule, gate: Gate) -> Any:
    """Register ``y + gate · module(x)`` on the attach point (``y = target(x)``; the module reads ``x`` or ``y``, as
    its type says); returns the removable handle."""
    target = resolve_point(components, module.attach)
    ref = next(iter(target.parameters()))
    built = module.build(ref.device, ref.dtype)
    reads_output = module_type(module.type).reads == "output"

    def residual(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise ErasekitError(f"module {module.name}: {module.attach} does not return one tensor")
        return out + gate.scale_for(out) * built(out if reads_output else args[0])

    return target.register_forward_hook(residual)


# The built-in types and kinds register themselves; imported last, since they use the names above.
from erasekit.hooks import adapters, concept_perturb, guidance_mix, prompt_gate, sae  # noqa: E402, F401
