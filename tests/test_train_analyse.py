"""The analyser, proven on the dataset's own images before it judges a model."""
import numpy as np
import pytest

from fastdiff.train.analyse import ATTRIBUTES, LABELS, analyse, confusion, score
from fastdiff.train.data import BACKGROUNDS, make_scenes, render

N = 500


@pytest.fixture(scope="module")
def dataset_images():
    scenes = make_scenes(7, np.arange(N))
    return [scenes[i] for i in range(N)], render(scenes).permute(0, 2, 3, 1).numpy()


def test_recovers_every_attribute_of_dataset_images(dataset_images):
    scenes, images = dataset_images
    analyses = [analyse(im) for im in images]
    for attr in ATTRIBUTES:
        expected = [getattr(s, attr) for s in scenes]
        got = [getattr(a, attr) for a in analyses]
        accuracy = np.mean([e == g for e, g in zip(expected, got)])
        print(f"\n{attr}: {accuracy:.1%}\n" + confusion(expected, got, LABELS[attr]))
        assert accuracy >= 0.99, attr
    # Measurements, not only labels: the box centre within a pixel and a half of the geometry, the side within
    # two (a triangle's acute base corners have pixels under half covered, which the mask leaves out).
    centre = max(max(abs(a.cx - s.cx), abs(a.cy - s.cy)) for a, s in zip(analyses, scenes))
    side = max(abs(a.side - s.side) for a, s in zip(analyses, scenes))
    print(f"max centre error {centre * 128:.2f} px, max side error {side * 128:.2f} px")
    assert centre * 128 <= 1.5 and side * 128 <= 2.0


def test_score_compares_with_the_caption(dataset_images):
    scenes, images = dataset_images
    assert score(analyse(images[0]), scenes[0]) == dict.fromkeys(ATTRIBUTES, True)
    wrong = score(analyse(images[0]), scenes[1])
    assert wrong == {a: getattr(scenes[0], a) == getattr(scenes[1], a) for a in ATTRIBUTES}


def test_blank_image_has_no_shape():
    image = np.full((128, 128, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    a = analyse(image)
    assert a.background == "gray" and a.shape is None and a.color is None and a.position is None


def test_specks_and_noise_do_not_move_the_reading(dataset_images):
    scenes, images = dataset_images
    rng = np.random.default_rng(0)
    for k in range(40):
        image = images[k].astype(np.int16) + rng.integers(-12, 13, images[k].shape)  # sensor-like noise
        # A 3x3 speck of another colour in a corner, away from the shape.
        corner = (slice(4, 7), slice(4, 7)) if scenes[k].cx > 0.5 or scenes[k].cy > 0.5 else \
            (slice(120, 123), slice(120, 123))
        image[corner] = (255, 0, 255)
        a = analyse(np.clip(image, 0, 255).astype(np.uint8))
        assert score(a, scenes[k]) == dict.fromkeys(ATTRIBUTES, True), (k, scenes[k], a)


def test_refuses_other_layouts():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        analyse(np.zeros((3, 128, 128), dtype=np.uint8))
    with pytest.raises(ValueError, match="float32"):
        analyse(np.zeros((128, 128, 3), dtype=np.float32))
