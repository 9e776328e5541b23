"""Export and import the formats authors publish: full component folders (HiRM, AdvUnlearn), whole pipelines."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from erasekit.errors import ErasekitError
from erasekit.fingerprint import fingerprints
from erasekit.io import output_dir
from erasekit.models.families import FOLDER_CONFIG
from erasekit.patch import Patch, split_key

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


def export_component(
    model: LoadedModel, patch: Patch, component: str, out: str | Path, overwrite: bool = False
) -> Path:
    """Write ``component`` of ``model`` with ``patch`` applied as a full Hugging Face folder.

    Only the patch's tensors for ``component`` are applied; the others are ignored.
    """
    module = model.components.get(component)
    if module is None:
        raise ErasekitError(f"{model.source} has no component {component!r}")
    _plain([patch], "export")
    if component not in patch.components:
        raise ErasekitError(
            f"the patch changes nothing in {component!r} (it changes {', '.join(patch.components)})"
        )
    part = _restrict(patch, component)
    with part.applied(_Components({component: module})), output_dir(out, overwrite) as tmp:
        module.save_pretrained(tmp, safe_serialization=True)
    return Path(out)


def import_component(
    model: LoadedModel, component: str, folder: str | Path, allow_pickle: bool = False
) -> Patch:
    """Diff a full component folder against the base model's component and return the difference as a patch."""
    base = model.components.get(component)
    if base is None:
        raise ErasekitError(f"{model.source} has no component {component!r}")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ErasekitError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        edited = type(base).from_pretrained(str(folder), use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as e:
        raise ErasekitError(f"cannot load {folder}: {str(e).splitlines()[0]}") from None
    base_state, new_state = base.state_dict(), edited.state_dict()
    if set(base_state) != set(new_state):
        raise ErasekitError(f"{folder} is not the same architecture as {model.source}'s {component}")
    tensors, prints = {}, {}
    for name, old in base_state.items():
        new = new_state[name]
        if new.shape != old.shape:
            raise ErasekitError(f"{folder}: {name} has shape {tuple(new.shape)}, base has {tuple(old.shape)}")
        if not torch.equal(new.to(old.dtype), old):
            tensors[f"{component}/{name}"] = new.detach().to("cpu").clone()
            prints[f"{component}/{name}"] = fingerprints(old)
    if not tensors:
        raise ErasekitError(f"{folder} is identical to the base {component}: nothing to import")
    return Patch(
        tensors=tensors,
        fingerprints=prints,
        method="import",
        config={"from": str(folder), "component": component},
        base_model=model.source,
    )


def save_patched_model(
    model: LoadedModel,
    patches: Sequence[Patch],
    out: str | Path,
    merge: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Apply ``patches`` (fingerprint-checked) and write the whole model as a diffusers folder."""
    _plain(patches, "apply")
    patch = Patch.compose(patches, merge)
    with patch.applied(model), output_dir(out, overwrite) as tmp:
        if model.pipeline is not None:
            model.pipeline.save_pretrained(tmp, safe_serialization=True)
        else:
            for name, comp in model.components.items():
                comp.save_pretrained(
                    tmp / name, **({"safe_serialization": True} if isinstance(comp, torch.nn.Module) else {})
                )
            index = model.path / "model_index.json"
            if index.is_file():
                shutil.copyfile(index, tmp / "model_index.json")
        if model.folder_config:  # the family and sampling defaults travel with the weights
            (tmp / FOLDER_CONFIG).write_text(json.dumps(model.folder_config, indent=2, sort_keys=True) + "\n")
        (tmp / "erasekit_patches.json").write_text(
            json.dumps([p.summary() for p in patches], indent=2) + "\n"
        )
    return Path(out)


def _plain(patches: Sequence[Any], what: str) -> None:
    """Refuse hooked artifacts: a folder of weights cannot hold added modules or a hook."""
    for p in patches:
        if not isinstance(p, Patch):
            raise ErasekitError(
                f"cannot {what} {getattr(p, 'method', '') or 'a hooked artifact'}: its added modules and hook do not fit "
                "in a folder of weights (use it with generate, eval or attack)"
            )


class _Components:
    """A minimal object with a ``components`` mapping, so a patch can be applied to one module."""

    def __init__(self, components: dict[str, Any]) -> None:
        self.components = components


def _restrict(patch: Patch, component: str) -> Patch:
    keys = [k for k in patch.tensors if split_key(k)[0] == component]
    return dataclasses.replace(
        patch,
        tensors={k: patch.tensors[k] for k in keys},
        fingerprints={k: patch.fingerprints[k] for k in keys},
    )
