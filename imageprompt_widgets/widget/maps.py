"""The Structure section's maps: what each ControlNet unit reads (its Canny edges or its depth map), labelled by
unit and kind, before a run (as the next run would feed them) and after it (what the run fed).

Only traits are set here, so a map computed on the controller's worker thread can be shown from there. A tile
without its picture yet is a grey box that says what it waits for: never an empty ``Image`` widget.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
from PIL import Image

from ..engine.preview import encode_png
from ..structure.controlnets import CONTROL_KINDS
from .gallery import _box_text, close_tree, picture

MAP_PX = 140


def map_caption(index: int, kind: str) -> str:
    """``ControlNet 2 · depth``: unit ``index`` (0 = the structure's own) and the map it reads."""
    return f"ControlNet {index + 1} · {CONTROL_KINDS[kind].map_name}"


def traced_map(tensor: Any) -> Image.Image:
    """A traced ``control_image*`` (``[1, 3, H, W]`` in 0..1, three equal channels) as the grayscale map."""
    gray = tensor[0, 0] if tensor.ndim == 4 else tensor
    return Image.fromarray((gray.float().clamp(0, 1) * 255).round().byte().cpu().numpy())


class MapTile(widgets.VBox):
    """One unit's map with its caption; a grey box saying what it waits for until the map exists."""

    def __init__(self, size: int = MAP_PX, **kwargs: Any) -> None:
        self.size = size
        self.image = picture(format="png", layout=widgets.Layout(width=f"{size}px", object_fit="contain"))
        self.placeholder = widgets.HTML()
        self.caption = widgets.HTML(layout=widgets.Layout(width=f"{size}px"))
        self.map: Image.Image | None = None
        super().__init__(children=[self.placeholder, self.image, self.caption],
                         layout=widgets.Layout(margin="2px 6px 2px 0"), **kwargs)

    def wait(self, text: str, caption: str) -> None:
        """No map (yet): the grey box says ``text``."""
        self.map = None
        self.image.value = b""
        self.placeholder.value = _box_text(text, self.size)
        self.placeholder.layout.display = None
        self._caption(caption)

    def show(self, image: Image.Image, caption: str) -> None:
        self.map = image
        self.image.value = encode_png(image)
        self.placeholder.layout.display = "none"
        self._caption(caption)

    @property
    def filled(self) -> bool:
        return bool(self.image.value)

    def _caption(self, text: str) -> None:
        self.caption.value = f"<small style='line-height:1.3;display:block'>{html.escape(text)}</small>"


class MapPreviews(widgets.VBox):
    """A note and one :class:`MapTile` per ControlNet unit, wrapping in the panel's column."""

    def __init__(self, tile_px: int = MAP_PX, **kwargs: Any) -> None:
        self.tile_px = tile_px
        self.tiles: list[MapTile] = []
        self.note = widgets.HTML()
        self.strip = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__(children=[self.note, self.strip], **kwargs)
        self.hide()

    def begin(self, count: int, note: str) -> list[MapTile]:
        """Show ``count`` tiles (reused where they exist) under ``note``."""
        for tile in self.tiles[count:]:
            close_tree(tile)
        self.tiles = self.tiles[:count] + [MapTile(self.tile_px) for _ in range(count - len(self.tiles))]
        self.strip.children = list(self.tiles)
        self.say(note)
        return self.tiles

    def say(self, note: str) -> None:
        self.note.value = f"<small style='line-height:1.3;display:block'>{html.escape(note)}</small>" if note else ""
        self.layout.display = None

    def hide(self) -> None:
        self.begin(0, "")
        self.layout.display = "none"
