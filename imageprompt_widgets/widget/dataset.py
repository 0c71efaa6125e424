"""The dataset picker: the dataset view's scatter, and a point list whose choice becomes the panel's input.

An ``ipywidgets.Image`` reports no click coordinates, so points are picked from a Dropdown ("3: cat.png",
numbered as on the scatter); the view's :meth:`~imageprompt_widgets.views.dataset.DatasetMap.pick` maps
data coordinates to the nearest image for code that has them (``picker.pick_at(x, y)``). Picking
redraws the scatter with the point framed, shows the image, and calls ``panel.set_images([image])``.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets

from ..images import load_image
from ..views.dataset import DatasetMap

PREVIEW_PX = 160


class DatasetPicker(widgets.VBox):
    """``DatasetPicker(view, images, panel=w)``: pick a point, and its image is ``w``'s input."""

    def __init__(self, view: DatasetMap, images: Sequence[Any], panel: Any = None, **kwargs: Any) -> None:
        if len(images) != len(view):
            raise ValueError(f"{len(images)} images for {len(view)} points: give one image per point.")
        self.view = view
        self.images = list(images)
        self.panel = panel
        self.picture = widgets.Image(value=view.to_png(), format="png", layout=widgets.Layout(max_width="640px"))
        self.points = widgets.Dropdown(
            description="point", options=[(f"{index}: {label}", index) for index, label in enumerate(view.labels)],
            value=None, layout=widgets.Layout(width="360px"),
        )
        self.preview = widgets.Image(format="png", layout=widgets.Layout(
            display="none", width=f"{PREVIEW_PX}px", height=f"{PREVIEW_PX}px", object_fit="contain"))
        self.status = widgets.HTML("Pick a point: its image becomes the panel's input.")
        self.points.observe(self._on_pick, names="value")
        super().__init__(children=[self.picture, widgets.HBox([self.points, self.status]), self.preview], **kwargs)

    @property
    def selected(self) -> int | None:
        return self.points.value

    def pick(self, index: int) -> None:
        """Pick point ``index``, as choosing it in the list does."""
        self.points.value = self.view.pick(index=index)

    def pick_at(self, x: float, y: float) -> int:
        """Pick the point nearest to ``(x, y)`` in the scatter's data coordinates; returns its index."""
        index = self.view.pick(x, y)
        self.pick(index)
        return index

    def _on_pick(self, change: dict[str, Any]) -> None:
        index = change["new"]
        if index is None:
            return
        self.view = self.view.select(index)
        self.picture.value = self.view.to_png()
        label = self.view.labels[index]
        try:
            image = load_image(self.images[index])
            if self.panel is not None:
                self.panel.set_images([self.images[index]])
        except ValueError as err:  # an image gone or damaged since it was embedded: say so, keep the rest
            self.status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            self.preview.layout.display = "none"
            return
        small = image.copy()
        small.thumbnail((PREVIEW_PX, PREVIEW_PX))
        buffer = io.BytesIO()
        small.save(buffer, format="PNG")
        self.preview.value = buffer.getvalue()
        self.preview.layout.display = None
        where = "the panel's input" if self.panel is not None else "picked (no panel attached)"
        self.status.value = f"{html.escape(label)} is {where}."
