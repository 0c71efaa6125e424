"""Judging a picture of the toy world: which colour, which shape, on which background.

A generated picture is never exactly a world picture (soft edges, slightly off colours, specks), so
the judge reads it the way a person would:

- every pixel is snapped to its nearest palette colour;
- the background is the palette colour most of the border has;
- the shape's colour is the palette colour most of the remaining (non-background) pixels have;
- the shape is the one of the three that, drawn by the world itself into the bounding box of the
  largest connected patch of that colour, overlaps the patch best (intersection over union). A
  square fills its box, a circle π/4 of it, a triangle half, and each overlaps itself perfectly.

The tests check that the judge is right on the world's own pictures.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .world import COLOURS, PALETTE, SHAPES, draw_shape

#: Fewer foreground pixels than this fraction of the picture means nothing was drawn.
MIN_FOREGROUND_FRACTION = 0.01
_PALETTE_ARRAY = np.array([PALETTE[name] for name in COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class Judgement:
    """What the judge saw. ``colour`` and ``shape`` are ``None`` when no shape stands out."""

    colour: str | None
    shape: str | None
    background: str
    #: The shape patch's overlap (IoU) with its best template, 0 to 1: how clean the drawing is.
    overlap: float
    #: Fraction of pixels that are not the background.
    foreground: float

    def matches(self, colour: str, shape: str) -> tuple[bool, bool]:
        """(colour right, shape right) against what should have been drawn."""
        return self.colour == colour, self.shape == shape


def nearest_palette_indices(image: Any) -> np.ndarray:
    """``[H, W]`` indices into :data:`COLOURS` of every pixel's nearest palette colour."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE_ARRAY[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def judge(image: Any) -> Judgement:
    """Judge one picture (a PIL image or an ``[H, W, 3]`` uint8 array)."""
    indices = nearest_palette_indices(image)
    border = np.concatenate([indices[0], indices[-1], indices[1:-1, 0], indices[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    foreground = indices != background
    fraction = float(foreground.mean())
    if fraction < MIN_FOREGROUND_FRACTION:
        return Judgement(None, None, COLOURS[background], 0.0, fraction)
    colour = int(np.bincount(indices[foreground], minlength=len(COLOURS)).argmax())
    patch = largest_component(indices == colour)
    shape, overlap = best_template(patch)
    return Judgement(COLOURS[colour], shape, COLOURS[background], overlap, fraction)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected patch of ``True`` pixels in ``mask`` (a boolean ``[H, W]``)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        size, queue = 0, deque([start])
        while queue:
            row, col = queue.popleft()
            size += 1
            for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                if 0 <= r < height and 0 <= c < width and mask[r, c] and not labels[r, c]:
                    labels[r, c] = label
                    queue.append((r, c))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_label else np.zeros_like(mask)


def best_template(patch: np.ndarray) -> tuple[str | None, float]:
    """The shape whose world drawing in ``patch``'s bounding box overlaps it best, and that overlap."""
    rows, cols = np.nonzero(patch)
    if rows.size == 0:
        return None, 0.0
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box_patch = patch[top : bottom + 1, left : right + 1]
    height, width = box_patch.shape
    scores = {}
    for shape in SHAPES:
        canvas = Image.new("1", (width, height), 0)
        draw_shape(ImageDraw.Draw(canvas), shape, (0, 0, width - 1, height - 1), 1)
        template = np.asarray(canvas, dtype=bool)
        scores[shape] = float((template & box_patch).sum() / (template | box_patch).sum())
    shape = max(scores, key=scores.get)
    return shape, scores[shape]


def run_row(picture: Any, output: Any) -> str:
    """One run's row of the route scoreboard, in words: what the judge read in the input and in the output, and
    which of colour, shape and background the output kept (the Inspector shows it for toy runs)."""
    seen_in, seen_out = judge(picture), judge(output)

    def words(seen: Judgement) -> str:
        return f"{seen.colour} {seen.shape} on {seen.background}" if seen.colour else f"nothing on {seen.background}"

    kept = [name for name in ("colour", "shape", "background")
            if getattr(seen_in, name) is not None and getattr(seen_in, name) == getattr(seen_out, name)]
    return (f"The toy world's judge read the input as {words(seen_in)} and the output as {words(seen_out)}: "
            f"{'kept ' + ', '.join(kept) if kept else 'kept none of colour, shape and background'}.")
