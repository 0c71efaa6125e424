"""What CLIP saw, and where its embeddings lie relative to each other (cosine similarity in its space)."""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..faults import TextTowerUnavailable
from .base import FigureView, InspectError, new_figure, show_image

#: The crop each ``crop`` setting shows CLIP, in words (settings.CROPS).
CROP_WORDS = {
    "center_crop": "the centre square (CLIP's own crop: the sides are cut off)",
    "squash": "the whole picture squashed to a square",
    "pad": "the whole picture letterboxed on CLIP's mean colour",
}


def source_label(source: Any, index: int) -> str:
    """A short name for an input in legends and axes: its file name where it has one, else ``image N``."""
    from ..images import describe_source

    text = describe_source(source)
    if text[:1] not in "'\"":
        return f"image {index + 1}"
    try:
        text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        text = text.strip("'\"")
    if "://" in text:  # a URL: its file name
        from urllib.parse import urlsplit

        text = urlsplit(text).path or text
    return os.path.basename(text.rstrip("/")) or text


def source_labels(sources: Sequence[Any]) -> list[str]:
    """:func:`source_label` of every input."""
    return [source_label(source, index) for index, source in enumerate(sources)]


# ---------------------------------------------------------------------------------------------
# What CLIP saw


def clip_input_images(pixel_values: torch.Tensor, image_processor: Any) -> list[Any]:
    """Undo the processor's normalisation: the exact crop CLIP encoded, as RGB images."""
    from PIL import Image

    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise InspectError(f"pixel_values must be [N, 3, H, W], got shape {tuple(pixel_values.shape)}.")
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64).reshape(1, 3, 1, 1)
    rescale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    pixels = (pixel_values.detach().cpu().double() * std + mean) / rescale
    array = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(frame) for frame in array]


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """``(left, top, side, side)``: the part of a ``width`` x ``height`` picture CLIP's centre crop keeps
    (its shorter side, centred; CLIP resizes the shorter side, then crops the square)."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


@dataclass
class ClipInputView(FigureView):
    """The picture(s) CLIP actually encoded, beside the originals where given (the crop marked on them)."""

    seen: list[Any]
    originals: list[Any] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    crop: str = "center_crop"

    def describe(self) -> str:
        side = f"{self.seen[0].width}x{self.seen[0].height}" if self.seen else "no"
        return (f"The {side} pixels the vision tower encoded (normalisation undone): "
                f"{CROP_WORDS.get(self.crop, self.crop)}.")

    def figure(self) -> Any:
        from matplotlib.patches import Rectangle

        columns = 2 if self.originals else 1
        figure = new_figure(3.2 * columns, 3.0 * len(self.seen) + 0.3)
        axes = figure.subplots(len(self.seen), columns, squeeze=False)
        for row, seen in enumerate(self.seen):
            name = self.labels[row] if row < len(self.labels) else f"image {row + 1}"
            if row < len(self.originals):
                original = self.originals[row]
                show_image(axes[row, 0], original, f"{name}: original {original.width}x{original.height}")
                if self.crop == "center_crop":
                    left, top, side, _ = center_crop_box(original.width, original.height)
                    axes[row, 0].add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False,
                                                     edgecolor="#ffdd00", linewidth=2, linestyle="--"))
                    axes[row, 0].set_xlabel("dashed: the square CLIP keeps", fontsize=8)
            show_image(axes[row, -1], seen, f"what CLIP saw: {seen.width}x{seen.height} px ({self.crop})")
        return figure


def what_clip_saw(
    pixel_values: torch.Tensor, image_processor: Any, originals: Sequence[Any] | None = None,
    *, crop: str = "center_crop", labels: Sequence[str] | None = None,
) -> ClipInputView:
    """Beside each original, the square crop/squash/pad the vision tower really received (``crop``: the
    setting the pixels were made with; ``labels``: names for the inputs, default their file names)."""
    from ..images import load_images

    sources = list(originals) if originals else []
    return ClipInputView(
        seen=clip_input_images(pixel_values, image_processor),
        originals=load_images(sources) if sources else [],
        labels=list(labels) if labels is not None else source_labels(sources),
        crop=crop,
    )


@dataclass
class CropComparisonView(FigureView):
    """One picture, and what CLIP sees of it under each ``crop`` setting, side by side."""

    original: Any
    seen: dict[str, Any]  # crop name -> what CLIP saw

    def describe(self) -> str:
        return "; ".join(f"{crop}: {CROP_WORDS.get(crop, crop)}" for crop in self.seen) + "."

    def figure(self) -> Any:
        from matplotlib.patches import Rectangle

        width, height = self.original.width, self.original.height
        aspect = min(max(width / height, 0.5), 4.0)  # the original at its own shape, the crops square
        figure = new_figure(2.6 * (aspect + len(self.seen)), 3.0)
        axes = figure.subplots(1, 1 + len(self.seen), squeeze=False, width_ratios=[aspect] + [1] * len(self.seen))[0]
        show_image(axes[0], self.original, f"original {width}x{height}")
        left, top, side, _ = center_crop_box(width, height)
        axes[0].add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False, edgecolor="#ffdd00",
                                    linewidth=2, linestyle="--"))
        axes[0].set_xlabel("dashed: what center_crop keeps", fontsize=8)
        for ax, (crop, seen) in zip(axes[1:], self.seen.items()):
            show_image(ax, seen, f"crop={crop!r}: {seen.width}x{seen.height}")
        return figure


def crop_comparison(original: Any, pixel_values: Mapping[str, torch.Tensor], image_processor: Any) -> CropComparisonView:
    """``pixel_values`` maps each crop setting to ``pipe.encode_image(original, crop=...).pixel_values``."""
    from ..images import load_image

    return CropComparisonView(
        load_image(original),
        {crop: clip_input_images(values[:1], image_processor)[0] for crop, values in pixel_values.items()},
    )


# ---------------------------------------------------------------------------------------------
# Similarity


def cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, D] x [M, D] -> [N, M]`` cosine similarities (``b`` defaults to ``a``), in float32."""
    a = a.detach().float().cpu()
    b = a if b is None else b.detach().float().cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InspectError(f"cosine_similarity takes [N, D] and [M, D], got {tuple(a.shape)} and {tuple(b.shape)}.")
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


@dataclass
class SimilarityView(FigureView):
    """Cosine similarities: rows are the images, columns the images then the texts."""

    matrix: torch.Tensor
    row_labels: list[str]
    col_labels: list[str]
    note: str = ""

    def describe(self) -> str:
        return self.note

    def figure(self) -> Any:
        rows, cols = self.matrix.shape
        figure = new_figure(2.4 + 1.0 * cols, 1.9 + 0.7 * rows)
        ax = figure.add_subplot()
        shown = ax.imshow(self.matrix.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        for r in range(rows):
            for c in range(cols):
                value = float(self.matrix[r, c])
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if abs(value) > 0.6 else "black")
        ax.set_xticks(range(cols), self.col_labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(rows), self.row_labels, fontsize=8)
        ax.set_title("Cosine similarity in CLIP's projected space", fontsize=10)
        figure.colorbar(shown, ax=ax, label="cosine similarity", shrink=0.9)
        return figure


def similarity(
    image_embeds: torch.Tensor,
    pipeline: Any = None,
    texts: Sequence[str] = (),
    labels: Sequence[str] | None = None,
) -> SimilarityView:
    """Image-vs-image cosine similarities, plus image-vs-text where ``texts`` are given.

    Texts go through CLIP's text tower *with projection* (the space ``image_embeds`` live in, not SD's
    text encoder). Where the preset has none, the view keeps the image columns and says so in ``note``.
    ``labels`` name the images (:func:`source_labels` of the inputs gives their file names).
    """
    image_embeds = image_embeds.detach().float().cpu()
    labels = list(labels) if labels is not None else [f"image {i + 1}" for i in range(len(image_embeds))]
    if len(labels) != len(image_embeds):
        raise InspectError(f"{len(labels)} labels for {len(image_embeds)} images: give one label per image.")
    columns = [image_embeds]
    col_labels = list(labels)
    note = "Images compared in CLIP's projected image space."
    texts = [text for text in texts if text.strip()]
    if texts:
        if pipeline is None:
            raise InspectError("Comparing with text needs the pipeline (its preset names the CLIP text tower).")
        try:
            tower = pipeline.clip_text_tower()
        except TextTowerUnavailable as err:
            note = str(err)
        else:
            columns.append(tower.embed(texts))
            col_labels += [repr(text) for text in texts]
            note = f"Texts embedded with the {tower.source}."
    matrix = cosine_similarity(image_embeds, torch.cat(columns))
    return SimilarityView(matrix, labels, col_labels, note)
