"""A captioned grid of pictures: methods side by side, inputs beside outputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import FigureView, InspectError, new_figure, show_image


@dataclass
class ImageGridView(FigureView):
    """Pictures with a caption under each, ``columns`` per row; ``None`` leaves a captioned grey gap."""

    images: list[Any]  # PIL images or None
    captions: list[str]
    columns: int = 4
    title: str = ""

    def describe(self) -> str:
        return f"{self.title + ': ' if self.title else ''}" + "; ".join(c.replace("\n", " ") for c in self.captions)

    def figure(self) -> Any:
        columns = max(1, min(self.columns, len(self.images)))
        rows = max(1, math.ceil(len(self.images) / columns))
        lines = max((caption.count("\n") + 1 for caption in self.captions), default=1)
        figure = new_figure(2.3 * columns, (2.1 + 0.17 * lines) * rows + (0.3 if self.title else 0))
        axes = figure.subplots(rows, columns, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, image, caption in zip(axes.flat, self.images, self.captions):
            if image is None:
                ax.set_facecolor("#dddddd")
                ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes, color="#555555")
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                show_image(ax, image)
                ax.set_axis_on()
            ax.set_xlabel(caption, fontsize=8)
        if self.title:
            figure.suptitle(self.title, fontsize=10)
        return figure


def image_grid(images: Sequence[Any], captions: Sequence[str], columns: int = 4, title: str = "") -> ImageGridView:
    """A grid of ``images`` (PIL images, or ``None`` for a gap) with ``captions`` under them."""
    if len(images) != len(captions):
        raise InspectError(f"{len(images)} images but {len(captions)} captions: give one caption per image.")
    return ImageGridView(list(images), list(captions), columns, title)
