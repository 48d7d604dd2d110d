"""A deterministic judge of prompt adherence: reads background, colour, shape, position and size off the pixels.

    a = analyse(image)                 # image: (H, W, 3) uint8, as np.asarray(pil_image)
    a.color, a.shape, a.position, a.size, a.background
    score(a, scene)                    # {"color": True, ...} against a data.Scene

The steps, each fixed (no learned part, no randomness):
1. Background: the per-channel median of the 2-pixel border, named by the nearest BACKGROUNDS colour.
2. Foreground: pixels farther than FOREGROUND_DISTANCE from that border colour; their median is the shape's
   colour, named by the nearest COLORS entry. The mask is then refined to the pixels closer to that median
   than to the background: for the dataset's anti-aliased edges that is coverage > 0.5, the true outline.
3. Only the largest 4-connected piece of the mask counts, so specks elsewhere in a generated image do not
   move the measurements.
4. Geometry from the piece's bounding box (w x h pixels, area A pixels):
   size      max(w, h) / image side, against thresholds midway between the SIZE_RANGES classes;
   position  the box centre (not the area centroid, which sits low in a triangle by a sixth of its height):
             within CENTER_RADIUS of the middle on both axes is "in the center", else the axis with the larger
             offset and its sign decide (left/right, top/bottom);
   shape     a triangle (apex up) is much narrower in its top quarter than in its bottom quarter (ratio
             ~0.14; a circle or square ~1); otherwise the fill A / (w h) tells a square (~1) from a circle
             (pi/4 ~ 0.785), split at SQUARE_FILL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .data import BACKGROUNDS, COLORS, POSITIONS, SIZE_RANGES, Scene

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background colour beyond which a pixel is foreground; the
#   closest palette pair (purple on gray) is ~93 apart
MIN_PIXELS = 16  # a foreground piece smaller than this is no shape (the smallest dataset shape has ~350)
CENTER_RADIUS = 0.125  # the box centre within this of 0.5 on both axes is "in the center" (nominal offsets 0.25)
TRIANGLE_TAPER = 0.55  # top-quarter / bottom-quarter mean width below this is a triangle (triangle ~0.14)
SQUARE_FILL = (1.0 + np.pi / 4) / 2  # fill of the bounding box above this is a square, below a circle
# Side thresholds midway between consecutive size classes: small < 0.2625 <= medium < 0.3875 <= large.
_SIZE_ORDER = sorted(SIZE_RANGES, key=lambda s: SIZE_RANGES[s][0])
SIZE_THRESHOLDS = tuple((SIZE_RANGES[a][1] + SIZE_RANGES[b][0]) / 2 for a, b in zip(_SIZE_ORDER, _SIZE_ORDER[1:]))
ATTRIBUTES = ("color", "shape", "position", "size", "background")


@dataclass(frozen=True)
class Analysis:
    """What the pixels show. The shape's fields are None when no foreground piece was found."""

    background: str  # a BACKGROUNDS key
    color: Optional[str]  # a COLORS key
    shape: Optional[str]  # "circle", "square" or "triangle"
    position: Optional[str]  # a POSITIONS key
    size: Optional[str]  # a SIZE_RANGES key
    side: float = 0.0  # max(w, h) of the shape's bounding box / image side
    cx: float = 0.0  # bounding-box centre, fractions of the side, x to the right
    cy: float = 0.0  # y downwards
    fill: float = 0.0  # shape pixels / bounding-box pixels
    taper: float = 0.0  # mean width of the box's top quarter rows / that of its bottom quarter


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected piece of a (H, W) bool mask, as a mask. Every pixel takes the smallest label in
    its neighbourhood until nothing changes (then each piece carries its smallest flat index)."""
    h, w = mask.shape
    none = h * w  # label of background pixels, larger than any pixel's
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        m = labels.copy()
        np.minimum(m[1:], labels[:-1], out=m[1:])
        np.minimum(m[:-1], labels[1:], out=m[:-1])
        np.minimum(m[:, 1:], labels[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], labels[:, 1:], out=m[:, :-1])
        m[~mask] = none
        if np.array_equal(m, labels):
            break
        labels = m
    counts = np.bincount(labels[mask])
    return labels == int(np.argmax(counts))


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _size(side: float) -> str:
    return _SIZE_ORDER[int(np.searchsorted(SIZE_THRESHOLDS, side, side="right"))]


def analyse(image: np.ndarray) -> Analysis:
    """Read the scene off an (H, W, 3) uint8 image (H, W >= 8); see the module docstring for the rules."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array with H, W >= 8, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    pixels = image.astype(np.float64)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[2:-2, :2].reshape(-1, 3), pixels[2:-2, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _nearest(bg, BACKGROUNDS)

    to_bg = np.linalg.norm(pixels - bg, axis=2)  # (H, W)
    rough = to_bg > FOREGROUND_DISTANCE
    if rough.sum() < MIN_PIXELS:
        return Analysis(background, None, None, None, None)
    fg = np.median(pixels[rough], axis=0)
    mask = rough & (np.linalg.norm(pixels - fg, axis=2) < to_bg)
    if mask.sum() < MIN_PIXELS:
        return Analysis(background, None, None, None, None)
    piece = _largest_component(mask)
    color = _nearest(np.median(pixels[piece], axis=0), COLORS)

    rows, cols = np.nonzero(piece)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    bh, bw = bottom - top, right - left
    side = max(bh, bw) / max(h, w)
    cx, cy = (left + right) / 2 / w, (top + bottom) / 2 / h
    fill = len(rows) / (bh * bw)
    widths = piece[top:bottom].sum(axis=1)  # (bh,) pixels per row of the box
    quarter = max(1, bh // 4)
    taper = widths[:quarter].mean() / max(widths[-quarter:].mean(), 1.0)
    if taper < TRIANGLE_TAPER:
        shape = "triangle"
    else:
        shape = "square" if fill > SQUARE_FILL else "circle"
    return Analysis(background, color, shape, _position(cx, cy), _size(side), side, cx, cy, fill, taper)


def score(analysis: Analysis, scene: Scene) -> dict[str, bool]:
    """Per attribute (ATTRIBUTES), whether the analysis matches what the scene's caption asked for."""
    return {a: getattr(analysis, a) == getattr(scene, a) for a in ATTRIBUTES}


def confusion(expected: list[str], got: list[Optional[str]], labels: list[str]) -> str:
    """A text confusion table: one row per expected label, one column per label read (plus "none")."""
    columns = labels + ["none"]
    width = max(len(c) for c in columns + labels) + 1
    lines = ["expected \\ read".ljust(width) + "".join(c.rjust(width) for c in columns)]
    for row in labels:
        counts = [sum(1 for e, g in zip(expected, got) if e == row and (g or "none") == c) for c in columns]
        lines.append(row.ljust(width) + "".join(str(n).rjust(width) for n in counts))
    return "\n".join(lines)


LABELS = {
    "color": list(COLORS),
    "shape": ["circle", "square", "triangle"],
    "position": list(POSITIONS),
    "size": list(_SIZE_ORDER),
    "background": list(BACKGROUNDS),
}
