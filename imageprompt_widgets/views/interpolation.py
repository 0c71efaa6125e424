"""The embedding-space walk: images generated along a slerp between two CLIP embeddings, one seed for all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import FigureView, new_figure, show_image


@dataclass
class InterpolationView(FigureView):
    """Images generated along a slerp between two CLIP embeddings, one seed for all."""

    weights: list[float]
    embeds: torch.Tensor  # [N, D], the interpolated image embeddings used
    images: list[Any]
    labels: tuple[str, str] = ("start", "end")

    def describe(self) -> str:
        return (f"{len(self.images)} images along a slerp from {self.labels[0]} to {self.labels[1]}, "
                "t = " + ", ".join(f"{w:.2f}" for w in self.weights) + ".")

    def figure(self) -> Any:
        count = max(len(self.images), 1)
        figure = new_figure(1.9 * count + 0.2, 2.5)
        axes = figure.subplots(1, count, squeeze=False)[0]
        for ax, image, weight in zip(axes, self.images, self.weights):
            show_image(ax, image, f"t = {weight:.2f}")
        for ax in axes[len(self.images):]:
            ax.set_axis_off()
        figure.suptitle(f"slerp from {self.labels[0]} (t = 0) to {self.labels[1]} (t = 1), one seed", fontsize=10)
        return figure


def interpolation_view(walk: Any) -> InterpolationView:
    """The strip of an :class:`~imageprompt_widgets.engine.results.Interpolation` (``pipe.interpolate(...)``)."""
    return InterpolationView(list(walk.weights[: len(walk.images)]), walk.embeds, walk.images, walk.labels)
