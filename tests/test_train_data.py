"""The procedural dataset: determinism per (seed, index), the caption grammar, the geometry the issue specifies,
and flat rendering."""
import re

import numpy as np
import pytest
import torch

from fastdiff.train.data import (BACKGROUNDS, CAPTION_WORDS, COLORS, MARGIN, POSITION_JITTER, POSITIONS, SHAPES,
                                 SIZE_RANGES, ShapesDataset, make_scenes, render, sample_scenes)

N = 2000
CAPTION = re.compile(r"a (?:(small|large) )?(red|green|blue|yellow|purple|orange) (circle|square|triangle) "
                     r"(on the left|on the right|at the top|at the bottom|in the center) on a (white|black|gray) "
                     r"background")


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(0, np.arange(N))


def test_item_is_a_pure_function_of_seed_and_index():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in (0, 1, 977, 10**12):
        assert np.array_equal(a[i]["image"], b[i]["image"]) and a[i]["scene"] == b[i]["scene"]
    # A batch in any order holds exactly the items at its indices.
    images, captions = a.batch([977, 0, 1])
    expected = np.stack([a[i]["image"] for i in (977, 0, 1)]).astype(np.float32) / 127.5 - 1
    print("max |batch - items|", np.abs(images.numpy() - expected).max())
    assert np.array_equal(images.numpy(), expected)
    assert captions == [a[i]["caption"] for i in (977, 0, 1)]
    assert a[0]["image"].shape == (3, 128, 128) and a[0]["image"].dtype == np.uint8
    assert [s.caption for s in sample_scenes(3, 3)] == [a[i]["caption"] for i in range(3)]


def test_other_seeds_give_other_scenes():
    same = sum(make_scenes(0, [i])[0] == make_scenes(1, [i])[0] for i in range(50))
    assert same == 0


def test_negative_index_is_refused():
    with pytest.raises(ValueError, match="indices must be >= 0"):
        make_scenes(0, [3, -1])


def test_captions_follow_the_grammar(scenes):
    for i in range(N):
        s = scenes[i]
        m = CAPTION.fullmatch(s.caption)
        assert m, s.caption
        size_word, color, shape, position, background = m.groups()
        assert (size_word or "medium") == s.size
        assert (color, shape, position, background) == (s.color, s.shape, s.position, s.background)
    assert sorted({w for c in scenes.captions for w in c.split()}) == list(CAPTION_WORDS)


def test_attributes_are_uniform(scenes):
    for name, values in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS),
                         ("background", BACKGROUNDS), ("size", SIZE_RANGES)):
        counts = np.bincount(getattr(scenes, name), minlength=len(values))
        print(name, counts.tolist())
        expected = N / len(values)
        # 5 standard deviations of a binomial count
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (name, counts)


def test_geometry_follows_the_spec(scenes):
    for i in range(N):
        s = scenes[i]
        lo, hi = SIZE_RANGES[s.size]
        assert lo <= s.side <= hi
        nx, ny = POSITIONS[s.position]
        assert abs(s.cx - nx) <= POSITION_JITTER + 1e-12 and abs(s.cy - ny) <= POSITION_JITTER + 1e-12
        half = s.side / 2
        assert MARGIN - 1e-12 <= min(s.cx - half, s.cy - half, 1 - s.cx - half, 1 - s.cy - half)
    # Small and large are "about 0.2" and "about 0.45"; no size word is between them.
    assert SIZE_RANGES["small"][1] < SIZE_RANGES["medium"][0] and SIZE_RANGES["medium"][1] < SIZE_RANGES["large"][0]
    assert np.mean(SIZE_RANGES["small"]) == pytest.approx(0.2) and np.mean(SIZE_RANGES["large"]) == pytest.approx(0.45)


def test_render_is_flat_and_blends_only_two_colours():
    sub = make_scenes(0, np.arange(200))
    images = render(sub).permute(0, 2, 3, 1).numpy()
    for k in range(200):
        s = sub[k]
        fg, bg = np.array(COLORS[s.color], float), np.array(BACKGROUNDS[s.background], float)
        px = images[k].reshape(-1, 3).astype(float)
        exact = np.all(px == fg, axis=1) | np.all(px == bg, axis=1)
        # Every other pixel is an edge pixel: bg + c (fg - bg) for one c in (0, 1), up to rounding.
        c = ((px - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        residual = np.abs(px - (bg + c[:, None] * (fg - bg))).max(axis=1)
        assert residual.max() <= 1.0, (k, residual.max())
        assert exact.mean() > 0.95, (k, exact.mean())
        # The shape's area matches its geometry: side^2 * (1, pi/4, 1/2) for square, circle, triangle.
        area = float(np.clip(c, 0, 1).sum()) / images.shape[1] ** 2
        expected = s.side ** 2 * {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[s.shape]
        assert area == pytest.approx(expected, rel=0.03), (k, s)


def test_render_at_other_sizes_and_devices_agree():
    sub = make_scenes(5, np.arange(8))
    small = render(sub, 64)
    assert small.shape == (8, 3, 64, 64) and small.dtype == torch.uint8
    if torch.cuda.is_available():
        gpu = render(sub, 128, "cuda").cpu()
        mismatch = (gpu.int() - render(sub).int()).abs().max().item()
        print("max |cuda - cpu| pixel", mismatch)
        assert mismatch <= 1
