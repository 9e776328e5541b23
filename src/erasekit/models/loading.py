"""``erasekit.load``: a local diffusers folder, a Hub id, or the embedded ``minicanvas`` model.

A folder holding only ``text_encoder/`` and ``tokenizer/`` (plus ``_2`` variants) is a valid model for methods
that edit only the text encoder. Checkpoints are read as safetensors; pickled weights are refused unless the
caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.models.families import CAPABILITIES, FOLDER_CONFIG, Family, detect_family, with_capability

MINICANVAS = "minicanvas"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model", "*.tiktoken"]
_DEFAULT_CLASSES = {
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
}


@dataclass
class LoadedModel:
    """A loaded model: its components, family and where it came from.

    Attributes:
        source: what the user named (path, Hub id or ``minicanvas``); recorded as a patch's ``base_model``.
        path: the local folder it was read from.
        family: the family table entry.
        components: ``{name: module | tokenizer | scheduler}``; a pipeline's ``components`` when complete.
        pipeline: the diffusers pipeline, or ``None`` for a text-encoder-only folder.
        pipeline_class: the pipeline class ``model_index.json`` names.
        folder_config: the folder's own ``erasekit.json`` (family, sampling defaults), ``{}`` when absent.
    """

    source: str
    path: Path
    family: Family
    components: dict[str, Any]
    pipeline: Any | None = None
    pipeline_class: str | None = field(default=None)
    folder_config: dict[str, Any] = field(default_factory=dict)

    def default_sampling(self) -> Any:
        """The :class:`~erasekit.generation.Sampling` this model is sampled with unless told otherwise: the
        folder config's ``sampling`` where it has one, else the family's steps and guidance."""
        from erasekit.generation import Sampling

        own = dict(self.folder_config.get("sampling") or {})
        unknown = sorted(set(own) - {"steps", "guidance", "scheduler", "height", "width"})
        if unknown:
            raise ErasekitError(f"{self.path / FOLDER_CONFIG}: unknown sampling key(s) {unknown}")
        return Sampling(**{"steps": self.family.steps, "guidance": self.family.guidance, **own})

    def clip_encoders(self) -> list[tuple[str, Any, Any]]:
        """``[(component, encoder, tokenizer)]`` for every CLIP text encoder present."""
        out = []
        for enc, tok in zip(self.family.clip_encoders, self.family.tokenizers):
            if self.components.get(enc) is not None:
                out.append((enc, self.components[enc], self.components.get(tok)))
        if not out:
            raise ErasekitError(f"{self.source} has no CLIP text encoder")
        return out

    def require(self, *names: str) -> None:
        missing = [n for n in names if self.components.get(n) is None]
        if missing:
            raise ErasekitError(f"{self.source} lacks component(s) {', '.join(missing)} needed here")

    def require_capability(self, capability: str, who: str) -> Any:
        """The pipeline, or an error saying that ``who`` needs a family with ``capability`` (see the family table)."""
        pipe = self.require_pipeline()
        if not getattr(self.family, capability):
            families = ", ".join(with_capability(capability))
            raise ErasekitError(
                f"{who} {CAPABILITIES[capability]}, which supports {families}, not {self.family.name}"
            )
        return pipe

    def require_pipeline(self) -> Any:
        if self.pipeline is None:
            raise ErasekitError(f"{self.source} is not a full pipeline (it has {', '.join(self.components)})")
        return self.pipeline


def load(
    model: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    components: tuple[str, ...] | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a model by local folder, Hub id, or ``"minicanvas"``.

    Args:
        model: the folder, Hub id (``org/name``) or ``minicanvas``.
        device: where modules are placed.
        dtype: floating dtype of the modules.
        components: load only these components (e.g. ``("text_encoder", "tokenizer")``); all when ``None``.
        allow_pickle: also read ``.bin``/``.ckpt`` pickles (unsafe: they can run code).
    """
    source = str(model)
    path = resolve_path(source, allow_pickle)
    index = _read_index(path)
    folder_config = read_json(path / FOLDER_CONFIG) or {}
    present = _present_components(path, index)
    wanted = [c for c in present if components is None or c in components]
    if components is not None and (missing := sorted(set(components) - set(present))):
        raise ErasekitError(f"{source} has no component(s) {', '.join(missing)}")
    te_config = read_json(path / "text_encoder" / "config.json") if "text_encoder" in present else None
    family = detect_family(index.get("_class_name") if index else None, te_config, folder_config)
    listed = [k for k, v in (index or {}).items() if not k.startswith("_") and isinstance(v, list) and v[0]]
    complete = bool(index) and components is None and set(listed) <= set(present)
    if complete:
        pipe = _load_pipeline(path, index["_class_name"], dtype, allow_pickle).to(device)
        comps = {k: v for k, v in pipe.components.items() if v is not None}
        return LoadedModel(source, path, family, comps, pipe, index["_class_name"], folder_config)
    comps = {name: _load_component(path, name, index, dtype, allow_pickle) for name in wanted}
    for mod in comps.values():
        if isinstance(mod, torch.nn.Module):
            mod.to(device)
    return LoadedModel(
        source, path, family, comps, None, index.get("_class_name") if index else None, folder_config
    )


def resolve_path(source: str, allow_pickle: bool = False) -> Path:
    """The local folder for ``source``, downloading a Hub id to the cache if online."""
    if source == MINICANVAS:
        from erasekit.minicanvas.paths import weights_dir

        return weights_dir()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ErasekitError(f"model {source} is a file; erasekit loads diffusers-format folders")
        return path
    if not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise ErasekitError(f"no model at {source}: not a local folder, and not a Hub id (org/name)")
    return _download(source, allow_pickle)


def _download(repo_id: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = _HUB_PATTERNS + (["*.bin", "*.ckpt"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the hub raises many types: offline, not cached, not found, network
        kind = type(e).__name__
        raise ErasekitError(
            f"cannot get {repo_id} from the Hugging Face Hub: offline or unreachable, and not in the local "
            f"cache ({kind}); pass a local diffusers folder instead"
        ) from None


def read_json(file: Path) -> dict[str, Any] | None:
    """A JSON file's content, ``None`` when the file is absent; invalid JSON is a user error."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ErasekitError(f"{file} is not valid JSON ({e.msg})") from None


def _read_index(path: Path) -> dict[str, Any] | None:
    return read_json(path / "model_index.json")


def _present_components(path: Path, index: dict[str, Any] | None) -> list[str]:
    if index:
        names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
        present = [n for n in names if (path / n).is_dir()]
    else:
        present = [n for n in _DEFAULT_CLASSES if (path / n).is_dir()]
    if not present:
        raise ErasekitError(f"{path} is not a diffusers model folder (no model_index.json or text_encoder/)")
    return present


def _load_pipeline(path: Path, class_name: str, dtype: torch.dtype, allow_pickle: bool) -> Any:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ErasekitError(f"{path}: diffusers has no pipeline class {class_name}")
    if not allow_pickle:
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            _refuse_pickle_only(folder)
    try:
        return cls.from_pretrained(
            path, **diffusers_dtype(dtype), use_safetensors=None if allow_pickle else True
        )
    except (OSError, ValueError) as e:
        raise ErasekitError(f"cannot load {path}: {_first_line(e)}") from None


def _load_component(
    path: Path, name: str, index: dict[str, Any] | None, dtype: torch.dtype, allow_pickle: bool
) -> Any:
    library, class_name = (index or {}).get(name) or _DEFAULT_CLASSES[name]
    cls = getattr(_library_module(library), class_name, None)
    if cls is None:
        raise ErasekitError(f"{path}: {library} has no class {class_name} for {name}")
    kwargs: dict[str, Any] = {}
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        dtype_kw = {"dtype": dtype} if library == "transformers" else diffusers_dtype(dtype)
        kwargs = {**dtype_kw, "use_safetensors": None if allow_pickle else True}
        if not allow_pickle:
            _refuse_pickle_only(path / name)
    try:
        return cls.from_pretrained(str(path / name), **kwargs)
    except (OSError, ValueError) as e:
        raise ErasekitError(f"cannot load {path / name}: {_first_line(e)}") from None


def _refuse_pickle_only(folder: Path) -> None:
    """A clear error for a component whose weights exist only as pickles (which can run code when read)."""
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if pickles and not any(folder.glob("*.safetensors")):
        raise ErasekitError(
            f"{folder} holds only pickled weights ({pickles[0]}), which can run code when loaded; "
            f"convert them to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust the source"
        )


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of diffusers' ``from_pretrained``: ``dtype`` where it exists (``torch_dtype`` is
    deprecated there), ``torch_dtype`` on older diffusers."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _library_module(library: str) -> Any:
    """The module a ``model_index.json`` entry names: a package, or a diffusers pipeline subpackage."""
    try:
        return importlib.import_module(library)
    except ImportError:
        try:
            return importlib.import_module(f"diffusers.pipelines.{library}")
        except ImportError:
            raise ErasekitError(f"model_index.json names an unknown library {library!r}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
