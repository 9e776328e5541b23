"""The Patch: the artifact every erasure method produces.

A patch is plain data: the changed tensors keyed by ``"component/qualified.param.name"``, the SHA-256
fingerprints of the base tensors they replace, and the config that made them. On disk it is a directory::

    P/erasure_config.json    method, config, concepts, base model, erase_seconds, fingerprints, versions
    P/patch.safetensors      only the changed tensors

Applying checks every fingerprint first and refuses a different base model; :meth:`Patch.apply_` returns a
handle whose ``remove()`` restores the original tensors exactly.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.fingerprint import dtype_name, fingerprints, tensor_sha256
from erasekit.io import atomic_write_json, output_dir

FORMAT_VERSION = 1
CONFIG_FILE = "erasure_config.json"
TENSOR_FILE = "patch.safetensors"
KIND = "patch"  # erasure_config.json's "kind"; files without one are patches (see erasekit.hooked)
_KNOWN_KEYS = {
    "kind",
    "format_version",
    "method",
    "config",
    "concepts",
    "base_model",
    "erase_seconds",
    "fingerprints",
    "tensors",
    "provenance",
    "parts",
}
MERGE_RULES = ("mean",)


@dataclass(frozen=True, kw_only=True)
class Patch:
    """Changed tensors plus everything needed to check, reproduce and undo them.

    Attributes:
        tensors: ``{"component/param.name": tensor}``, the new values.
        fingerprints: the same keys, mapping to ``{"float32": sha256, "float16": ..., "bfloat16": ...}`` of the
            base tensor each one replaces.
        method: registry name of the method that made it.
        config: the method's full config, as a JSON-ready dict.
        concepts: the erased concepts.
        base_model: the id or path of the base model it was made on.
        erase_seconds: wall time of the erasure, or ``None`` for imported/composed patches.
        provenance: library version, git commit, creation time, family.
        parts: for a composed patch, the summaries of its parts.
    """

    tensors: dict[str, torch.Tensor]
    fingerprints: dict[str, dict[str, str]]
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    concepts: tuple[str, ...] = ()
    base_model: str = ""
    erase_seconds: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    parts: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if set(self.tensors) != set(self.fingerprints):
            raise ErasekitError("patch tensors and fingerprints name different parameters")
        for key in self.tensors:
            split_key(key)

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_modules(
        cls,
        components: Mapping[str, torch.nn.Module],
        names: Mapping[str, Sequence[str]],
        base: Mapping[str, torch.Tensor],
        **meta: Any,
    ) -> Patch:
        """Build a patch from trained modules.

        Args:
            components: ``{component: module}`` holding the new values.
            names: ``{component: [param names]}`` of the parameters that changed.
            base: ``{"component/param": tensor}`` base values, fingerprinted here.
            **meta: the remaining :class:`Patch` fields.
        """
        tensors, prints = {}, {}
        for comp, params in names.items():
            for name in params:
                key = f"{comp}/{name}"
                tensors[key] = resolve_param(components[comp], name).detach().to("cpu").clone()
                prints[key] = fingerprints(base[key])
        return cls(tensors=tensors, fingerprints=prints, **meta)

    @classmethod
    def from_tensors(cls, model: Any, component: str, new: Mapping[str, torch.Tensor], **meta: Any) -> Patch:
        """A patch of the tensors of ``new`` that differ from ``model``'s current ones (which are fingerprinted).

        The model is only read, never written.

        Args:
            model: a :class:`~erasekit.models.loading.LoadedModel` (or anything with ``components``).
            component: the component the names belong to (``"unet"``, ``"text_encoder"``).
            new: ``{param name: tensor}`` of the same shapes as the model's.
            **meta: the remaining :class:`Patch` fields (``method`` defaults to ``""``).
        """
        module = _components_of(model)[component]
        tensors, prints = {}, {}
        for name, value in new.items():
            live = resolve_param(module, name).detach()
            if tuple(value.shape) != tuple(live.shape):
                raise ErasekitError(
                    f"{component}/{name}: new shape {list(value.shape)}, model {list(live.shape)}"
                )
            value = value.detach().to("cpu", live.dtype)
            if torch.equal(value, live.cpu()):
                continue
            key = f"{component}/{name}"
            tensors[key] = value.clone()
            prints[key] = fingerprints(live)
        return cls(tensors=tensors, fingerprints=prints, **{"method": "", **meta})

    # ---- inspection --------------------------------------------------------------------------------

    @property
    def components(self) -> list[str]:
        return sorted({split_key(k)[0] for k in self.tensors})

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "concepts": list(self.concepts),
            "base_model": self.base_model,
            "erase_seconds": self.erase_seconds,
            "components": self.components,
            "tensors": len(self.tensors),
            "parameters": self.num_parameters(),
        }

    def fingerprint(self) -> str:
        """One SHA-256 over all tensors of the patch: identifies the patch itself in run records."""
        keys = sorted(self.tensors)
        return tensor_sha256(torch.cat([self.tensors[k].float().flatten() for k in keys])) if keys else ""

    # ---- applying ----------------------------------------------------------------------------------

    def check(self, model: Any) -> None:
        """Raise :class:`ErasekitError` unless every replaced tensor of ``model`` matches its fingerprint."""
        components = _components_of(model)
        for key, prints in self.fingerprints.items():
            comp, name = split_key(key)
            if comp not in components or components[comp] is None:
                raise ErasekitError(f"patch needs component {comp!r}, which the model does not have")
            live = resolve_param(components[comp], name)
            dname = dtype_name(live.dtype)
            if dname not in prints:
                raise ErasekitError(f"patch has no {dname} fingerprint for {key}")
            if tuple(live.shape) != tuple(self.tensors[key].shape) or tensor_sha256(live) != prints[dname]:
                raise ErasekitError(
                    f"wrong base model: {key} does not match the patch's base ({self.base_model or 'unknown'})"
                )

    def apply_(self, model: Any, check: bool = True) -> PatchHandle:
        """Write the patch into ``model`` (a pipeline or :class:`~erasekit.LoadedModel`) in place.

        Returns:
            A handle whose ``remove()`` puts the original tensors back bit for bit.
        """
        if check:
            self.check(model)
        components = _components_of(model)
        saved: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, value in self.tensors.items():
                comp, name = split_key(key)
                live = resolve_param(components[comp], name)
                saved[key] = live.detach().clone()
                live.copy_(value.to(device=live.device, dtype=live.dtype))
        return PatchHandle(components, saved)

    @contextlib.contextmanager
    def applied(self, model: Any, check: bool = True) -> Iterator[Any]:
        """Context manager: the patch is applied inside the block and removed after it."""
        handle = self.apply_(model, check=check)
        try:
            yield model
        finally:
            handle.remove()

    # ---- composition -------------------------------------------------------------------------------

    @staticmethod
    def compose(patches: Sequence[Patch], merge: str | None = None, label: str = "") -> Patch:
        """Combine several patches of one base model into one; a single patch is returned as it is.

        Args:
            patches: the patches, in order.
            merge: how to combine two patches that change the same tensor. ``None`` refuses such a conflict;
                ``"mean"`` averages the new values (the HiRM paper's multi-concept weight averaging).
            label: what is being composed, for error messages (a leaderboard stack ``hirm-r+uce``).
        """
        if not patches:
            raise ErasekitError("nothing to compose")
        if merge is not None and merge not in MERGE_RULES:
            raise ErasekitError(f"unknown merge rule {merge!r}; choose one of {', '.join(MERGE_RULES)}")
        if len(patches) == 1:
            return patches[0]
        what = f"cannot stack {label}: " if label else ""
        grouped: dict[str, list[torch.Tensor]] = {}
        prints: dict[str, dict[str, str]] = {}
        for p in patches:
            for key, value in p.tensors.items():
                if key in prints and prints[key] != p.fingerprints[key]:
                    raise ErasekitError(
                        f"{what}patches disagree on the base of {key}: they come from different models"
                    )
                grouped.setdefault(key, []).append(value)
                prints[key] = p.fingerprints[key]
        conflicts = sorted(k for k, vs in grouped.items() if len(vs) > 1)
        if conflicts and merge is None:
            raise ErasekitError(
                f"{what}{len(conflicts)} tensor(s) are changed by more than one patch (e.g. {conflicts[0]}); "
                "choose a merge rule (--merge mean) to combine them"
            )
        tensors = {
            k: torch.stack([v.float() for v in vs]).mean(0).to(vs[0].dtype) for k, vs in grouped.items()
        }
        concepts = tuple(c for p in patches for c in p.concepts)
        return Patch(
            tensors=tensors,
            fingerprints=prints,
            method="+".join(p.method for p in patches),
            config={"merge": merge},
            concepts=concepts,
            base_model=patches[0].base_model,
            erase_seconds=None,
            provenance=patches[0].provenance,
            parts=tuple(p.summary() for p in patches),
        )

    # ---- persistence -------------------------------------------------------------------------------

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the patch directory atomically; an existing ``path`` is refused unless ``overwrite``."""
        from safetensors.torch import save_file

        with output_dir(path, overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / TENSOR_FILE))
            atomic_write_json(tmp / CONFIG_FILE, self._config_json())
        return Path(path)

    def _config_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "config": self.config,
            "concepts": list(self.concepts),
            "base_model": self.base_model,
            "erase_seconds": self.erase_seconds,
            "fingerprints": self.fingerprints,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in self.tensors.items()},
            "provenance": self.provenance,
            "parts": list(self.parts),
        }

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Load a patch directory strictly: missing, extra or malformed tensors are errors."""
        path = Path(path)
        meta = _read_config(path)
        tensors = _read_tensors(path / TENSOR_FILE)
        declared = set(meta["fingerprints"])
        if set(tensors) != declared:
            missing, extra = sorted(declared - set(tensors)), sorted(set(tensors) - declared)
            raise ErasekitError(
                f"corrupt patch {path}: missing tensors {missing[:3]}, unexpected {extra[:3]}"
            )
        for key, info in meta.get("tensors", {}).items():
            if key in tensors and list(tensors[key].shape) != info["shape"]:
                raise ErasekitError(f"corrupt patch {path}: {key} has shape {list(tensors[key].shape)}")
        return cls(
            tensors=tensors,
            fingerprints=meta["fingerprints"],
            method=meta["method"],
            config=meta.get("config", {}),
            concepts=tuple(meta.get("concepts", ())),
            base_model=meta.get("base_model", ""),
            erase_seconds=meta.get("erase_seconds"),
            provenance=meta.get("provenance", {}),
            parts=tuple(meta.get("parts", ())),
        )


class PatchHandle:
    """Returned by :meth:`Patch.apply_`; ``remove()`` restores the replaced tensors exactly."""

    def __init__(self, components: Mapping[str, Any], saved: dict[str, torch.Tensor]) -> None:
        self._components = components
        self._saved = saved

    def remove(self) -> None:
        with torch.no_grad():
            for key, value in self._saved.items():
                comp, name = split_key(key)
                resolve_param(self._components[comp], name).copy_(value)
        self._saved = {}


# ---- helpers ---------------------------------------------------------------------------------------------


def split_key(key: str) -> tuple[str, str]:
    comp, sep, name = key.partition("/")
    if not sep or not comp or not name:
        raise ErasekitError(f"malformed patch tensor key {key!r}; expected 'component/param.name'")
    return comp, name


def resolve_param(module: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer by qualified name, tolerating the ``text_model.`` prefix of transformers 4/5."""
    candidates = [name]
    if name.startswith("text_model."):
        candidates.append(name.removeprefix("text_model."))
    else:
        candidates.append(f"text_model.{name}")
    for cand in candidates:
        for getter in (module.get_parameter, module.get_buffer):
            with contextlib.suppress(AttributeError):
                return getter(cand)
    raise ErasekitError(f"the model has no parameter {name!r} ({type(module).__name__})")


def _components_of(model: Any) -> Mapping[str, Any]:
    comps = getattr(model, "components", None)
    if not isinstance(comps, Mapping):
        raise ErasekitError(f"cannot apply a patch to {type(model).__name__}: it has no components")
    return comps


def _read_config(path: Path, known: set[str] = _KNOWN_KEYS, kind: str = KIND) -> dict[str, Any]:
    """The artifact's ``erasure_config.json``, checked to be of ``kind`` (no ``kind`` field means a patch)."""
    cfg = path / CONFIG_FILE
    if not path.is_dir():
        raise ErasekitError(f"no patch at {path}: not a directory")
    if not cfg.is_file():
        raise ErasekitError(f"not a patch: {cfg} is missing")
    try:
        meta = json.loads(cfg.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ErasekitError(f"corrupt patch {path}: {CONFIG_FILE} is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or "fingerprints" not in meta or "method" not in meta:
        raise ErasekitError(f"corrupt patch {path}: {CONFIG_FILE} lacks 'method' or 'fingerprints'")
    if meta.get("kind", KIND) != kind:
        raise ErasekitError(
            f"{path} is a {meta['kind']!r} artifact, not a {kind!r} one; load it with erasekit.load_erasure"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ErasekitError(f"patch {path} has format {meta['format_version']}; this erasekit reads up to 1")
    unknown = sorted(set(meta) - known)
    if unknown:
        warnings.warn(f"patch {path}: ignoring unknown config keys {unknown}", stacklevel=3)
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        for pickled in ("patch.bin", "patch.pt", "patch.ckpt", "pytorch_model.bin"):
            if (file.parent / pickled).exists():
                raise ErasekitError(
                    f"refusing to load pickled {file.parent / pickled}: erasekit reads safetensors only"
                )
        raise ErasekitError(f"corrupt patch {file.parent}: {file.name} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ErasekitError(f"corrupt patch {file.parent}: {file.name} cannot be read ({e})") from None
