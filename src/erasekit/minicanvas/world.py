"""The MiniCanvas world: which objects and styles exist, what else they are called, and how they are captioned.

Pure data and string work (no torch), so ``import erasekit.minicanvas`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from erasekit.errors import ErasekitError

#: UnlearnCanvas's prompt template.
TEMPLATE = "A {object} image in {style} style."


@dataclass(frozen=True, kw_only=True)
class Concept:
    """One object or style of the grid.

    Attributes:
        name: the canonical name (one CLIP token for every concept but a few).
        kind: ``"object"`` or ``"style"``.
        synonyms: other names used in training captions (generality is measured with them).
        category: the super-category, a neutral anchor for HiRM-S (``"animal"`` for ``fish``).
    """

    name: str
    kind: str
    synonyms: tuple[str, ...]
    category: str


def _objects() -> tuple[Concept, ...]:
    rows = [
        ("circle", ("disc", "round shape"), "geometric shape"),
        ("square", ("block", "box shape"), "geometric shape"),
        ("triangle", ("pyramid", "wedge"), "geometric shape"),
        ("star", ("starburst", "pentagram"), "geometric shape"),
        ("heart", ("love symbol", "valentine"), "symbol"),
        ("arrow", ("pointer", "dart"), "symbol"),
        ("house", ("home", "cottage"), "building"),
        ("tree", ("pine", "fir"), "plant"),
        ("fish", ("goldfish", "trout"), "animal"),
        ("cup", ("mug", "teacup"), "household item"),
        ("umbrella", ("parasol", "brolly"), "household item"),
        ("key", ("latchkey", "door key"), "household item"),
    ]
    return tuple(Concept(name=n, kind="object", synonyms=s, category=c) for n, s, c in rows)


def _styles() -> tuple[Concept, ...]:
    rows = [
        ("neon", ("glowing", "fluorescent"), "digital art"),
        ("pixel", ("pixelated", "8-bit"), "digital art"),
        ("sketch", ("pencil drawing", "line drawing"), "drawing"),
        ("blueprint", ("technical drawing", "cyanotype"), "drawing"),
        ("chalk", ("chalkboard", "blackboard"), "drawing"),
        ("watercolor", ("aquarelle", "watercolour"), "painting"),
        ("pastel", ("pale", "soft pastel"), "painting"),
        ("stripes", ("striped", "banded"), "pattern"),
        ("dots", ("polka dot", "dotted"), "pattern"),
        ("mosaic", ("tiled", "tessellated"), "pattern"),
        ("silhouette", ("shadow", "cutout"), "photograph"),
        ("vintage", ("sepia", "old photo"), "photograph"),
    ]
    return tuple(Concept(name=n, kind="style", synonyms=s, category=c) for n, s, c in rows)


#: The grid's objects and styles; their order is the classifier's class order.
OBJECTS: tuple[Concept, ...] = _objects()
STYLES: tuple[Concept, ...] = _styles()
OBJECT_NAMES: tuple[str, ...] = tuple(c.name for c in OBJECTS)
STYLE_NAMES: tuple[str, ...] = tuple(c.name for c in STYLES)
_BY_NAME = {c.name: c for c in OBJECTS + STYLES}

# Captions naming both concepts; the first is UnlearnCanvas's template.
FULL_TEMPLATES = (
    TEMPLATE,
    "A {style} style picture of a {object}.",
    "a {object} drawn in {style} style",
    "An image of a {object}, {style} style.",
    "{style} art of a {object}",
    "a {object} rendered in the {style} style",
)
OBJECT_TEMPLATES = ("A {object} image.", "a picture of a {object}")
STYLE_TEMPLATES = ("An image in {style} style.", "{style} style artwork")


def concept_info(name: str) -> Concept:
    """The concept called ``name`` (canonical name, case-insensitive)."""
    concept = _BY_NAME.get(name.strip().lower())
    if concept is None:
        known = ", ".join(OBJECT_NAMES + STYLE_NAMES)
        raise ErasekitError(f"unknown MiniCanvas concept {name!r}; known: {known}")
    return concept


def concept_kind(name: str) -> str:
    """``"object"`` or ``"style"`` for a canonical concept name."""
    return concept_info(name).kind


def prompt(obj: str, style: str) -> str:
    """The UnlearnCanvas prompt for one grid cell: ``A {object} image in {style} style.``"""
    return TEMPLATE.format(object=obj, style=style)


def names_of(concept: Concept) -> tuple[str, ...]:
    """The canonical name followed by the synonyms."""
    return (concept.name, *concept.synonyms)


def all_captions() -> list[str]:
    """Every caption the caption sampler can produce, in a fixed order; ``""`` (the unconditional one) first."""
    out = [""]
    obj_names = [n for c in OBJECTS for n in names_of(c)]
    sty_names = [n for c in STYLES for n in names_of(c)]
    for t in FULL_TEMPLATES:
        out += [t.format(object=o, style=s) for o in obj_names for s in sty_names]
    for t in OBJECT_TEMPLATES:
        out += [t.format(object=o) for o in obj_names]
    for t in STYLE_TEMPLATES:
        out += [t.format(style=s) for s in sty_names]
    return out


@dataclass(frozen=True, kw_only=True)
class CaptionMix:
    """How training captions are drawn for an image of cell (object, style).

    Attributes:
        template_p: probability of UnlearnCanvas's template (else a paraphrase) for two-concept captions.
        object_only_p: probability of a caption naming only the object.
        style_only_p: probability of a caption naming only the style.
        synonym_p: probability, per named concept, of using a synonym instead of the canonical name.
    """

    template_p: float = 0.5
    object_only_p: float = 0.1
    style_only_p: float = 0.1
    synonym_p: float = 0.25


def sample_caption(
    obj: int, style: int, rng: np.random.Generator, mix: CaptionMix = CaptionMix()
) -> tuple[str, int, int]:
    """A random training caption for an image of object index ``obj`` in style index ``style``.

    Returns:
        ``(caption, object_named, style_named)``: the indices the caption names, ``-1`` for one it leaves out.
    """

    def pick(concept: Concept) -> str:
        if rng.random() < mix.synonym_p:
            return concept.synonyms[rng.integers(len(concept.synonyms))]
        return concept.name

    o, s = pick(OBJECTS[obj]), pick(STYLES[style])
    u = rng.random()
    if u < mix.object_only_p:
        return OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))].format(object=o), obj, -1
    if u < mix.object_only_p + mix.style_only_p:
        return STYLE_TEMPLATES[rng.integers(len(STYLE_TEMPLATES))].format(style=s), -1, style
    if rng.random() < mix.template_p:
        return TEMPLATE.format(object=o, style=s), obj, style
    template = FULL_TEMPLATES[1 + rng.integers(len(FULL_TEMPLATES) - 1)]
    return template.format(object=o, style=s), obj, style


def caption_matches(caption_cells: np.ndarray, image_cells: np.ndarray) -> np.ndarray:
    """Which images each caption describes, for multi-positive contrastive targets.

    Args:
        caption_cells: int ``[B, 2]`` (object, style) named by each caption; ``-1`` where it names none.
        image_cells: int ``[N, 2]`` (object, style) of each image.

    Returns:
        bool ``[B, N]``: caption b is true of image n.
    """
    obj_ok = (caption_cells[:, None, 0] < 0) | (caption_cells[:, None, 0] == image_cells[None, :, 0])
    sty_ok = (caption_cells[:, None, 1] < 0) | (caption_cells[:, None, 1] == image_cells[None, :, 1])
    return obj_ok & sty_ok


def concept_table() -> dict[str, list[dict[str, object]]]:
    """The concept table as JSON-ready data: ``{"objects": [...], "styles": [...], "template": ...}``."""

    def row(c: Concept) -> dict[str, object]:
        return {"name": c.name, "synonyms": list(c.synonyms), "category": c.category}

    return {"objects": [row(c) for c in OBJECTS], "styles": [row(c) for c in STYLES], "template": TEMPLATE}
