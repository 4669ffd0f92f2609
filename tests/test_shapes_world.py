import numpy as np
import pytest

from xmodal.worlds.judge import read_scene
from xmodal.worlds.shapes import (
    HELD_OUT_PAIRS,
    ObjectSpec,
    Scene,
    SceneObject,
    SceneSpec,
    parse,
    render,
    sample_scene,
    scene_seed,
)


def test_same_seed_same_scene_and_pixels():
    a, b = sample_scene(42, "train"), sample_scene(42, "train")
    assert a == b
    assert np.array_equal(render(a), render(b))
    assert sample_scene(43, "train") != a


@pytest.mark.parametrize("split", ["train", "test", "novel"])
def test_split_constraints_and_geometry(split):
    for i in range(300):
        scene = sample_scene(scene_seed(split, 0, i), split)
        held = [(o.color, o.shape) in HELD_OUT_PAIRS for o in scene.objects]
        assert any(held) if split == "novel" else not any(held)
        assert 200 <= scene.background <= 245 and len(scene.objects) in (1, 2)
        for o in scene.objects:
            lo, hi = (6, 8) if o.size == "small" else (11, 14)
            assert lo <= o.r <= hi and o.cx - o.r >= 1 and o.cx + o.r <= 63 and o.cy - o.r >= 1 and o.cy + o.r <= 63
        if len(scene.objects) == 2:
            a, b = scene.objects
            dx, dy = b.cx - a.cx, b.cy - a.cy
            assert np.hypot(dx, dy) >= a.r + b.r + 3
            assert (a.color, a.shape) != (b.color, b.shape)
            assert abs(dx) >= 1.5 * abs(dy) or abs(dy) >= 1.5 * abs(dx)
            assert max(abs(dx), abs(dy)) >= 10


def test_splits_use_disjoint_seeds():
    train = {scene_seed("train", s, i) for s in range(3) for i in (0, 999_999)}
    test = {scene_seed("test", s, i) for s in range(3) for i in (0, 999_999)}
    assert not train & test
    with pytest.raises(ValueError):
        scene_seed("train", 0, 1_000_000)


def test_both_counts_occur_about_equally():
    counts = [len(sample_scene(i).objects) for i in range(1000)]
    assert 0.45 < counts.count(1) / 1000 < 0.55


def test_captions_and_paraphrases_parse_to_the_scene():
    for i in range(200):
        scene = sample_scene(i, "test")
        refs = scene.references()
        assert refs[0] == scene.caption()
        assert len(refs) == (4 if len(scene.objects) == 1 else 5)
        assert all(parse(r) == scene.spec for r in refs)


def test_relations_normalize():
    a = parse("a large blue square to the right of a small red circle")
    b = parse("a small red circle to the left of a large blue square")
    assert a == b and a.relation == "left" and a.objects[0] == ObjectSpec("small", "red", "circle")
    assert parse("A  large green cross ABOVE a small yellow triangle ") == parse("a small yellow triangle is below a large green cross")
    assert parse("there is a small red circle") == SceneSpec((ObjectSpec("small", "red", "circle"),))


@pytest.mark.parametrize("text", ["", "a red circle", "a small red circle.", "a small pink circle",
                                  "two small red circles", "a small red circle next to a large blue square",
                                  "a small red circle above", "the small red circle"])
def test_text_outside_the_grammar_does_not_parse(text):
    assert parse(text) is None


def test_canonical_caption_orders_left_and_upper_first():
    red = SceneObject("small", "red", "circle", 50, 30, 7, (215, 45, 45))
    blue = SceneObject("large", "blue", "square", 15, 32, 12, (45, 85, 215))
    assert Scene(0, "train", 220, (red, blue)).caption() == "a large blue square to the left of a small red circle"
    low = SceneObject("small", "red", "circle", 30, 50, 7, (215, 45, 45))
    high = SceneObject("large", "green", "cross", 32, 14, 12, (50, 160, 70))
    assert Scene(0, "train", 220, (low, high)).caption() == "a large green cross above a small red circle"


def test_render_background_and_colors():
    scene = Scene(0, "train", 222, (SceneObject("large", "red", "square", 32, 32, 12, (215, 45, 45)),))
    img = render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 222).all() and tuple(img[32, 32]) == (215, 45, 45)
    inside = (np.abs(img.astype(int) - 222).max(axis=2) > 0).sum()
    assert abs(inside - (2 * 0.85 * 12) ** 2) < 2 * 4 * 2 * 0.85 * 12  # area within an edge-pixel ring


@pytest.mark.parametrize("size", [32, 64, 100, 256])
def test_one_seed_same_scene_at_every_size(size):
    scene = sample_scene(7, "test")
    assert render(scene, size).shape == (size, size, 3)
    if size >= 64:
        assert read_scene(render(scene, size)) == scene.spec
    with pytest.raises(ValueError):
        render(scene, 300)


def test_judge_reads_rendered_scenes():
    scenes = [sample_scene(scene_seed(split, 5, i), split) for split in ("test", "novel") for i in range(150)]
    agree = sum(read_scene(render(s)) == s.spec for s in scenes)
    assert agree / len(scenes) >= 0.99


def test_judge_on_blank_image_reads_nothing():
    assert read_scene(np.full((64, 64, 3), 220, np.uint8)) is None
