"""Do the attention maps show *where*? Word maps against the drawn shape's true mask, as DAAM measures it.

For each held-out caption, text-to-image runs with ``trace_attention=True``; the maps of the colour word and
the shape word (one token each in the toy tokenizer) are summed, upsampled to the picture's 64 px (bilinear,
DAAM's aggregation: maps brought to image resolution, then normalised per token by their maximum) and
thresholded at τ = 0.4 (DAAM's). The truth is the judge's colour mask of the generated picture: the pixels
whose nearest palette colour is the shape's colour the judge read. The score is the intersection over union,
averaged (mIoU), beside a position-blind baseline on the same pictures: a centred disc of the world's mean
shape area. A map that localises must beat the disc.

The recorder (engine/attention.py) sums every layer at the latent grid (8 × 8 in the toy world) before this
upsampling; DAAM upsamples each layer to the image first. For bilinear resizes of 4 × 4 and 8 × 8 layers the
two differ only in how the 4 × 4 layer is interpolated; the numbers in docs/toy_world.md are this module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .judge import judge, nearest_palette_indices
from .world import COLOURS, IMAGE_SIZE, PALETTE, Scene, held_out_scenes

#: DAAM's threshold on per-token-normalised maps.
TAU = 0.4
#: The disc baseline's radius: the world's mean shape area (sides 20 to 44 px; squares fill their box, circles
#: π/4 of it, triangles half) is about 770 px², a disc of radius 16 px covers 804 px².
DISC_RADIUS = 16
#: Where the colour and shape words sit in ``"a {colour} {shape} on a {background} background"`` (BOS first).
COLOUR_TOKEN, SHAPE_TOKEN = 2, 3


def word_mask(maps: torch.Tensor, tokens: Sequence[int], size: int = IMAGE_SIZE, tau: float = TAU) -> np.ndarray:
    """``maps`` ``[L, h, w]`` → the boolean ``[size, size]`` mask of the tokens' summed map: each token's map
    upsampled (bilinear) and divided by its maximum, summed, divided by the sum's maximum, thresholded at ``tau``."""
    chosen = maps[list(tokens)].float()[None]  # [1, k, h, w]
    upsampled = F.interpolate(chosen, size=(size, size), mode="bilinear", align_corners=False)[0]
    upsampled = upsampled / upsampled.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    total = upsampled.sum(0)
    total = total / total.max().clamp_min(1e-12)
    return (total >= tau).numpy()


def iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else 1.0


def colour_mask(image: Any) -> np.ndarray | None:
    """The judge's mask of a picture's shape: pixels of the colour it read as the shape's (None: nothing drawn)."""
    seen = judge(image)
    if seen.colour is None:
        return None
    return nearest_palette_indices(image) == COLOURS.index(seen.colour)


def centred_disc(size: int = IMAGE_SIZE, radius: int = DISC_RADIUS) -> np.ndarray:
    canvas = Image.new("1", (size, size), 0)
    centre = (size - 1) / 2
    ImageDraw.Draw(canvas).ellipse((centre - radius, centre - radius, centre + radius, centre + radius), fill=1)
    return np.asarray(canvas, dtype=bool)


@dataclass
class Localisation:
    """Per picture: the word maps' IoU and the disc's, on the generated pictures (and the disc on the world's own)."""

    words: list[float] = field(default_factory=list)
    disc: list[float] = field(default_factory=list)
    disc_on_world: list[float] = field(default_factory=list)
    skipped: int = 0  # outputs where the judge saw no shape (no truth to compare with)

    @property
    def miou(self) -> float:
        return float(np.mean(self.words)) if self.words else 0.0

    @property
    def disc_miou(self) -> float:
        return float(np.mean(self.disc)) if self.disc else 0.0

    def line(self) -> str:
        return (f"word maps mIoU {self.miou:.2f} vs centred disc {self.disc_miou:.2f} on the same "
                f"{len(self.words)} generated pictures (disc on the world's own: "
                f"{float(np.mean(self.disc_on_world)) if self.disc_on_world else 0.0:.2f}; τ = {TAU})")


def word_map_localisation(pipe: Any, scenes: Sequence[Scene] | None = None, tau: float = TAU,
                          **settings: Any) -> Localisation:
    """Text-to-image on each held-out caption with the attention recorded; the colour and shape words' maps
    against the judge's colour mask of the output (seed = the scene's index)."""
    scenes = list(held_out_scenes(24) if scenes is None else scenes)
    grey = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
    disc = centred_disc()
    found = Localisation()
    for index, scene in enumerate(scenes):
        drawn = (np.asarray(scene.draw()) == np.array(PALETTE[scene.colour], dtype=np.uint8)).all(-1)
        found.disc_on_world.append(iou(disc, drawn))
        result = pipe.generate(grey, mode="blend", prompt=scene.caption, image_weight=0.0, seed=index,
                               trace_attention=True, **settings)
        truth = colour_mask(result.images[0])
        if truth is None:
            found.skipped += 1
            continue
        mask = word_mask(result.trace.attention_maps[0], (COLOUR_TOKEN, SHAPE_TOKEN), tau=tau)
        found.words.append(iou(mask, truth))
        found.disc.append(iou(disc, truth))
    return found
