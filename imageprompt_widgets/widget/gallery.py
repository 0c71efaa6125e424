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

from ..engine.preview import encode_png, thumbnail

#: Output tiles: big enough for a projector; a model's smaller pictures are enlarged to at least this, pixel
#: by pixel (nearest neighbour), so a 64 px toy picture stays sharp instead of a browser's blur.
TILE_PX = 256
THUMB_PX = 160
LARGE_PX = 512


def enlarged(image: Image.Image, at_least: int) -> Image.Image:
    """``image`` scaled up by a whole factor until its longer side is at least ``at_least`` (nearest neighbour:
    every model pixel a crisp square); a large enough picture is returned as it is."""
    factor = -(-at_least // max(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def shown(image: Image.Image, side: int) -> Image.Image:
    """The picture a tile shows: no larger than ``side`` (a smooth reduction), no smaller (crisp enlargement)."""
    return enlarged(thumbnail(image, side), side)


def recipe_line(recipe: dict[str, Any]) -> str:
    """``"toy · text · 20 steps · seed 0"``: what tells two history pictures apart at a glance."""
    settings = recipe.get("settings", {})
    model = (recipe.get("model") or {}).get("preset") or "model"
    method = recipe.get("method") or settings.get("mode", "")
    return f"{model} · {method} · {settings.get('steps', '?')} steps · seed {settings.get('seed', 0)}"


def close_tree(widget: widgets.Widget) -> None:
    """Close a widget and everything inside it, layout and style included: the kernel keeps every widget
    (and the image bytes it holds) until it is closed."""
    for child in getattr(widget, "children", ()):
        close_tree(child)
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if isinstance(part, widgets.Widget):
            part.close()
    widget.close()


def picture(**kwargs: Any) -> widgets.Image:
    """An ``Image`` widget that is hidden while it has no picture: an empty one shows the browser's
    broken-image icon."""
    image = widgets.Image(**kwargs)

    def follow(change: Any = None) -> None:
        image.layout.display = None if image.value else "none"

    image.observe(follow, names="value")
    follow()
    return image


def _box_text(text: str, size: int) -> str:
    return (f"<div style='width:{size}px;height:{size}px;display:flex;align-items:center;justify-content:center;"
            f"text-align:center;background:#f2f2f2;color:#666;font-size:12px;line-height:1.3;"
            f"border:1px dashed #ccc;box-sizing:border-box;padding:8px'>{html.escape(text)}</div>")


class Tile(widgets.VBox):
    """One output image: a grey box with a short text until a picture arrives, and a caption below it that
    marks what the picture is when it is not a finished image (a cancelled run's last preview)."""

    def __init__(self, size: int, **kwargs: Any) -> None:
        self.size = size
        self.image = picture(format="jpeg", layout=widgets.Layout(width=f"{size}px", height=f"{size}px",
                                                                  object_fit="contain"))
        self.placeholder = widgets.HTML()
        self.caption = widgets.HTML(layout=widgets.Layout(display="none", width=f"{size}px"))
        super().__init__(children=[self.placeholder, self.image, self.caption],
                         layout=widgets.Layout(margin="2px"), **kwargs)

    def set_big(self, big: bool) -> None:
        """Fill the column's width (the big view), or back to ``size`` pixels."""
        width = "100%" if big else f"{self.size}px"
        self.image.layout.width = width
        self.image.layout.height = "auto" if big else f"{self.size}px"
        self.caption.layout.width = width
        self.layout.width = "100%" if big else None

    def wait(self, text: str) -> None:
        """No picture: the grey box says ``text``."""
        self.image.value = b""
        self.placeholder.value = _box_text(text, self.size)
        self.placeholder.layout.display = None
        self.mark("")

    def show(self, data: bytes, format: str) -> None:
        self.image.format = format
        self.image.value = data
        self.placeholder.layout.display = "none"

    def mark(self, text: str) -> None:
        """A caption under the picture (``""`` removes it)."""
        self.caption.value = f"<small style='color:#b00020'>{html.escape(text)}</small>" if text else ""
        self.caption.layout.display = None if text else "none"

    @property
    def filled(self) -> bool:
        return bool(self.image.value)


class OutputGrid(widgets.HBox):
    """One tile per image of the current run: x0 previews while denoising, then the final images.
    Until a tile has a picture it shows a grey box saying what it waits for."""

    def __init__(self, tile_px: int = TILE_PX, **kwargs: Any) -> None:
        self.tile_px = tile_px
        self._big = False
        self._finals: list[Image.Image] = []  # the run's finished pictures, drawn again when the view changes
        self.cells: list[Tile] = []
        self.placeholder = widgets.HTML(_box_text("Your images appear here.", tile_px))
        super().__init__(
            children=[self.placeholder],
            layout=widgets.Layout(flex_flow="row wrap", min_height=f"{tile_px}px"),
            **kwargs,
        )

    @property
    def tiles(self) -> list[widgets.Image]:
        """The tiles' ``Image`` widgets (empty ones are hidden)."""
        return [cell.image for cell in self.cells]

    def begin(self, count: int, text: str = "Waiting for the first step…") -> None:
        """Empty tiles saying ``text`` for a run of ``count`` images (the previous run's are reused or closed)."""
        self._finals = []
        for cell in self.cells[count:]:
            close_tree(cell)
        self.cells = self.cells[:count] + [Tile(self.tile_px) for _ in range(count - len(self.cells))]
        for cell in self.cells:
            cell.wait(text)
            cell.set_big(self._big)
        self.children = list(self.cells)

    def say(self, text: str) -> None:
        """Change what the empty tiles wait for (``Loading the model…`` → ``Waiting for the first step…``)."""
        for cell in self.cells:
            if not cell.filled:
                cell.wait(text)

    def show_previews(self, jpegs: Sequence[bytes]) -> None:
        for cell, data in zip(self.cells, jpegs):
            cell.show(data, "jpeg")

    def show_final(self, images: Sequence[Image.Image]) -> None:
        self._finals = list(images)
        for cell, image in zip(self.cells, images):
            cell.show(encode_png(shown(image, LARGE_PX if self.big else self.tile_px)), "png")
            cell.mark("")

    @property
    def big(self) -> bool:
        return self._big

    def set_big(self, big: bool) -> None:
        """The big view: each tile fills the column's width (one per row); off: tiles of ``tile_px``."""
        self._big = big
        for cell in self.cells:
            cell.set_big(big)
        if self._finals and all(cell.filled for cell in self.cells):
            self.show_final(self._finals)  # drawn again at the new size: crisp, not stretched

    def stop(self, mark: str, empty: str) -> None:
        """The run ended without images: previews shown stay, captioned ``mark``; empty tiles say ``empty``."""
        for cell in self.cells:
            if cell.filled:
                cell.mark(mark)
            else:
                cell.wait(empty)

    @property
    def filled(self) -> int:
        """How many tiles show something (a preview or a final image)."""
        return sum(1 for cell in self.cells if cell.filled)


@dataclass(eq=False)
class HistoryItem:
    """One generated image with everything needed to show, save or redo it."""

    image: Image.Image
    recipe: dict[str, Any]
    index: int  # its place in the run's batch (the seed alone does not say which image of a batch)
    inputs: list[Image.Image]
    weights: list[float]
    negatives: list[Image.Image]
    trace: Any = field(repr=False, default=None)  # the run's Trace (shared by its items), for export
    thumb: bytes = field(repr=False, default=b"")

    @property
    def nbytes(self) -> int:
        """Memory it keeps alive, inputs and trace included (a run's items share them: counted per item,
        pessimistic)."""
        pixels = sum(im.width * im.height for im in [self.image, *self.inputs, *self.negatives])
        tensors = self.trace.tensors().values() if self.trace is not None else ()
        return 3 * pixels + len(self.thumb) + sum(t.numel() * t.element_size() for t in tensors)

    @property
    def seed(self) -> int:
        return int(self.recipe.get("settings", {}).get("seed", 0))


class History(widgets.VBox):
    """A scrollable strip of every run's images (newest first), bounded in count and in memory.

    Clicking a tile's button shows it large with its recipe and four actions: save (PNG with the recipe in
    its metadata), export the run's trace (safetensors), use as input, re-run. The actions call back into
    the panel.
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
        on_exported: Callable[[Path], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("history needs room for at least one image (max_items and max_bytes >= 1).")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.save_dir = Path(save_dir)
        self.on_use, self.on_rerun, self.on_saved, self.on_exported = on_use, on_rerun, on_saved, on_exported
        self.items: deque[HistoryItem] = deque()
        self._tiles: dict[int, widgets.Widget] = {}
        self.selected: HistoryItem | None = None
        self.strip = widgets.HBox(layout=widgets.Layout(overflow="auto", flex_flow="row", width="100%"))
        self.empty = widgets.HTML("<i>Every run's images stay here; click one to open it.</i>")
        self.large = picture(format="png", layout=widgets.Layout(max_width=f"{LARGE_PX}px"))
        self.recipe_text = widgets.HTML()
        self.recipe_fold = widgets.Accordion(children=[self.recipe_text], selected_index=None)
        self.recipe_fold.set_title(0, "recipe (every setting, as saved in the PNG)")
        self.save_button = widgets.Button(description="Save PNG", icon="download")
        self.export_button = widgets.Button(description="Export trace", icon="file")
        self.use_button = widgets.Button(description="Use as input", icon="arrow-up")
        self.rerun_button = widgets.Button(description="Re-run", icon="repeat")
        self.save_button.on_click(lambda _: self.save_selected())
        self.export_button.on_click(lambda _: self.export_selected())
        self.use_button.on_click(lambda _: self._act(self.on_use))
        self.rerun_button.on_click(lambda _: self._act(self.on_rerun))
        self.detail = widgets.VBox(
            [self.large,
             widgets.HBox([self.save_button, self.export_button, self.use_button, self.rerun_button],
                          layout=widgets.Layout(flex_flow="row wrap")),
             self.recipe_fold],
            layout=widgets.Layout(display="none"),
        )
        super().__init__(children=[self.empty, self.strip, self.detail], **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    def add_run(self, images: Sequence[Image.Image], recipe: dict[str, Any], inputs: list[Image.Image],
                weights: list[float], negatives: list[Image.Image], trace: Any = None) -> list[HistoryItem]:
        """Add a finished run's images before the older runs' (in batch order: #0, #1, …), then drop the
        oldest beyond the bounds."""
        added, evicted = [], []
        for index, image in enumerate(images):
            item = HistoryItem(image, recipe, index, inputs, list(weights), negatives, trace)
            item.thumb = encode_png(shown(image, THUMB_PX))  # PNG: crisp enlarged pixels
            self._tiles[id(item)] = self._tile(item)
            added.append(item)
        self.items.extendleft(reversed(added))
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
        thumb = widgets.Image(value=item.thumb, format="png", layout=widgets.Layout(width=f"{THUMB_PX}px"))
        batch = f" · #{item.index}" if item.index else ""  # which picture of a batch
        label = widgets.HTML(f"<div style='font-size:12px;line-height:1.25;width:{THUMB_PX}px;white-space:normal'>"
                             f"{html.escape(recipe_line(item.recipe) + batch)}</div>")
        button = widgets.Button(description="open", icon="search-plus", tooltip="show it large, with its recipe",
                                layout=widgets.Layout(width=f"{THUMB_PX}px"))
        button.on_click(lambda _: self.select(item))
        return widgets.VBox([thumb, button, label],
                            layout=widgets.Layout(min_width=f"{THUMB_PX + 8}px", margin="2px"))

    def select(self, item: HistoryItem) -> None:
        """Show one image large, with its recipe."""
        self.selected = item
        self.export_button.disabled = item.trace is None
        self.large.value = encode_png(shown(item.image, LARGE_PX))
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
        from ..engine.results import save_png

        path = save_png(item.image, self.save_dir, item.recipe, item.index)
        if self.on_saved is not None:
            self.on_saved(path)
        return path

    def export_selected(self) -> Path | None:
        """Write the selected image's run trace (every tensor, the recipe) as safetensors beside the PNGs."""
        item = self.selected
        if item is None or item.trace is None:
            return None
        path = self.save_dir / f"imageprompt-seed{item.seed}-{item.index}.safetensors"
        counter = 1
        while path.exists():
            path = self.save_dir / f"imageprompt-seed{item.seed}-{item.index}-{counter}.safetensors"
            counter += 1
        item.trace.save(path, {**item.recipe, "index": item.index})
        if self.on_exported is not None:
            self.on_exported(path)
        return path

    def _act(self, callback: Callable[[HistoryItem], None] | None) -> None:
        if self.selected is not None and callback is not None:
            callback(self.selected)
