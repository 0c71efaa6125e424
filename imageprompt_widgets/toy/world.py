"""The toy world: 64×64 pictures of one flat shape on a plain background, with their captions.

Three shapes (circle, square, triangle) in one of six pure RGB colours on a background of another
of them; position and size vary. Captions read exactly ``"a {colour} {shape} on a {colour} background"``.
Everything is a pure function of a seed, so the training script and the tests draw the same pictures
on every machine.

Some combinations of (shape, colour, background) are *held out*: training never sees them, in
pictures or in captions. Every shape-colour, shape-background and colour-background pair still occurs
in training, so the held-out scenes test whether the models compose what they learned.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

#: The pure RGB colours of the world, in a fixed order (indices are used by the judge and the split).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Side of every picture in pixels (the toy VAE turns it into an 8×8 latent, a factor of 8 like SD's).
IMAGE_SIZE = 64
#: Smallest and largest side of a shape's bounding box in pixels (inclusive).
MIN_SIZE, MAX_SIZE = 20, 44
#: How many held-out scenes the measurements use (two per held-out combination).
HELD_OUT_COUNT = 48


def caption(colour: str, shape: str, background: str) -> str:
    """The world's one sentence: ``"a red circle on a blue background"``."""
    return f"a {colour} {shape} on a {background} background"


def _held_out_combinations() -> tuple[tuple[str, str, str], ...]:
    """24 of the 90 (shape, colour, background) combinations, none of which training sees.

    Each (shape, colour) pair loses the background ``colour + 1 + shape`` places on in the palette
    (so every shape loses every background once), and each colour loses one more with shape
    ``colour mod 3`` and background ``colour + 5``: four held-out combinations per colour, eight per
    shape, and every pair of the three attributes still appears in training at least twice.
    """
    held = []
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            held.append((shape, colour, COLOURS[(c + 1 + s) % len(COLOURS)]))
        held.append((SHAPES[c % len(SHAPES)], colour, COLOURS[(c + 5) % len(COLOURS)]))
    return tuple(held)


HELD_OUT: tuple[tuple[str, str, str], ...] = _held_out_combinations()
ALL_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(
    (shape, colour, background)
    for shape in SHAPES for colour in COLOURS for background in COLOURS if background != colour
)
TRAINING_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBINATIONS if c not in HELD_OUT)
SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class Scene:
    """One picture of the world: what it shows and where (``x, y``: top-left of the shape's box)."""

    shape: str
    colour: str
    background: str
    x: int
    y: int
    size: int

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    @property
    def held_out(self) -> bool:
        return (self.shape, self.colour, self.background) in HELD_OUT

    def draw(self, image_size: int = IMAGE_SIZE) -> Image.Image:
        """The picture: pure palette colours only (no anti-aliasing), ``image_size`` square."""
        image = Image.new("RGB", (image_size, image_size), PALETTE[self.background])
        draw_shape(ImageDraw.Draw(image), self.shape, (self.x, self.y, self.x + self.size - 1, self.y + self.size - 1),
                   PALETTE[self.colour])
        return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw ``shape`` filling the inclusive pixel box ``(left, top, right, bottom)``; triangles point up."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}: the world has {', '.join(SHAPES)}.")


def random_scene(rng: random.Random, split: str = "train") -> Scene:
    """One scene from ``split`` (``"train"`` or ``"held_out"``), drawn with ``rng``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    combinations = TRAINING_COMBINATIONS if split == "train" else HELD_OUT
    shape, colour, background = combinations[rng.randrange(len(combinations))]
    return _placed(rng, shape, colour, background)


def _placed(rng: random.Random, shape: str, colour: str, background: str) -> Scene:
    size = rng.randint(MIN_SIZE, MAX_SIZE)
    x = rng.randint(0, IMAGE_SIZE - size)
    y = rng.randint(0, IMAGE_SIZE - size)
    return Scene(shape, colour, background, x, y, size)


def scenes(count: int, seed: int = 0, split: str = "train") -> list[Scene]:
    """``count`` scenes of ``split``, the same for the same seed on every machine."""
    rng = random.Random(f"toy-world:{split}:{seed}")
    return [random_scene(rng, split) for _ in range(count)]


def iter_scenes(seed: int = 0, split: str = "train") -> Iterator[Scene]:
    """An endless stream of scenes (for training loops)."""
    rng = random.Random(f"toy-world:{split}:{seed}")
    while True:
        yield random_scene(rng, split)


def held_out_scenes(count: int = HELD_OUT_COUNT, seed: int = 0) -> list[Scene]:
    """The evaluation set: the held-out combinations in turn (balanced), each placed by its own draw."""
    rng = random.Random(f"toy-world:evaluation:{seed}")
    return [_placed(rng, *HELD_OUT[i % len(HELD_OUT)]) for i in range(count)]
