"""Progress bars for long work. The CLI turns them off with ``--quiet``; library code never reads the environment."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_ENABLED = True


def set_enabled(enabled: bool) -> None:
    """Turn erasekit's bars on or off, and with them those transformers and diffusers draw while loading."""
    global _ENABLED
    _ENABLED = enabled
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        (lib.enable_progress_bar if enabled else lib.disable_progress_bar)()


def enabled() -> bool:
    return _ENABLED


def track(iterable: Iterable[T], desc: str = "", total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """Iterate with a tqdm bar on stderr when progress is enabled."""
    if not _ENABLED:
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, **kwargs)
