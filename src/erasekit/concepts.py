"""What a concept is to erasekit: its type (style, object, nsfw), how its type is guessed, and its file-name form.

Every module that needs a concept's type or a file-safe name asks here; the MiniCanvas world
(:mod:`erasekit.minicanvas.world`) is the only place that lists concepts.
"""

from __future__ import annotations

import re

from erasekit.errors import ErasekitError

#: The concept types methods, attacks and protocols know (presets may differ per type).
CONCEPT_TYPES = ("style", "object", "nsfw")
#: Names read as the nudity concept.
NSFW_NAMES = ("nudity", "nude", "nsfw", "naked")


def check_type(concept_type: str) -> str:
    """``concept_type`` itself, or a one-line error naming the known types."""
    if concept_type not in CONCEPT_TYPES:
        raise ErasekitError(
            f"unknown concept type {concept_type!r}; choose one of {', '.join(CONCEPT_TYPES)}"
        )
    return concept_type


def is_minicanvas(concept: str) -> bool:
    """Whether ``concept`` names an object or style of the MiniCanvas world (case-insensitive)."""
    from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

    return concept.strip().lower() in OBJECT_NAMES + STYLE_NAMES


def guess_type(concept: str) -> str:
    """``style``/``object`` for a MiniCanvas concept, ``nsfw`` for nudity; otherwise the user must say which."""
    from erasekit.minicanvas.world import concept_kind

    name = concept.strip().lower()
    if is_minicanvas(name):
        return concept_kind(name)
    if name in NSFW_NAMES:
        return "nsfw"
    raise ErasekitError(f"cannot tell the type of concept {concept!r}; pass --type style, object or nsfw")


def slug(text: str) -> str:
    """A file-name-safe form of a concept, entry label or preset (``hirm-r:paper+uce`` -> ``hirm-r_paper+uce``).

    Letters, digits, ``+``, ``.`` and ``-`` are kept; every other run of characters becomes ``_``; leading dots
    are dropped, so a slug is never ``..``.
    """
    return re.sub(r"[^A-Za-z0-9+.-]+", "_", text).strip("_").lstrip(".").lower() or "x"
