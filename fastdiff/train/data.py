"""The procedural captioned dataset the default model is trained on: one flat-coloured shape on a flat background.

    a [small |large ]{color} {shape} {position} on a {background} background

    color       red, green, blue, yellow, purple, orange   (COLORS: exact RGB)
    shape       circle, square (axis-aligned), triangle (isosceles, apex up; base = height = side)
    position    on the left / on the right / at the top / at the bottom / in the center: the shape's centre
                (the centre of its bounding box) at x or y = 0.25 / 0.75 of the image side, or 0.5, each
                coordinate jittered by up to 0.05, then pulled in just enough to keep the whole shape inside
    background  white, black, gray                           (BACKGROUNDS: exact RGB)
    size        "small": side ~0.2 of the image, "large": ~0.45, no size word: between (SIZE_RANGES)

A scene is a pure function of (seed, index): its random draws come from a counter-based hash (SplitMix64) of
the seed, the index and the draw's number, so a batch of any indices is drawn at once, in any order, with no
generator state to save. Images are rendered with torch from each shape's signed distance, so the same code
draws one image on the CPU and a training batch on the GPU; edges are anti-aliased by pixel coverage
(a pixel is a blend of exactly two colours), the rest is flat.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

IMAGE_SIZE = 128

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# Caption phrase -> nominal shape centre (x, y) as fractions of the side; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
# Size class -> range of the shape's side (circle: diameter) as a fraction of the image side. "medium" is
# written as no size word; it sits midway between the others so that every class is 0.085 away from the next.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.18, 0.22),
    "medium": (0.305, 0.345),
    "large": (0.43, 0.47),
}
SIZE_WORDS = {"small": "small ", "medium": "", "large": "large "}
POSITION_JITTER = 0.05  # largest offset of the shape centre from its nominal position, per coordinate
MARGIN = 0.01  # the shape stays this far (as a fraction of the side) inside the image
# Every word a caption can contain; the default model's tokenizer is built from these.
CAPTION_WORDS = tuple(sorted({"a", "on", "background"} | {w.strip() for w in SIZE_WORDS.values() if w}
                             | set(COLORS) | set(SHAPES) | set(BACKGROUNDS)
                             | {w for phrase in POSITIONS for w in phrase.split()}))


@dataclass(frozen=True)
class Scene:
    """One image's content: the caption's words and the exact geometry that was drawn."""

    color: str  # a COLORS key
    shape: str  # one of SHAPES
    position: str  # a POSITIONS key
    background: str  # a BACKGROUNDS key
    size: str  # a SIZE_RANGES key ("medium" has no word in the caption)
    side: float  # the shape's side (circle: diameter) as a fraction of the image side
    cx: float  # the shape's centre (of its bounding box), fractions of the side, x to the right
    cy: float  # y downwards

    @property
    def caption(self) -> str:
        return f"a {SIZE_WORDS[self.size]}{self.color} {self.shape} {self.position} on a {self.background} background"


# ---- counter-based random draws -----------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
# The draws of one scene, by number: every scene uses all of them, so the numbering never shifts.
_DRAWS = ("color", "shape", "position", "background", "size", "side", "jitter_x", "jitter_y")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective mix of uint64 arrays, good enough to use each
    output as an independent uniform 64-bit draw."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, indices: np.ndarray) -> np.ndarray:
    """(N, len(_DRAWS)) float64 uniforms in [0, 1), a pure function of (seed, index, draw)."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))  # (1,)
    idx = _splitmix64(key ^ indices.astype(np.uint64))  # (N,)
    counters = idx[:, None] ^ _splitmix64(np.arange(len(_DRAWS), dtype=np.uint64) + key)[None, :]  # (N, D)
    return (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ---- scenes ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenes:
    """A batch of N scenes as arrays (index arrays into the name tuples), for vectorised rendering."""

    color: np.ndarray  # (N,) int, index into COLOR_NAMES
    shape: np.ndarray  # (N,) int, index into SHAPES
    position: np.ndarray  # (N,) int, index into POSITION_NAMES
    background: np.ndarray  # (N,) int, index into BACKGROUND_NAMES
    size: np.ndarray  # (N,) int, index into SIZE_NAMES
    side: np.ndarray  # (N,) float64, fraction of the image side
    cx: np.ndarray  # (N,) float64
    cy: np.ndarray  # (N,) float64

    def __len__(self) -> int:
        return len(self.color)

    def __getitem__(self, i: int) -> Scene:
        return Scene(COLOR_NAMES[self.color[i]], SHAPES[self.shape[i]], POSITION_NAMES[self.position[i]],
                     BACKGROUND_NAMES[self.background[i]], SIZE_NAMES[self.size[i]], float(self.side[i]),
                     float(self.cx[i]), float(self.cy[i]))

    @property
    def captions(self) -> list[str]:
        return [self[i].caption for i in range(len(self))]


COLOR_NAMES = tuple(COLORS)
POSITION_NAMES = tuple(POSITIONS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
SIZE_NAMES = tuple(SIZE_RANGES)


def make_scenes(seed: int, indices: Union[Sequence[int], np.ndarray]) -> Scenes:
    """The scenes at `indices` of the dataset `seed`: every attribute uniform over its values, the side uniform
    in its size class's range, the centre jittered uniformly and then clamped so the shape stays inside."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if (indices < 0).any():
        raise ValueError(f"indices must be >= 0, got {indices[indices < 0][:5].tolist()}")
    u = _uniforms(seed, indices)
    pick = {name: u[:, k] for k, name in enumerate(_DRAWS)}

    def choose(name: str, n: int) -> np.ndarray:
        return np.minimum((pick[name] * n).astype(np.int64), n - 1)

    color, shape = choose("color", len(COLOR_NAMES)), choose("shape", len(SHAPES))
    position, background = choose("position", len(POSITION_NAMES)), choose("background", len(BACKGROUND_NAMES))
    size = choose("size", len(SIZE_NAMES))
    lo, hi = np.array([SIZE_RANGES[s] for s in SIZE_NAMES]).T[:, size]  # (N,) each
    side = lo + pick["side"] * (hi - lo)
    nominal = np.array([POSITIONS[p] for p in POSITION_NAMES])[position]  # (N, 2)
    half = side / 2 + MARGIN
    cx = np.clip(nominal[:, 0] + (2 * pick["jitter_x"] - 1) * POSITION_JITTER, half, 1 - half)
    cy = np.clip(nominal[:, 1] + (2 * pick["jitter_y"] - 1) * POSITION_JITTER, half, 1 - half)
    return Scenes(color, shape, position, background, size, side, cx, cy)


# ---- rendering ------------------------------------------------------------------------------------------------

_COLOR_TABLE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # (6, 3)
_BACKGROUND_TABLE = np.array([BACKGROUNDS[b] for b in BACKGROUND_NAMES], dtype=np.float32)  # (3, 3)


def upload(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on `device`. To CUDA through pinned memory without waiting: a plain copy would
    synchronise the host with the GPU at every training step."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def render(scenes: Scenes, size: int = IMAGE_SIZE, device: Union[str, torch.device] = "cpu") -> Tensor:
    """Draw scenes: (N, 3, size, size) uint8 on `device`.

    Each pixel is background + coverage * (colour - background), with coverage = clamp(0.5 - d, 0, 1) for d
    the pixel centre's signed distance to the shape's outline in pixels (negative inside): exact at straight
    edges and circles, approximate within a pixel of a corner.
    """
    dev = torch.device(device)
    # One upload of everything per scene: (N, 10) = cx, cy, half side, shape, colour RGB, background RGB.
    params = np.concatenate([np.stack([scenes.cx, scenes.cy, scenes.side / 2, scenes.shape], axis=1),
                             _COLOR_TABLE[scenes.color], _BACKGROUND_TABLE[scenes.background]], axis=1)
    params = upload(torch.from_numpy(params.astype(np.float32)), dev)[:, :, None, None]  # (N, 10, 1, 1)
    cx, cy, half, shape = params[:, 0], params[:, 1], params[:, 2], params[:, 3]  # (N, 1, 1) each
    fg, bg = params[:, 4:7], params[:, 7:10]  # (N, 3, 1, 1) each

    coords = (torch.arange(size, dtype=torch.float32, device=dev) + 0.5) / size  # pixel centres
    dx, dy = coords[None, None, :] - cx, coords[None, :, None] - cy  # (N, 1, size), (N, size, 1)
    circle = torch.sqrt(dx * dx + dy * dy) - half  # (N, size, size)
    square = torch.maximum(dx.abs() - half, dy.abs() - half)
    # Apex (cx, cy - half), base corners (cx -+ half, cy + half): the slanted edges' outward unit normals
    # are (-+2, -1) / sqrt(5).
    slant = (2 * dx.abs() - (dy + half)) / 5 ** 0.5
    triangle = torch.maximum(dy - half, slant)
    distance = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle)) * size
    coverage = (0.5 - distance).clamp(0, 1)[:, None]  # (N, 1, size, size)
    return (bg + coverage * (fg - bg)).round().to(torch.uint8)


class ShapesDataset:
    """The dataset `seed`, indexable without end: item i is a pure function of (seed, i).

        ds = ShapesDataset(seed=0)
        item = ds[7]          # {"image": (3, 128, 128) uint8 ndarray, "caption": str, "scene": Scene}
        images, captions = ds.batch(range(256), device="cuda")   # (256, 3, 128, 128) float in [-1, 1]
    """

    def __init__(self, seed: int = 0, size: int = IMAGE_SIZE):
        self.seed = seed
        self.size = size

    def __getitem__(self, index: int) -> dict:
        scenes = make_scenes(self.seed, [index])
        return {"image": render(scenes, self.size)[0].numpy(), "caption": scenes[0].caption, "scene": scenes[0]}

    def scenes(self, indices: Union[Sequence[int], np.ndarray]) -> Scenes:
        return make_scenes(self.seed, indices)

    def batch(self, indices: Union[Sequence[int], np.ndarray],
              device: Union[str, torch.device] = "cpu") -> tuple[Tensor, list[str]]:
        """Images (N, 3, size, size) float32 in [-1, 1] on `device` (the uint8 pixels, rescaled) and captions."""
        scenes = make_scenes(self.seed, indices)
        return render(scenes, self.size, device).float() / 127.5 - 1.0, scenes.captions


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """n scenes of the dataset `seed` (indices 0..n-1): random captions with their attributes, for evaluation."""
    scenes = make_scenes(seed, np.arange(n))
    return [scenes[i] for i in range(n)]
