"""Do the attention maps show *where*? Word maps and IP-Adapter image-token maps against the drawn shape's true
mask, as DAAM measures it.

For each held-out caption, text-to-image runs with ``trace_attention=True``; the maps of the colour word and
the shape word (one token each in the toy tokenizer) are summed, upsampled to the picture's 64 px (bilinear,
DAAM's aggregation: maps brought to image resolution, then normalised per token by their maximum) and
thresholded at τ = 0.4 (DAAM's). The truth is the judge's colour mask of the generated picture: the pixels
whose nearest palette colour is the shape's colour the judge read. The score is the intersection over union,
averaged (mIoU), beside a position-blind baseline on the same pictures: a centred disc of the world's mean
shape area. A map that localises must beat the disc.

The IP-Adapter's image tokens are measured the same way (:func:`adapter_map_localisation`): each held-out picture
as the prompt on ``toy-ip-adapter`` (its defaults), the adapter tokens' maps (``trace.extras
["adapter_attention_maps"]``: their own softmax, weighted by the adapter's scale) aggregated and thresholded as
the words' are, against the judge's colour mask of the output, beside the disc on the same outputs.
``python -m imageprompt_widgets.toy.localise`` prints both rows.

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
    label: str = "word maps"

    @property
    def miou(self) -> float:
        return float(np.mean(self.words)) if self.words else 0.0

    @property
    def disc_miou(self) -> float:
        return float(np.mean(self.disc)) if self.disc else 0.0

    def line(self) -> str:
        return (f"{self.label} mIoU {self.miou:.2f} vs centred disc {self.disc_miou:.2f} on the same "
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


class NoAdapterAttentionError(ValueError):
    """A run measured for its IP-Adapter maps recorded none (no adapter loaded, or another mode)."""


def adapter_map_localisation(pipe: Any, scenes: Sequence[Scene] | None = None, tau: float = TAU,
                             tokens: Sequence[int] | None = None, **settings: Any) -> Localisation:
    """Each held-out picture as the prompt through the loaded IP-Adapter (the pipeline's defaults, seed = the
    scene's index) with the attention recorded; the adapter's image-token maps (all of them, or ``tokens``)
    against the judge's colour mask of the output, beside the centred disc on the same outputs."""
    scenes = list(held_out_scenes(24) if scenes is None else scenes)
    disc = centred_disc()
    found = Localisation(label="IP-Adapter image-token maps")
    for index, scene in enumerate(scenes):
        picture = scene.draw()
        drawn = (np.asarray(picture) == np.array(PALETTE[scene.colour], dtype=np.uint8)).all(-1)
        found.disc_on_world.append(iou(disc, drawn))
        result = pipe.generate(picture, seed=index, trace_attention=True, **settings)
        maps = result.trace.extras.get("adapter_attention_maps")
        if maps is None:
            raise NoAdapterAttentionError("This run recorded no IP-Adapter attention: measure a pipeline with an IP-Adapter "
                             "loaded (the toy-ip-adapter preset) in mode 'ip_adapter'.")
        truth = colour_mask(result.images[0])
        if truth is None:
            found.skipped += 1
            continue
        chosen = range(maps.shape[1]) if tokens is None else tokens
        found.words.append(iou(word_mask(maps[0], chosen, tau=tau), truth))
        found.disc.append(iou(disc, truth))
    return found


def localisation_table(rows: Sequence[Localisation]) -> str:
    """Measured maps and the centred disc on the same generated pictures, as Markdown (one row per map kind)."""
    lines = [f"| maps (τ = {TAU}) | pictures | mIoU | centred disc, same pictures | above the disc |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.label} | {len(row.words)} | {row.miou:.2f} | {row.disc_miou:.2f} | "
                     f"{row.miou - row.disc_miou:+.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imageprompt_widgets.toy.localise``: the word maps (``toy``, text-to-image) and the IP-Adapter's
    image-token maps (``toy-ip-adapter``) against the judge's mask, beside the centred disc, as Markdown."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Do the toy world's attention maps show where? (DAAM's mIoU)")
    parser.add_argument("--scenes", type=int, default=24, help="how many held-out scenes (24: each combination once)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the presets')")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from ..engine.pipeline import ImagePromptPipeline

    extra = {} if args.steps is None else {"steps": args.steps}
    scenes = held_out_scenes(args.scenes)
    start = time.perf_counter()
    words = word_map_localisation(ImagePromptPipeline.from_preset("toy"), scenes, **extra)
    adapter = adapter_map_localisation(ImagePromptPipeline.from_preset("toy-ip-adapter"), scenes, **extra)
    print(localisation_table([words, adapter]))
    skipped = words.skipped + adapter.skipped
    print(f"\n({2 * len(scenes)} pictures in {time.perf_counter() - start:.0f} s; {skipped} with no shape to compare "
          "left out)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
