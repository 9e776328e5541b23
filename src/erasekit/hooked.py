"""The hooked artifact: an erasure that adds modules and hooks to a model, not only changed tensors.

Some erasers live at inference time (SPM's Facilitated Transport scales its adapters per prompt). A
:class:`HookedPatch` holds

- changed tensors: an optional inner :class:`~erasekit.patch.Patch`;
- **added modules**: each a known type of :mod:`erasekit.hooks` (``low_rank_adapter``), its config, its weights
  and the module it attaches to (``unet/<qualified>``), with the fingerprints of that module's base tensors;
- **named, configured hooks**: each a known kind of :mod:`erasekit.hooks` (``prompt_gate``), its config and the
  added modules it scales.

On disk it is a directory like a patch's (``erasure_config.json`` with ``"kind": "hooked"``, ``patch.safetensors``,
``modules.safetensors``); the layout is in docs/architecture.md, "The hooked artifact". Applying checks every
fingerprint, installs the hooks whose kind reads the base model (``before_edits``), writes the inner patch, then
registers the modules and the other hooks with torch's removable handles; the
handle's ``remove()`` takes them all off and restores the tensors, so outputs after removal are bitwise those from
before. :func:`load_erasure` reads either kind; :func:`compose` combines any mix of the two.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.fingerprint import tensor_sha256
from erasekit.hooks import AddedModule, Gate, HookSpec, attach_residual, hook_kind, resolve_point
from erasekit.io import atomic_write_json, output_dir
from erasekit.patch import (
    _KNOWN_KEYS,
    CONFIG_FILE,
    FORMAT_VERSION,
    TENSOR_FILE,
    Patch,
    _components_of,
    _read_config,
    _read_tensors,
    split_key,
)
from erasekit.patch import KIND as PATCH_KIND

KIND = "hooked"
MODULE_FILE = "modules.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_KEYS = _KNOWN_KEYS | {"modules", "hooks"}
_MODULE_KEYS = {"name", "type", "config", "attach", "fingerprints", "tensors"}
_HOOK_KEYS = {"name", "kind", "config", "attach", "gates"}


@dataclass(frozen=True, kw_only=True)
class HookedPatch:
    """Changed tensors, added modules and named hooks, plus everything needed to check, reproduce and undo them.

    Attributes:
        patch: the changed tensors, or ``None``.
        modules: the added modules.
        hooks: the hooks.
        method, config, concepts, base_model, erase_seconds, provenance, parts: as :class:`~erasekit.patch.Patch`.
    """

    patch: Patch | None = None
    modules: tuple[AddedModule, ...] = ()
    hooks: tuple[HookSpec, ...] = ()
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    concepts: tuple[str, ...] = ()
    base_model: str = ""
    erase_seconds: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    parts: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.modules and not self.hooks:
            raise ErasekitError("a hooked artifact needs added modules or a hook (otherwise it is a Patch)")
        problem = conflicts(self.patch, self.modules, self.hooks)
        if problem:
            raise ErasekitError(problem)

    # ---- inspection --------------------------------------------------------------------------------

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The changed tensors (the inner patch's)."""
        return self.patch.tensors if self.patch is not None else {}

    @property
    def components(self) -> list[str]:
        """Every component the artifact changes, attaches to or hooks."""
        points = [m.attach for m in self.modules] + [a for h in self.hooks for a in h.attach]
        return sorted(set(self.patch.components if self.patch else []) | {p.split("/")[0] for p in points})

    def num_parameters(self) -> int:
        return (self.patch.num_parameters() if self.patch else 0) + sum(
            m.num_parameters() for m in self.modules
        )

    def summary(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "method": self.method,
            "concepts": list(self.concepts),
            "base_model": self.base_model,
            "erase_seconds": self.erase_seconds,
            "components": self.components,
            "tensors": len(self.tensors),
            "modules": len(self.modules),
            "hooks": [f"{h.name} ({h.kind})" for h in self.hooks],
            "parameters": self.num_parameters(),
        }

    def fingerprint(self) -> str:
        """One SHA-256 over the tensors, the modules (type, config, attach, weights) and the hooks' configs."""
        parts = {
            "tensors": self.patch.fingerprint() if self.patch else "",
            "modules": [
                [
                    m.name,
                    m.type,
                    m.config,
                    m.attach,
                    {k: tensor_sha256(v) for k, v in sorted(m.tensors.items())},
                ]
                for m in self.modules
            ],  # fmt: skip
            "hooks": [[h.name, h.kind, h.config, list(h.gates)] for h in self.hooks],
        }
        import hashlib

        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    # ---- applying ----------------------------------------------------------------------------------

    def check(self, model: Any) -> None:
        """Raise :class:`ErasekitError` unless ``model`` is the base every part was made on."""
        components = _components_of(model)
        if self.patch is not None:
            self.patch.check(model)
        for m in self.modules:
            m.check(components)
        for h in self.hooks:
            for point in h.attach:
                resolve_point(components, point)

    def apply_(self, model: Any, check: bool = True) -> HookedHandle:
        """Install the ``before_edits`` hooks, write the tensors, then attach the modules and the other hooks, to
        ``model`` (a pipeline or LoadedModel).

        Apply it after the pipeline is on its device: the modules are built on the device and in the dtype of
        the modules they attach to. Returns a handle whose ``remove()`` undoes everything exactly.
        """
        if check:
            self.check(model)
        components = _components_of(model)
        gates = {h.name: Gate() for h in self.hooks}
        gate_of = {name: gates[h.name] for h in self.hooks for name in h.gates}
        handle = HookedHandle()
        first = [h for h in self.hooks if hook_kind(h.kind).before_edits]
        try:
            for h in first:  # they read the base model at install
                handle.hooks += hook_kind(h.kind).install(components, h.parsed(), gates[h.name])
            handle.patch = self.patch.apply_(model, check=False) if self.patch is not None else None
            for m in self.modules:
                handle.hooks.append(attach_residual(components, m, gate_of.get(m.name, Gate())))
            for h in self.hooks:
                if h not in first:
                    handle.hooks += hook_kind(h.kind).install(components, h.parsed(), gates[h.name])
        except BaseException:
            handle.remove()
            raise
        return handle

    @contextlib.contextmanager
    def applied(self, model: Any, check: bool = True) -> Iterator[Any]:
        """Context manager: applied inside the block, removed after it (also on errors)."""
        handle = self.apply_(model, check=check)
        try:
            yield model
        finally:
            handle.remove()

    def without_components(self, drop: Iterable[str]) -> HookedPatch | Patch | None:
        """The artifact less its tensors and modules in the ``drop`` components, and less the hooks that modify
        one of them or gate only dropped modules; a plain Patch (or ``None``) when no module or hook is left."""
        drop = set(drop)
        patch = self.patch
        if patch is not None:
            keep = [k for k in patch.tensors if split_key(k)[0] not in drop]
            patch = Patch(tensors={k: patch.tensors[k] for k in keep}, fingerprints={k: patch.fingerprints[k] for k in keep},
                          method=patch.method) if keep else None  # fmt: skip
        modules = tuple(m for m in self.modules if split_key(m.attach)[0] not in drop)
        names = {m.name for m in modules}
        hooks = []
        for h in self.hooks:
            touched = hook_kind(h.kind).modifies and any(p.split("/")[0] in drop for p in h.attach)
            gates = tuple(g for g in h.gates if g in names)
            if not touched and (gates or not h.gates):
                hooks.append(HookSpec(name=h.name, kind=h.kind, config=h.config, gates=gates))
        if not modules and not hooks:
            return patch
        return HookedPatch(patch=patch, modules=modules, hooks=tuple(hooks), **self._meta())

    def _meta(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "concepts": self.concepts, "base_model": self.base_model,
                "erase_seconds": self.erase_seconds, "provenance": self.provenance, "parts": self.parts}  # fmt: skip

    # ---- persistence -------------------------------------------------------------------------------

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the artifact directory atomically; an existing ``path`` is refused unless ``overwrite``."""
        from safetensors.torch import save_file

        with output_dir(path, overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / TENSOR_FILE))
            weights = {f"{m.name}/{n}": t.contiguous() for m in self.modules for n, t in m.tensors.items()}
            save_file(weights, str(tmp / MODULE_FILE))
            atomic_write_json(tmp / CONFIG_FILE, self._config_json())
        return Path(path)

    def _config_json(self) -> dict[str, Any]:
        inner = self.patch
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in self._meta().items()},
            "fingerprints": inner.fingerprints if inner else {},
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in self.tensors.items()},
            "modules": [
                {
                    "name": m.name,
                    "type": m.type,
                    "config": m.config,
                    "attach": m.attach,
                    "fingerprints": m.fingerprints,
                    "tensors": {
                        k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in m.tensors.items()
                    },
                }
                for m in self.modules
            ],  # fmt: skip
            "hooks": [
                {
                    "name": h.name,
                    "kind": h.kind,
                    "config": h.config,
                    "attach": list(h.attach),
                    "gates": list(h.gates),
                }
                for h in self.hooks
            ],  # fmt: skip
        }

    @classmethod
    def load(cls, path: str | Path) -> HookedPatch:
        """Load strictly: missing or unexpected tensors, unknown module types or hook kinds, pickles are errors."""
        path = Path(path)
        meta = _read_config(path, _KEYS, KIND)
        _refuse_pickles(path)
        inner = _read_tensors(path / TENSOR_FILE)
        if set(inner) != set(meta["fingerprints"]):
            raise ErasekitError(f"corrupt artifact {path}: {TENSOR_FILE} does not hold the declared tensors")
        weights = _read_tensors(path / MODULE_FILE)
        modules = tuple(_module_from(entry, weights, path) for entry in meta.get("modules", []))
        used = {f"{m.name}/{k}" for m in modules for k in m.tensors}
        if used != set(weights):
            raise ErasekitError(
                f"corrupt artifact {path}: unexpected tensors {sorted(set(weights) - used)[:3]}"
            )
        hooks = tuple(_hook_from(entry, path) for entry in meta.get("hooks", []))
        patch = (
            Patch(tensors=inner, fingerprints=meta["fingerprints"], method=meta["method"]) if inner else None
        )
        return cls(
            patch=patch, modules=modules, hooks=hooks, method=meta["method"], config=meta.get("config", {}),
            concepts=tuple(meta.get("concepts", ())), base_model=meta.get("base_model", ""),
            erase_seconds=meta.get("erase_seconds"), provenance=meta.get("provenance", {}),
            parts=tuple(meta.get("parts", ())),
        )  # fmt: skip


class HookedHandle:
    """Returned by :meth:`HookedPatch.apply_`; ``remove()`` takes every hook off and restores the tensors."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []
        self.patch: Any | None = None

    def remove(self) -> None:
        for h in reversed(self.hooks):
            h.remove()
        self.hooks = []
        if self.patch is not None:
            self.patch.remove()
            self.patch = None


# ---- one loader, one composition ------------------------------------------------------------------------


def load_erasure(path: str | Path) -> Patch | HookedPatch:
    """Load an erasure artifact of either kind (``erasure_config.json``'s ``kind``; none means a patch)."""
    path = Path(path)
    kind = PATCH_KIND
    with contextlib.suppress(OSError, ValueError, AttributeError):
        kind = json.loads((path / CONFIG_FILE).read_text("utf-8")).get("kind", PATCH_KIND)
    if kind == KIND:
        return HookedPatch.load(path)
    if kind != PATCH_KIND:
        raise ErasekitError(
            f"{path}: unknown artifact kind {kind!r}; this erasekit reads 'patch' and 'hooked'"
        )
    return Patch.load(path)


def compose(
    items: Sequence[Patch | HookedPatch], merge: str | None = None, label: str = ""
) -> Patch | HookedPatch:
    """Combine artifacts of one base model: a Patch when all are Patches, else a HookedPatch; one is returned as is.

    The changed tensors compose as :meth:`Patch.compose` does (``merge`` for tensors changed twice). Modules and
    hooks are kept, each hook gating its own artifact's modules (names get a ``<part>:`` prefix when two hooked
    artifacts are combined). Refused: a tensor that an added module's base depends on being changed, and two
    hooks that both modify one attach point.
    """
    if not items:
        raise ErasekitError("nothing to compose")
    if all(isinstance(i, Patch) for i in items):
        return Patch.compose(list(items), merge, label)
    if len(items) == 1:
        return items[0]
    what = f"cannot stack {label}: " if label else "cannot compose: "
    patches = [p for i in items for p in ([i] if isinstance(i, Patch) else [i.patch] if i.patch else [])]
    inner = Patch.compose(patches, merge, label) if patches else None
    hooked = [i for i in items if isinstance(i, HookedPatch)]
    modules, hooks = [], []
    for n, item in enumerate(hooked):
        prefix = f"{n}:" if len(hooked) > 1 else ""
        modules += [_renamed(m, prefix + m.name) for m in item.modules]
        hooks += [HookSpec(name=prefix + h.name, kind=h.kind, config=h.config, gates=tuple(prefix + g for g in h.gates))
                  for h in item.hooks]  # fmt: skip
    problem = conflicts(inner, modules, hooks)
    if problem:
        raise ErasekitError(what + problem)
    return HookedPatch(
        patch=inner, modules=tuple(modules), hooks=tuple(hooks), method="+".join(i.method for i in items),
        config={"merge": merge}, concepts=tuple(c for i in items for c in i.concepts),
        base_model=items[0].base_model, provenance=items[0].provenance, parts=tuple(i.summary() for i in items),
    )  # fmt: skip


def conflicts(patch: Patch | None, modules: Sequence[AddedModule], hooks: Sequence[HookSpec]) -> str | None:
    """Why these parts cannot live together in one artifact, or ``None``."""
    names = [m.name for m in modules]
    if len(set(names)) != len(names) or len({h.name for h in hooks}) != len(hooks):
        return "two added modules or two hooks share a name"
    gated = [g for h in hooks for g in h.gates]
    if set(gated) - set(names) or len(set(gated)) != len(gated):
        return "a hook gates a module the artifact does not add, or two hooks gate one module"
    changed = set(patch.tensors) if patch is not None else set()
    for m in modules:
        hit = sorted(changed & set(m.fingerprints))
        if hit:
            return f"a patch changes {hit[0]}, which the added module {m.name} depends on"
    seen: dict[str, HookSpec] = {}
    for h in hooks:
        for point in h.attach:
            other = seen.get(point)
            if other is not None and (hook_kind(h.kind).modifies or hook_kind(other.kind).modifies):
                return f"hooks {other.name} ({other.kind}) and {h.name} ({h.kind}) both hook {point}"
            seen.setdefault(point, h)
    return None


# ---- helpers ---------------------------------------------------------------------------------------------


def _renamed(m: AddedModule, name: str) -> AddedModule:
    return AddedModule(name=name, type=m.type, config=m.config, attach=m.attach, tensors=m.tensors,
                       fingerprints=m.fingerprints)  # fmt: skip


def _refuse_pickles(path: Path) -> None:
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ErasekitError(f"refusing to load pickled {path / pickled[0]}: erasekit reads safetensors only")


def _module_from(entry: Any, weights: dict[str, torch.Tensor], path: Path) -> AddedModule:
    if not isinstance(entry, dict) or set(entry) != _MODULE_KEYS:
        raise ErasekitError(f"corrupt artifact {path}: a module entry needs exactly {sorted(_MODULE_KEYS)}")
    missing = [k for k in entry["tensors"] if f"{entry['name']}/{k}" not in weights]
    if missing:
        raise ErasekitError(f"corrupt artifact {path}: module {entry['name']} lacks {missing[:3]}")
    own = {k: weights[f"{entry['name']}/{k}"] for k in entry["tensors"]}
    module = AddedModule(name=entry["name"], type=entry["type"], config=entry["config"], attach=entry["attach"],
                         tensors=own, fingerprints=entry["fingerprints"])  # fmt: skip
    module.build()  # its weights fit its type exactly
    return module


def _hook_from(entry: Any, path: Path) -> HookSpec:
    if not isinstance(entry, dict) or set(entry) != _HOOK_KEYS:
        raise ErasekitError(f"corrupt artifact {path}: a hook entry needs exactly {sorted(_HOOK_KEYS)}")
    hook = HookSpec(
        name=entry["name"], kind=entry["kind"], config=entry["config"], gates=tuple(entry["gates"])
    )
    if list(hook.attach) != list(entry["attach"]):
        raise ErasekitError(
            f"corrupt artifact {path}: hook {hook.name} declares attach points {entry['attach']}"
        )
    return hook
