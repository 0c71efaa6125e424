"""The input images: FileUpload values of ipywidgets 7.7 and 8, and the strip of thumbnails with a weight
slider and a remove button each.
"""

from __future__ import annotations

import datetime
import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import ipywidgets as widgets
from PIL import Image

from ..engine.preview import encode_jpeg, thumbnail
from ..images import ImageInputError, describe_source, load_image
from ..settings import setting_specs
from .controls import FloatSlider, set_help
from .gallery import close_tree

THUMB_PX = 128
#: A browser upload travels as one comm message, which Jupyter caps at 10 MiB: a larger one never reaches
#: the kernel, so the panel says it up front. Colab's uploads over about 1 MB arrive empty (see load_upload).
UPLOAD_HINT = (
    "<small style='line-height:1.3;display:block'>PNG, JPEG, WebP, GIF, BMP, TIFF. Files over 10 MB (about 1 MB on Colab) cannot pass through "
    "the browser: use <code>w.set_images('path/to/file')</code> instead.</small>"
)


@dataclass(frozen=True)
class UploadedFile:
    """One file of a FileUpload value, the same for ipywidgets 7.7 and 8."""

    name: str
    size: int  # what the browser declared; 0 when it did not say
    content: bytes


def uploaded_files(value: Any) -> list[UploadedFile]:
    """Normalise ``FileUpload.value``: a tuple of dicts (ipywidgets 8) or ``{name: {metadata, content}}`` (7.7)."""
    if isinstance(value, Mapping):
        entries = [{**(entry.get("metadata") or {}), "name": name, "content": entry.get("content")}
                   for name, entry in value.items()]
    else:
        entries = [dict(entry) for entry in value or ()]
    files = []
    for entry in entries:
        content = entry.get("content") or b""
        if not isinstance(content, (bytes, bytearray, memoryview)):
            content = b""  # not bytes (a page script's text or number): it arrived empty, and says so
        content = content.tobytes() if isinstance(content, memoryview) else bytes(content)
        files.append(UploadedFile(str(entry.get("name") or "upload"), _declared_size(entry.get("size")), content))
    return files


def caption_of(source: Any) -> str:
    """The caption under an input thumbnail, alike for every source: ``sunset.png`` from a path, a URL, an
    upload or a PIL image opened from a file; a short description (``numpy array of shape …``) otherwise."""
    if isinstance(source, Mapping):  # an upload entry of either ipywidgets version
        name = source.get("name") or (source.get("metadata") or {}).get("name")
        if name:
            return str(name)
    if isinstance(source, str) and "://" in source:
        parts = urlsplit(source)
        return parts.path.rstrip("/").rpartition("/")[2] or parts.netloc or source
    if isinstance(source, (str, os.PathLike)):
        text = os.fsdecode(source)
        return os.path.basename(text.rstrip("/\\")) or text
    filename = getattr(source, "filename", None)
    if isinstance(filename, str) and filename:
        return os.path.basename(filename)
    return describe_source(source)


def clear_upload(upload: widgets.FileUpload) -> None:
    """Forget the uploaded bytes (the images are decoded) so the same file can be uploaded again."""
    if "_counter" in upload.keys:  # ipywidgets 7.x: value is derived from data and metadata
        with upload.hold_trait_notifications():
            upload.metadata, upload.data = [], []
            upload.set_trait("value", {})
    else:
        upload.value = ()


def show_count(upload: widgets.FileUpload, names: Sequence[str]) -> None:
    """Make the button's own counter, "Upload (N)", count the images that are in, not the last pick.

    ipywidgets 8 counts the entries of ``value``: it gets one content-less entry per image. 7.x shows its
    ``_counter``, which the browser adds each pick to. The panel ignores these changes (no content).
    """
    if "_counter" in upload.keys:
        clear_upload(upload)
        upload._counter = len(names)
    else:
        now = datetime.datetime.now(datetime.timezone.utc)
        upload.value = tuple({"name": name, "type": "", "size": 0, "content": memoryview(b""), "last_modified": now}
                             for name in names)


#: A declared size beyond this is not a file a browser could send (1 TiB): treated as unknown.
_LARGEST_DECLARED_SIZE = 2**40


def _declared_size(value: Any) -> int:
    """The size the browser declared, in bytes; 0 (unknown) for anything that is not a sane whole number: the
    entry comes from the front end, which any page script can fill with text, lists or NaN."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if not (0 <= value <= _LARGEST_DECLARED_SIZE) or value != int(value):  # also NaN
        return 0
    return int(value)


def load_upload(file: UploadedFile) -> Image.Image:
    """Decode one uploaded file; an empty or cut-off upload gets a sentence that says what to do instead."""
    if not file.content or len(file.content) < file.size:
        declared = f" ({file.size / 2**20:.1f} MB)" if file.size else ""
        arrived = "arrived empty" if not file.content else f"arrived cut off ({len(file.content):,} of {file.size:,} bytes)"
        raise ImageInputError(
            f"{file.name!r}{declared} {arrived}: browser uploads are limited to about 1 MB on "
            f"Colab and 10 MB in Jupyter, so load it from disk with w.set_images({file.name!r}) instead."
        )
    return load_image(file.content, name=file.name)


def _weight_spec() -> Any:
    return next(spec for spec in setting_specs() if spec.name == "weights")


@dataclass(eq=False)
class InputImage:
    image: Image.Image
    name: str
    weight: widgets.FloatSlider
    tile: widgets.Box


class InputStrip(widgets.HBox):
    """Thumbnails of images, each with a remove button and (``weighted``) a weight slider whose range
    comes from the ``weights`` setting."""

    def __init__(self, weighted: bool = True, empty_text: str = "No input image yet.", **kwargs: Any) -> None:
        self.items: list[InputImage] = []
        self.weighted = weighted
        self._weights_shown = True
        self.on_change: Any = None  # called after images were added or removed
        self.on_weight: Any = None  # called after a weight slider moved
        self.on_refused: Any = None  # gets the sentence when the browser sends a weight out of range
        self.empty = widgets.HTML(f"<i>{empty_text}</i>")
        super().__init__(children=[self.empty], layout=widgets.Layout(flex_flow="row wrap"), **kwargs)

    @property
    def images(self) -> list[Image.Image]:
        return [item.image for item in self.items]

    @property
    def weights(self) -> list[float]:
        return [float(item.weight.value) for item in self.items]

    def add(self, images: Sequence[Image.Image], names: Sequence[str], weights: Sequence[float] | None = None) -> None:
        spec = _weight_spec()
        for position, (image, name) in enumerate(zip(images, names)):
            weight = FloatSlider(
                value=1.0 if weights is None else weights[position], min=spec.min, max=spec.max, step=spec.step,
                description="weight", continuous_update=False,
                style={"description_width": "44px"}, layout=widgets.Layout(width=f"{THUMB_PX + 140}px"),
            )
            remove = widgets.Button(description="remove", icon="times", layout=widgets.Layout(width=f"{THUMB_PX}px"))
            thumb = widgets.Image(value=encode_jpeg(thumbnail(image, THUMB_PX), quality=80), format="jpeg",
                                  layout=widgets.Layout(width=f"{THUMB_PX}px"))
            label = widgets.HTML(f"<small>{_escape(name)}</small>")
            parts = [thumb, label, weight, remove] if self.weighted else [thumb, label, remove]
            item = InputImage(image, name, weight, widgets.VBox(parts))
            weight.layout.display = None if self._weights_shown else "none"
            weight.on_refused = self.on_refused
            weight.observe(lambda _: self.on_weight() if self.on_weight is not None else None, names="value")
            set_help(weight, spec.help)
            remove.on_click(lambda _, item=item: self.remove(item))
            self.items.append(item)
        self._render()

    def show_weights(self, shown: bool) -> None:
        """Show the weight sliders only while the chosen method reads ``weights``."""
        self._weights_shown = shown
        for item in self.items:
            item.weight.layout.display = None if shown else "none"

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.items]

    def remove(self, item: InputImage) -> None:
        self.items = [other for other in self.items if other is not item]
        self._render()
        close_tree(item.tile)

    def clear(self) -> None:
        removed, self.items = self.items, []
        self._render()
        for item in removed:
            close_tree(item.tile)

    def _render(self) -> None:
        self.children = [item.tile for item in self.items] or [self.empty]
        if self.on_change is not None:
            self.on_change()


def _escape(text: str) -> str:
    return html.escape(text if len(text) <= 24 else text[:23] + "…")
