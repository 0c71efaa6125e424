"""Do the attention maps show *where*? Word maps and IP-Adapter image-token maps against the drawn shape's true
mask, as DAAM measures it.

For each held-out caption, text-to-image runs with ``trace_attention=True``; the maps of the colour word and
the shape word (one token each in the toy tokenizer) are merged and brought to the picture's 64 px as DAAM does
(averaged, upsampled bicubically, rescaled to [0, 1] by their minimum and maximum) and thresholded at DAAM's
τ = 0.4. The truth is the judge's colour mask of the generated picture: the pixels whose nearest palette colour
is the shape's colour the judge read. The score is the intersection over union, averaged (mIoU), beside a
position-blind baseline on the same pictures: a centred disc of the world's mean shape area. A map that
localises must beat the disc.

Two more numbers say *why* a score is what it is: the grid's ceiling (:func:`grid_ceiling`: the true mask itself
averaged over the latent cells and aggregated the same way, the best any map on that grid could score) and the
maps' contrast (:func:`map_contrast`: how much a map varies across the picture before the rescaling).

The IP-Adapter's image tokens are measured the same way (:func:`adapter_map_localisation`): each held-out picture
as the prompt on ``toy-ip-adapter`` (its defaults), the adapter tokens' maps (``trace.extras
["adapter_attention_maps"]``: their own softmax, weighted by the adapter's scale) aggregated and thresholded as
the words' are, against the judge's colour mask of the output, beside the disc on the same outputs.
``python -m imageprompt_widgets.toy.localise`` prints both rows, and a third: the word maps of ``toy-fine``, the
same world's base on a 16 × 16 latent (the one whose maps show where).

The recorder (engine/attention.py) sums every layer at the latent grid (8 × 8 in the toy world, 16 × 16 on
``toy-fine``; coarser layers upsampled bilinearly) before this upsampling; DAAM brings each layer to a common grid
(bicubic) first. The two differ only in how the coarser layers are interpolated; the numbers in
docs/toy_world.md are this module's.
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
    """``maps`` ``[L, h, w]`` → the boolean ``[size, size]`` mask of the tokens' map, as DAAM computes it
    (``GlobalHeatMap.compute_word_heat_map`` then ``WordHeatMap.expand_as``): the tokens' maps averaged, upsampled
    (bicubic), rescaled to [0, 1] by their minimum and maximum, thresholded at ``tau`` (strictly above)."""
    return normalised_map(maps, tokens, size).numpy() > tau


def normalised_map(maps: torch.Tensor, tokens: Sequence[int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """The tokens' averaged map at ``size`` px, min-max rescaled to [0, 1] (DAAM's ``expand_as``)."""
    merged = maps[list(tokens)].float().mean(0)[None, None]  # [1, 1, h, w]
    upsampled = F.interpolate(merged, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    low, high = upsampled.min(), upsampled.max()
    return (upsampled - low) / (high - low + 1e-8)


def map_contrast(maps: torch.Tensor, tokens: Sequence[int]) -> float:
    """How much the tokens' averaged map varies across the picture, as a share of its maximum (0: flat): min-max
    rescaling shows any map as 0 to 1, so this says how much there was to rescale."""
    merged = maps[list(tokens)].float().mean(0)
    return float((merged.max() - merged.min()) / merged.max().clamp_min(1e-12))


def grid_ceiling(truth: np.ndarray, grid: tuple[int, int], tau: float = TAU) -> float:
    """The best a map on a ``grid`` of latent cells could score: the true mask itself, averaged over each cell,
    aggregated and thresholded as the measured maps are, against the true mask."""
    cells = F.adaptive_avg_pool2d(torch.from_numpy(truth.astype(np.float32))[None, None], grid)[0]
    return iou(word_mask(cells, (0,), size=truth.shape[0], tau=tau), truth)


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


def _mean(values: Sequence[float]) -> float:
    """The average of per-picture scores (0.0 for none: nothing was measured)."""
    return float(np.mean(values)) if values else 0.0


@dataclass
class Localisation:
    """Per picture: the maps' IoU and the disc's, on the generated pictures (and the disc on the world's own), the
    latent grid's ceiling on the same truths, and how much the maps varied before rescaling."""

    words: list[float] = field(default_factory=list)
    disc: list[float] = field(default_factory=list)
    disc_on_world: list[float] = field(default_factory=list)
    ceiling: list[float] = field(default_factory=list)
    contrast: list[float] = field(default_factory=list)
    skipped: int = 0  # outputs where the judge saw no shape (no truth to compare with)
    label: str = "word maps"
    #: Per picture (measured or not): its scene's index, the output and where its maps are above τ (:func:`lit`,
    #: the docs' grid).
    shown: list[tuple[int, Any, np.ndarray]] = field(default_factory=list, repr=False)

    @property
    def miou(self) -> float:
        return _mean(self.words)

    @property
    def disc_miou(self) -> float:
        return _mean(self.disc)

    @property
    def ceiling_miou(self) -> float:
        return _mean(self.ceiling)

    @property
    def mean_contrast(self) -> float:
        return _mean(self.contrast)

    def add(self, maps: torch.Tensor, words: Sequence[Sequence[int]], truth: np.ndarray, disc: np.ndarray,
            tau: float = TAU) -> None:
        """One picture: ``maps`` ``[L, h, w]`` on the latent grid, the ``words`` measured (each a group of tokens
        merged into one map, as DAAM merges a word's tokens; the picture's score is their mean), the true mask."""
        self.words.append(float(np.mean([iou(word_mask(maps, word, size=truth.shape[0], tau=tau), truth)
                                         for word in words])))
        self.disc.append(iou(disc, truth))
        self.ceiling.append(grid_ceiling(truth, tuple(maps.shape[-2:]), tau))
        self.contrast.append(float(np.mean([map_contrast(maps, word) for word in words])))

    def line(self) -> str:
        return (f"{self.label} mIoU {self.miou:.2f} vs centred disc {self.disc_miou:.2f} on the same "
                f"{len(self.words)} generated pictures (disc on the world's own: "
                f"{_mean(self.disc_on_world):.2f}; the latent grid's ceiling "
                f"{self.ceiling_miou:.2f}; the maps vary by {100 * self.mean_contrast:.0f} % of their maximum; "
                f"τ = {TAU})")


#: The row of the ``toy-fine`` preset's word maps (its 16 × 16 latent) in the table.
FINE_LABEL = "word maps, toy-fine (16 × 16 latent)"


def word_map_localisation(pipe: Any, scenes: Sequence[Scene] | None = None, tau: float = TAU,
                          label: str = "word maps", **settings: Any) -> Localisation:
    """Text-to-image on each held-out caption with the attention recorded; the colour and shape words' maps
    against the judge's colour mask of the output (seed = the scene's index)."""
    scenes = list(held_out_scenes(24) if scenes is None else scenes)
    grey = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
    disc = centred_disc()
    found = Localisation(label=label)
    for index, scene in enumerate(scenes):
        drawn = (np.asarray(scene.draw()) == np.array(PALETTE[scene.colour], dtype=np.uint8)).all(-1)
        found.disc_on_world.append(iou(disc, drawn))
        result = pipe.generate(grey, mode="blend", prompt=scene.caption, image_weight=0.0, seed=index,
                               trace_attention=True, **settings)
        maps = result.trace.attention_maps[0]
        found.shown.append((index, result.images[0], word_mask(maps, (COLOUR_TOKEN, SHAPE_TOKEN), tau=tau)))
        truth = colour_mask(result.images[0])
        if truth is None:
            found.skipped += 1
            continue
        found.add(maps, [(COLOUR_TOKEN, SHAPE_TOKEN)], truth, disc, tau)
    return found


def lit(picture: Any, mask: np.ndarray, kept: float = 0.25) -> Image.Image:
    """The picture washed out to grey outside ``mask`` (``kept`` of each pixel left): where a map says the words
    act, in the picture's own pixels (the shape should be what keeps its colour; grey, not dark, so that a black
    background shows the difference too)."""
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    washed = kept * pixels + (1 - kept) * 128.0
    return Image.fromarray(np.where(mask[..., None], pixels, washed).round().astype(np.uint8))


class NoAdapterAttentionError(ValueError):
    """A run measured for its IP-Adapter maps recorded none (no adapter loaded, or another mode)."""


def adapter_map_localisation(pipe: Any, scenes: Sequence[Scene] | None = None, tau: float = TAU,
                             tokens: Sequence[int] | None = None, **settings: Any) -> Localisation:
    """Each held-out picture as the prompt through the loaded IP-Adapter (the pipeline's defaults, seed = the
    scene's index) with the attention recorded; each of the adapter's image-token maps (all of them, or ``tokens``)
    against the judge's colour mask of the output, as DAAM scores each word alone (averaged over the tokens: the
    tokens' own softmax sums to 1 at every position, so their merged map would be flat), beside the centred disc
    on the same outputs."""
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
        found.add(maps[0], [(token,) for token in (range(maps.shape[1]) if tokens is None else tokens)], truth,
                  disc, tau)
    return found


def lit_rows(measured: Sequence[Localisation], count: int = 6) -> list[list[Image.Image]]:
    """The first ``count`` captions of the measurements, one row each: per measurement the output, then the output
    :func:`lit` where its word maps are above τ."""
    kept = [{index: (output, mask) for index, output, mask in found.shown} for found in measured]
    common = sorted(set.intersection(*(set(pictures) for pictures in kept)))[:count]
    return [[picture for pictures in kept for picture in (pictures[index][0], lit(*pictures[index]))]
            for index in common]


def localisation_table(rows: Sequence[Localisation]) -> str:
    """Measured maps and the centred disc on the same generated pictures, as Markdown (one row per map kind)."""
    lines = [(f"| maps (τ = {TAU}) | pictures | mIoU | centred disc, same pictures | above the disc | "
              "the latent grid's ceiling | the maps vary by |"),
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.label} | {len(row.words)} | {row.miou:.2f} | {row.disc_miou:.2f} | "
                     f"{row.miou - row.disc_miou:+.2f} | {row.ceiling_miou:.2f} | {100 * row.mean_contrast:.0f} % |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imageprompt_widgets.toy.localise``: the word maps (``toy`` and ``toy-fine``, text-to-image) and the
    IP-Adapter's image-token maps (``toy-ip-adapter``) against the judge's mask, beside the centred disc, as
    Markdown."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Do the toy world's attention maps show where? (DAAM's mIoU)")
    parser.add_argument("--scenes", type=int, default=24, help="how many held-out scenes (24: each combination once)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the presets')")
    parser.add_argument("--grid", default=None, metavar="PNG",
                        help="save the first six captions' pictures as a grid: on toy, then on toy-fine, each output "
                             "beside itself lit where the word maps are above τ")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from ..engine.pipeline import ImagePromptPipeline

    extra = {} if args.steps is None else {"steps": args.steps}
    scenes = held_out_scenes(args.scenes)
    start = time.perf_counter()
    words = word_map_localisation(ImagePromptPipeline.from_preset("toy"), scenes, **extra)
    adapter = adapter_map_localisation(ImagePromptPipeline.from_preset("toy-ip-adapter"), scenes, **extra)
    fine = word_map_localisation(ImagePromptPipeline.from_preset("toy-fine"), scenes, label=FINE_LABEL, **extra)
    print(localisation_table([words, adapter, fine]))
    skipped = words.skipped + adapter.skipped + fine.skipped
    print(f"\n({3 * len(scenes)} pictures in {time.perf_counter() - start:.0f} s; {skipped} with no shape to compare "
          "left out)")
    if args.grid:
        from .measure import grid

        rows = lit_rows([words, fine])
        grid(rows, scale=2).quantize(256, method=Image.Quantize.MEDIANCUT).save(args.grid, optimize=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
