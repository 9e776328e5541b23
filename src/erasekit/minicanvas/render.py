"""Procedural 32x32 renders of the MiniCanvas grid: an object's silhouette, then a style painted over it.

Objects are unions and differences of polygons in a unit frame (y down), placed with a random rotation, scale,
flip and position and drawn 4x supersampled for smooth edges. Styles turn that soft mask into pixels, with
random colours inside each style's palette, so a classifier has to learn the concept and not the pixels.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable

import numpy as np

from erasekit.minicanvas.world import OBJECT_NAMES, STYLE_NAMES

SIZE = 32
_SUPER = 4
Poly = list[tuple[float, float]]


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 360.0, n: int = 40
) -> Poly:
    t = np.radians(np.linspace(a0, a1, n, endpoint=a1 - a0 < 360))
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))


def _rect(x0: float, y0: float, x1: float, y1: float) -> Poly:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star() -> Poly:
    angles = np.radians(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 0.95, 0.4)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles) + 0.08))


def _heart() -> Poly:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return list(zip(x * 0.055, y * 0.055 + 0.1))


# Each object: [(add?, polygon)], drawn in order (False cuts a hole).
SHAPES: dict[str, list[tuple[bool, Poly]]] = {
    "circle": [(True, _ellipse(0, 0, 0.8, 0.8))],
    "square": [(True, _rect(-0.7, -0.7, 0.7, 0.7))],
    "triangle": [(True, [(0, -0.85), (0.9, 0.7), (-0.9, 0.7)])],
    "star": [(True, _star())],
    "heart": [(True, _heart())],
    "arrow": [(True, _rect(-0.9, -0.13, 0.2, 0.13)), (True, [(0.1, -0.5), (0.95, 0), (0.1, 0.5)])],
    "house": [
        (True, _rect(-0.6, -0.05, 0.6, 0.8)),
        (True, [(-0.85, 0.0), (0, -0.85), (0.85, 0.0)]),
        (False, _rect(-0.17, 0.35, 0.17, 0.8)),
    ],
    "tree": [
        (True, _rect(-0.14, 0.35, 0.14, 0.95)),
        (True, [(0, -0.95), (0.55, -0.25), (-0.55, -0.25)]),
        (True, [(0, -0.6), (0.75, 0.4), (-0.75, 0.4)]),
    ],
    "fish": [
        (True, _ellipse(-0.15, 0, 0.62, 0.4)),
        (True, [(0.3, 0), (0.92, -0.5), (0.92, 0.5)]),
        (False, _ellipse(-0.47, -0.08, 0.09, 0.09, n=16)),
    ],
    "cup": [
        (True, _ellipse(0.42, 0.05, 0.34, 0.34)),
        (False, _ellipse(0.42, 0.05, 0.17, 0.17)),
        (True, [(-0.6, -0.55), (0.4, -0.55), (0.28, 0.7), (-0.48, 0.7)]),
    ],
    "umbrella": [
        (True, _ellipse(0, 0.0, 0.92, 0.7, 180, 360)),
        (True, _rect(-0.07, -0.05, 0.07, 0.75)),
        (True, _rect(-0.07, 0.65, 0.35, 0.77)),
        (True, _rect(0.23, 0.45, 0.35, 0.77)),
    ],
    "key": [
        (True, _ellipse(-0.55, 0, 0.38, 0.38)),
        (False, _ellipse(-0.55, 0, 0.17, 0.17, n=20)),
        (True, _rect(-0.22, -0.09, 0.92, 0.09)),
        (True, _rect(0.5, 0.05, 0.64, 0.38)),
        (True, _rect(0.74, 0.05, 0.88, 0.3)),
    ],
}


def object_mask(name: str, rng: np.random.Generator) -> np.ndarray:
    """A soft silhouette of object ``name`` at a random pose: float ``[32, 32]`` in [0, 1]."""
    from PIL import Image, ImageDraw

    angle = np.radians(rng.uniform(-25, 25))
    scale = rng.uniform(0.65, 0.9)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    room = max(0.0, 1.0 - 0.95 * scale) * 0.9
    tx, ty = rng.uniform(-room, room, size=2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    big = SIZE * _SUPER
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for add, poly in SHAPES[name]:
        pts = np.asarray(poly) * [flip, 1.0]  # [P, 2]
        pts = (pts @ rot.T) * scale + [tx, ty]
        pix = (pts + 1.0) * 0.5 * big
        draw.polygon([tuple(p) for p in pix], fill=255 if add else 0)
    small = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _mix(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Blend ``fg`` over ``bg`` by ``mask`` [H, W]; colours are [3] or [H, W, 3]."""
    m = mask[..., None]
    return m * fg + (1.0 - m) * bg


def _shift_min(mask: np.ndarray, r: int) -> np.ndarray:
    """Grey erosion with a (2r+1)^2 square."""
    padded = np.pad(mask, r, mode="edge")
    n = mask.shape[0]
    return np.min(
        [padded[dy : dy + n, dx : dx + n] for dy in range(2 * r + 1) for dx in range(2 * r + 1)], axis=0
    )


def _outline(mask: np.ndarray, r: int = 1) -> np.ndarray:
    return np.clip(mask - _shift_min(mask, r), 0.0, 1.0)


def _blur(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """A small binomial blur over the first two axes."""
    for _ in range(passes):
        p = np.pad(img, [(1, 1), (1, 1)] + [(0, 0)] * (img.ndim - 2), mode="edge")
        img = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4.0
        img = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) / 4.0
    return img


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _neon(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    line = np.clip(_outline(m, 1) * 1.5, 0, 1)
    glow = np.clip(_blur(line, 2) * 1.8, 0, 1)
    color = _hsv(rng.random(), 1.0, 1.0)
    bg = _hsv(rng.random(), 0.5, rng.uniform(0.02, 0.1))
    return _mix(np.maximum(line, 0.6 * glow), color, bg)


def _pixel(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blocks = m.reshape(16, 2, 16, 2).mean(axis=(1, 3)) > 0.45  # [16, 16]
    coarse = np.kron(blocks, np.ones((2, 2), dtype=np.float32))
    h = rng.random()
    return _mix(coarse, _hsv(h, 1.0, 1.0), _hsv(h + rng.uniform(0.35, 0.65), 1.0, 0.75))


def _sketch(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    hatch = ((x + y + rng.integers(4)) % 4 < 1).astype(np.float32) * m * 0.5
    ink = np.clip(_outline(m, 1) * 1.3 + hatch, 0, 1)
    paper = np.full((SIZE, SIZE, 3), rng.uniform(0.9, 1.0), dtype=np.float32) * [1.0, 0.98, 0.94]
    return _mix(ink, np.full(3, rng.uniform(0.1, 0.3), dtype=np.float32), paper)


def _blueprint(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    off = rng.integers(8)
    grid = (((x + off) % 8 == 0) | ((y + off) % 8 == 0)).astype(np.float32) * 0.25
    ink = np.maximum(np.clip(_outline(m, 1) * 1.5, 0, 1), grid)
    bg = _hsv(rng.uniform(0.57, 0.64), rng.uniform(0.7, 0.9), rng.uniform(0.45, 0.65))
    return _mix(ink, np.array([0.95, 0.97, 1.0], dtype=np.float32), bg)


def _chalk(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    grain = rng.uniform(0.55, 1.0, size=(SIZE, SIZE)).astype(np.float32)
    board = _hsv(rng.uniform(0.33, 0.47), rng.uniform(0.3, 0.5), rng.uniform(0.18, 0.3))
    dust = board + rng.normal(0, 0.03, size=(SIZE, SIZE, 3)).astype(np.float32)
    tint = _hsv(rng.random(), rng.uniform(0.0, 0.25), 0.95)
    return _mix(m * grain, tint, dust)


def _watercolor(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    wash = _blur(m, 1)
    blotch = _blur(rng.uniform(0.6, 1.0, size=(SIZE, SIZE)).astype(np.float32), 2)
    rim = np.clip(_outline(wash, 1) * 0.8, 0, 1)
    color = _hsv(rng.random(), rng.uniform(0.45, 0.75), rng.uniform(0.8, 0.95))
    paint = color[None, None] * (1.0 - 0.35 * rim[..., None])
    paper = np.full((SIZE, SIZE, 3), 0.97, dtype=np.float32) - rng.uniform(0, 0.04, size=(SIZE, SIZE, 1))
    return _mix(np.clip(wash * blotch * 1.1, 0, 1), paint, paper)


def _pastel(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h = rng.random()
    fg = _hsv(h, rng.uniform(0.3, 0.45), 0.95)
    bg = _hsv(h + rng.uniform(0.25, 0.75), rng.uniform(0.15, 0.25), 0.92)
    return _mix(_blur(m, 1), fg, bg)


def _stripes(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    theta = rng.uniform(0, np.pi)
    band = (np.cos(theta) * x + np.sin(theta) * y + rng.uniform(0, 6)) % 6 < 3
    h = rng.random()
    fill = np.where(band[..., None], _hsv(h, 0.9, 0.9), _hsv(h + 0.5, 0.9, 0.3))
    return _mix(m, fill, _hsv(rng.random(), 0.1, rng.uniform(0.8, 0.95)))


def _dots(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    oy, ox = rng.uniform(0, 6, size=2)
    d2 = ((y + oy) % 6 - 3) ** 2 + ((x + ox) % 6 - 3) ** 2
    spot = np.clip(1.6 - np.sqrt(d2) + 0.5, 0, 1)
    h = rng.random()
    fill = _mix(spot, np.ones(3, dtype=np.float32), _hsv(h, 0.9, 0.75))
    return _mix(m, fill, _hsv(h + 0.5, 0.15, rng.uniform(0.8, 0.95)))


def _mosaic(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h_in, h_out = rng.random(), rng.random()

    def tiles(hue: float, sat: float, lo: float, hi: float) -> np.ndarray:  # [32, 32, 3], a colour per tile
        h = hue + rng.uniform(-0.07, 0.07, size=(8, 8))
        s = np.clip(sat + rng.uniform(-0.1, 0.1, size=(8, 8)), 0, 1)
        v = rng.uniform(lo, hi, size=(8, 8))
        colors = np.array([[_hsv(h[i, j], s[i, j], v[i, j]) for j in range(8)] for i in range(8)])
        return np.repeat(np.repeat(colors, 4, axis=0), 4, axis=1)

    img = _mix((m > 0.5).astype(np.float32), tiles(h_in, 0.9, 0.5, 0.8), tiles(h_out, 0.2, 0.85, 1.0))
    y, x = _grid()
    grout = ((y % 4 == 0) | (x % 4 == 0)).astype(np.float32)
    return _mix(grout * 0.6, np.full(3, 0.3, dtype=np.float32), img)


def _silhouette(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, _ = _grid()
    t = (y / (SIZE - 1))[..., None]
    top = _hsv(rng.uniform(0.7, 0.85), 0.7, 0.6)
    bottom = _hsv(rng.uniform(0.02, 0.12), 0.85, 1.0)
    sky = (1 - t) * top + t * bottom
    return _mix(m, np.full(3, rng.uniform(0.0, 0.06), dtype=np.float32), sky)


def _vintage(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    r2 = ((x - 15.5) ** 2 + (y - 15.5) ** 2) / 15.5**2
    vignette = np.clip(1.0 - 0.45 * r2, 0.3, 1)[..., None]
    sepia = np.array([0.44, 0.26, 0.08], dtype=np.float32) / 0.44
    light, dark = rng.uniform(0.75, 0.95), rng.uniform(0.1, 0.3)
    tone = _mix(m, sepia * dark, sepia * light) * vignette
    grain = rng.normal(0, 0.04, size=(SIZE, SIZE, 1)).astype(np.float32)
    return tone + grain


STYLE_PAINTERS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "neon": _neon,
    "pixel": _pixel,
    "sketch": _sketch,
    "blueprint": _blueprint,
    "chalk": _chalk,
    "watercolor": _watercolor,
    "pastel": _pastel,
    "stripes": _stripes,
    "dots": _dots,
    "mosaic": _mosaic,
    "silhouette": _silhouette,
    "vintage": _vintage,
}
assert tuple(STYLE_PAINTERS) == STYLE_NAMES and tuple(SHAPES) == OBJECT_NAMES


def render(obj: str, style: str, rng: np.random.Generator) -> np.ndarray:
    """Render one image of ``obj`` in ``style`` at a random pose and palette.

    Args:
        obj: an object name from :data:`~erasekit.minicanvas.world.OBJECT_NAMES`.
        style: a style name from :data:`~erasekit.minicanvas.world.STYLE_NAMES`.
        rng: the only source of randomness.

    Returns:
        uint8 ``[32, 32, 3]``.
    """
    from erasekit.minicanvas.world import concept_info

    if concept_info(obj).kind != "object" or concept_info(style).kind != "style":
        raise ValueError(f"render wants an object then a style, got {obj!r}, {style!r}")
    img = STYLE_PAINTERS[style](object_mask(obj, rng), rng)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_grid_sheet(rng: np.random.Generator) -> np.ndarray:
    """One render per cell, tiled objects-by-rows: uint8 ``[12*32, 12*32, 3]`` (for eyeballing the world)."""
    rows = [np.concatenate([render(o, s, rng) for s in STYLE_NAMES], axis=1) for o in OBJECT_NAMES]
    return np.concatenate(rows, axis=0)
