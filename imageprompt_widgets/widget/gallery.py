"""The live output grid (one tile per requested image) and the bounded history of every run.

Both only set traits (``Image.value``, ``children``), so they can be updated from a worker thread.
"""

from __future__ import annotations

import html
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from PIL import Image

from ..preview import encode_jpeg, encode_png, thumbnail

TILE_PX = 192
THUMB_PX = 112
LARGE_PX = 512


def close_tree(widget: widgets.Widget) -> None:
    """Close a widget and everything inside it, layout and style included: the kernel keeps every widget
    (and the image bytes it holds) until it is closed."""
    for child in getattr(widget, "children", ()):
        close_tree(child)
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if isinstance(part, widgets.Widget):
            part.close()
    widget.close()


class OutputGrid(widgets.HBox):
    """One tile per image of the current run: x0 previews while denoising, then the final images."""

    def __init__(self, tile_px: int = TILE_PX, **kwargs: Any) -> None:
        self.tile_px = tile_px
        self.tiles: list[widgets.Image] = []
        self.placeholder = widgets.HTML("<i>Your images appear here.</i>")
        super().__init__(
            children=[self.placeholder],
            layout=widgets.Layout(flex_flow="row wrap", min_height=f"{tile_px}px"),
            **kwargs,
        )

    def begin(self, count: int) -> None:
        """Empty tiles for a run of ``count`` images (the previous run's tiles are reused or closed)."""
        size = f"{self.tile_px}px"
        for tile in self.tiles[count:]:
            close_tree(tile)
        self.tiles = self.tiles[:count] + [
            widgets.Image(format="jpeg", layout=widgets.Layout(width=size, height=size, margin="2px", object_fit="contain"))
            for _ in range(count - len(self.tiles))
        ]
        for tile in self.tiles:
            tile.value = b""
        self.children = list(self.tiles)

    def show_previews(self, jpegs: Sequence[bytes]) -> None:
        for tile, data in zip(self.tiles, jpegs):
            tile.format = "jpeg"
            tile.value = data

    def show_final(self, images: Sequence[Image.Image]) -> None:
        for tile, image in zip(self.tiles, images):
            tile.format = "png"
            tile.value = encode_png(thumbnail(image, LARGE_PX))

    @property
    def filled(self) -> int:
        """How many tiles show something (a preview or a final image)."""
        return sum(1 for tile in self.tiles if tile.value)


@dataclass(eq=False)
class HistoryItem:
    """One generated image with everything needed to show, save or redo it."""

    image: Image.Image
    recipe: dict[str, Any]
    index: int  # its place in the run's batch (the seed alone does not say which image of a batch)
    inputs: list[Image.Image]
    weights: list[float]
    negatives: list[Image.Image]
    thumb: bytes = field(repr=False, default=b"")

    @property
    def nbytes(self) -> int:
        """Memory it keeps alive, inputs included (a run's items share them: counted per item, pessimistic)."""
        pixels = sum(im.width * im.height for im in [self.image, *self.inputs, *self.negatives])
        return 3 * pixels + len(self.thumb)

    @property
    def seed(self) -> int:
        return int(self.recipe.get("settings", {}).get("seed", 0))


class History(widgets.VBox):
    """A scrollable strip of every run's images (newest first), bounded in count and in memory.

    Clicking a tile's button shows it large with its recipe and three actions: save (PNG with the
    recipe in its metadata), use as input, re-run. The actions call back into the panel.
    """

    def __init__(
        self,
        *,
        max_items: int = 48,
        max_bytes: int = 256 * 2**20,
        save_dir: str | Path = "imageprompt-outputs",
        on_use: Callable[[HistoryItem], None] | None = None,
        on_rerun: Callable[[HistoryItem], None] | None = None,
        on_saved: Callable[[Path], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("history needs room for at least one image (max_items and max_bytes >= 1).")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.save_dir = Path(save_dir)
        self.on_use, self.on_rerun, self.on_saved = on_use, on_rerun, on_saved
        self.items: deque[HistoryItem] = deque()
        self._tiles: dict[int, widgets.Widget] = {}
        self.selected: HistoryItem | None = None
        self.strip = widgets.HBox(layout=widgets.Layout(overflow="auto", flex_flow="row", width="100%"))
        self.empty = widgets.HTML("<i>Every run's images stay here; click one to open it.</i>")
        self.large = widgets.Image(format="png", layout=widgets.Layout(max_width=f"{LARGE_PX}px"))
        self.recipe_text = widgets.HTML()
        self.save_button = widgets.Button(description="Save PNG", icon="download")
        self.use_button = widgets.Button(description="Use as input", icon="arrow-up")
        self.rerun_button = widgets.Button(description="Re-run", icon="repeat")
        self.save_button.on_click(lambda _: self.save_selected())
        self.use_button.on_click(lambda _: self._act(self.on_use))
        self.rerun_button.on_click(lambda _: self._act(self.on_rerun))
        self.detail = widgets.VBox(
            [self.large, self.recipe_text, widgets.HBox([self.save_button, self.use_button, self.rerun_button])],
            layout=widgets.Layout(display="none"),
        )
        super().__init__(children=[self.empty, self.strip, self.detail], **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    def add_run(self, images: Sequence[Image.Image], recipe: dict[str, Any], inputs: list[Image.Image],
                weights: list[float], negatives: list[Image.Image]) -> list[HistoryItem]:
        """Add a finished run's images (newest first), then drop the oldest beyond the bounds."""
        added, evicted = [], []
        for index, image in enumerate(images):
            item = HistoryItem(image, recipe, index, inputs, list(weights), negatives)
            item.thumb = encode_jpeg(thumbnail(image, THUMB_PX), quality=80)
            self.items.appendleft(item)
            self._tiles[id(item)] = self._tile(item)
            added.append(item)
        while len(self.items) > 1 and (len(self.items) > self.max_items or self.nbytes > self.max_bytes):
            dropped = self.items.pop()
            if dropped is self.selected:
                self.close_detail()
            evicted.append(self._tiles.pop(id(dropped)))
        self.empty.layout.display = "none" if self.items else None
        self.strip.children = [self._tiles[id(item)] for item in self.items]
        for tile in evicted:
            close_tree(tile)
        return added

    def _tile(self, item: HistoryItem) -> widgets.Widget:
        thumb = widgets.Image(value=item.thumb, format="jpeg", layout=widgets.Layout(width=f"{THUMB_PX}px"))
        button = widgets.Button(
            description=f"seed {item.seed} #{item.index}", tooltip="open", layout=widgets.Layout(width=f"{THUMB_PX}px")
        )
        button.on_click(lambda _: self.select(item))
        return widgets.VBox([thumb, button], layout=widgets.Layout(min_width=f"{THUMB_PX + 8}px", margin="2px"))

    def select(self, item: HistoryItem) -> None:
        """Show one image large, with its recipe."""
        self.selected = item
        self.large.value = encode_png(thumbnail(item.image, LARGE_PX))
        self.recipe_text.value = "<pre style='white-space:pre-wrap;font-size:11px'>{}</pre>".format(
            html.escape(json.dumps({**item.recipe, "index": item.index}, indent=1))
        )
        self.detail.layout.display = None

    def close_detail(self) -> None:
        """Hide the large view (not named ``close``: that would shadow ``Widget.close`` and leak the history)."""
        self.selected = None
        self.detail.layout.display = "none"

    def save_selected(self) -> Path | None:
        item = self.selected
        if item is None:
            return None
        from ..results import save_png

        path = save_png(item.image, self.save_dir, item.recipe, item.index)
        if self.on_saved is not None:
            self.on_saved(path)
        return path

    def _act(self, callback: Callable[[HistoryItem], None] | None) -> None:
        if self.selected is not None and callback is not None:
            callback(self.selected)
