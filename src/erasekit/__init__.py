"""erasekit: erase concepts from text-to-image diffusion models, and measure how well the erasure holds.

The public API is imported lazily so that ``import erasekit`` stays fast::

    import erasekit
    model = erasekit.load("path/to/sd-folder")        # or a Hub id, or "minicanvas"
    patch = erasekit.erase(model, ["Van Gogh"], method="hirm-r", preset="paper", concept_type="style")
    patch.save("van-gogh.patch")
    artifact = erasekit.load_erasure("van-gogh.patch")  # a Patch, or a HookedPatch (added modules + a hook)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "erasekit.models.loading",
    "LoadedModel": "erasekit.models.loading",
    "Patch": "erasekit.patch",
    "HookedPatch": "erasekit.hooked",
    "load_erasure": "erasekit.hooked",
    "compose": "erasekit.hooked",
    "erase": "erasekit.registry",
    "make_config": "erasekit.registry",
    "get_method": "erasekit.registry",
    "list_methods": "erasekit.registry",
    "ErasekitError": "erasekit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")
