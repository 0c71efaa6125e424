"""The toy world: its generator, its judge, the shipped weights behind the ``toy`` presets, and (slow) the
measured behaviour of text-to-image and of every image-prompt method, with floors a regression falls through."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imageprompt_widgets.toy import judge, world

# ---------------------------------------------------------------------------------------------
# The world


def test_the_same_seed_draws_the_same_pictures_and_another_seed_others():
    first, again, other = world.scenes(20, seed=3), world.scenes(20, seed=3), world.scenes(20, seed=4)
    assert first == again
    assert [s.draw().tobytes() for s in first] == [s.draw().tobytes() for s in again]
    assert first != other
    assert world.held_out_scenes() == world.held_out_scenes()


def test_each_picture_shows_what_its_caption_says():
    """Counted independently of the judge: two colours only, the named one covering the shape's area."""
    expected_fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    pattern = re.compile(r"a (\w+) (circle|square|triangle) on a (\w+) background")
    for scene in world.scenes(150, seed=1) + world.held_out_scenes():
        colour, shape, background = pattern.fullmatch(scene.caption).groups()
        assert (colour, shape, background) == (scene.colour, scene.shape, scene.background)
        pixels = np.asarray(scene.draw())
        assert pixels.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        is_shape = (pixels == world.PALETTE[colour]).all(-1)
        is_background = (pixels == world.PALETTE[background]).all(-1)
        assert (is_shape | is_background).all(), "only the two named colours appear"
        rows, cols = np.nonzero(is_shape)
        box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert box == (scene.x, scene.y, scene.x + scene.size, scene.y + scene.size)
        assert is_shape.sum() / scene.size**2 == pytest.approx(expected_fill[shape], abs=0.06)


def test_training_never_sees_a_held_out_combination_but_sees_every_pair_of_its_parts():
    held = set(world.HELD_OUT)
    assert len(held) == 24 and len(world.TRAINING_COMBINATIONS) == 66
    assert not {(s.shape, s.colour, s.background) for s in world.scenes(3000, seed=0)} & held
    evaluation = world.held_out_scenes()
    assert len(evaluation) == 48 and all(scene.held_out for scene in evaluation)
    assert {c: sum(s.colour == c for s in evaluation) for c in world.COLOURS} == dict.fromkeys(world.COLOURS, 8)
    for shape, colour, background in held:
        trained = world.TRAINING_COMBINATIONS
        assert any(t[:2] == (shape, colour) for t in trained)
        assert any(t[1:] == (colour, background) for t in trained)
        assert any((t[0], t[2]) == (shape, background) for t in trained)


def test_unknown_split_and_shape_are_refused():
    import random

    with pytest.raises(ValueError, match="split"):
        world.random_scene(random.Random(0), "test")
    with pytest.raises(ValueError, match="shape"):
        world.Scene("star", "red", "blue", 0, 0, 20).draw()


# ---------------------------------------------------------------------------------------------
# The judge


def test_the_judge_reads_every_combination_of_the_world_exactly():
    rng = np.random.default_rng(0)
    for shape, colour, background in world.ALL_COMBINATIONS:
        for size in (world.MIN_SIZE, world.MAX_SIZE, int(rng.integers(world.MIN_SIZE, world.MAX_SIZE))):
            x, y = (int(v) for v in rng.integers(0, world.IMAGE_SIZE - size + 1, size=2))
            seen = judge.judge(world.Scene(shape, colour, background, x, y, size).draw())
            assert (seen.colour, seen.shape, seen.background) == (colour, shape, background)
            assert seen.overlap == 1.0


def test_the_judge_still_reads_blurred_noisy_pictures():
    """Generated pictures have soft edges and off colours: a blur and noise must not fool the judge."""
    rng = np.random.default_rng(1)
    scenes = world.scenes(60, seed=2)
    right = 0
    for scene in scenes:
        blurred = np.asarray(scene.draw().filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 25, blurred.shape), 0, 255).astype(np.uint8)
        seen = judge.judge(noisy)
        right += (seen.colour, seen.shape, seen.background) == (scene.colour, scene.shape, scene.background)
    assert right >= 57


def test_the_judge_says_nothing_was_drawn_on_a_plain_picture():
    seen = judge.judge(Image.new("RGB", (64, 64), world.PALETTE["blue"]))
    assert (seen.colour, seen.shape, seen.background) == (None, None, "blue")
    assert seen.matches("red", "circle") == (False, False)


def test_the_largest_component_ignores_specks():
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:4, 1:4] = True
    mask[8, 8] = True
    assert judge.largest_component(mask).sum() == 9
    assert not judge.largest_component(np.zeros((4, 4), dtype=bool)).any()
