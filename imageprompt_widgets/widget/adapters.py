"""Several IP-Adapters at once (``ip-adapter-plus-and-face``): a strip of images and a scale for each adapter.

Shown only for a model with more than one adapter and the ``ip_adapter`` method; with one adapter the panel
stays as it is. An adapter with no image of its own sees the input images (the engine's default). The scale
sliders are a view of the ``adapter_scales`` setting (its range from its spec): moving one writes every
adapter's scale into that setting's control; while that control is empty each adapter uses ``scale`` and the
sliders show it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
from PIL import Image

from ..images import ImageInputError
from ..methods.ip_adapter import parse_adapter
from ..settings import SettingsError, SettingSpec, parse_floats
from .controls import _RefusesOutOfRange, control_for, floats_text, set_help
from .gallery import close_tree
from .inputs import InputStrip, load_upload, show_count, uploaded_files

NO_IMAGE_TEXT = "No image of its own: it sees the input images."

Sentence = Callable[[str], None]


def adapter_label(spec: str) -> str:
    """A short name for an adapter spec: ``ip-adapter-plus_sd15`` for
    ``h94/IP-Adapter:models:ip-adapter-plus_sd15.safetensors``, the file's stem for a path
    (``pipe.load_ip_adapter``), the name itself for an offline twin."""
    try:
        folder, _, weight_name = parse_adapter(spec)
    except ValueError:
        return os.path.splitext(os.path.basename(spec.rstrip("/\\")))[0] or spec
    return os.path.splitext(weight_name)[0] or os.path.basename(folder.rstrip("/\\")) or spec


class AdapterSlot(widgets.VBox):
    """One adapter: its name, an upload button, its strip of images and its scale."""

    def __init__(self, number: int, name: str, scale_spec: SettingSpec, on_change: Callable[[], None],
                 on_scale: Callable[[], None], on_refused: Sentence | None) -> None:
        self.name = name
        self._mirroring = False
        self._on_change, self._on_refused = on_change, on_refused
        self.title = widgets.HTML(f"<b>Adapter {number}</b> · {adapter_label(name)}")
        self.upload = widgets.FileUpload(accept="image/*", multiple=True, description=f"Adapter {number}")
        set_help(self.upload, f"images for the IP-Adapter {adapter_label(name)} alone (default: the input images)")
        self.upload.observe(self._on_upload, names="value")
        self.strip = InputStrip(weighted=False, empty_text=NO_IMAGE_TEXT)
        self.strip.on_change = self._images_changed
        self.strip.on_refused = on_refused
        self.scale = control_for(scale_spec)
        self.scale.description = "scale"
        set_help(self.scale, f"how strongly {adapter_label(name)} steers (its entry of adapter_scales)")
        if isinstance(self.scale, _RefusesOutOfRange):
            self.scale.on_refused = on_refused
        self.scale.observe(lambda _: on_scale(), names="value")
        super().__init__(children=[self.title, widgets.HBox([self.upload, self.scale],
                                                            layout=widgets.Layout(flex_flow="row wrap")),
                                   self.strip],
                         layout=widgets.Layout(border="1px solid #e0e0e0", padding="2px 4px", margin="4px 0"))

    @property
    def images(self) -> list[Image.Image]:
        return self.strip.images

    def set_images(self, images: Sequence[Image.Image], names: Sequence[str] | None = None) -> None:
        self.strip.clear()
        self.strip.add(list(images), list(names or [f"image {i + 1}" for i in range(len(images))]))

    def _on_upload(self, change: dict[str, Any]) -> None:
        if self._mirroring:
            return
        files = uploaded_files(change["new"])
        if not files:
            return
        images, names = [], []
        for file in files:
            try:
                images.append(load_upload(file))
                names.append(file.name)
            except ImageInputError as err:
                if self._on_refused is not None:
                    self._on_refused(str(err))
        self.strip.add(images, names)
        self._images_changed()

    def _images_changed(self) -> None:
        self._mirroring = True
        try:
            show_count(self.upload, self.strip.names)
        finally:
            self._mirroring = False
        self._on_change()


class AdapterSlots(widgets.VBox):
    """A slot per IP-Adapter of the chosen model, shown while it has several and the method is ``ip_adapter``.

    ``scales`` is the ``adapter_scales`` setting's control (comma-separated text), ``scale`` the ``scale``
    setting's: the sliders follow them and write the first.
    """

    def __init__(self, scales_control: widgets.Widget, scale_control: widgets.Widget, scales_spec: SettingSpec,
                 **kwargs: Any) -> None:
        self.scales_control, self.scale_control = scales_control, scale_control
        self.scale_spec = dataclasses.replace(scales_spec, kind="float", default=scale_control.value)
        self.slots: list[AdapterSlot] = []
        self.on_refused: Sentence | None = None
        self.on_change: Callable[[], None] | None = None
        self.wanted = False  # the chosen method reads the adapters' images
        self._syncing = False
        self.intro = widgets.HTML(
            "<small style='line-height:1.3;display:block'>This model has several IP-Adapters: give each its own "
            "images and scale (an adapter without images sees the input images above; its scale replaces "
            "<i>scale</i>).</small>"
        )
        super().__init__(children=[self.intro], **kwargs)
        scales_control.observe(lambda _: self._follow_setting(), names="value")
        scale_control.observe(lambda _: self._follow_setting(), names="value")
        self._follow()

    @property
    def shown(self) -> bool:
        return self.wanted and len(self.slots) > 1

    def set_adapters(self, names: Sequence[str]) -> None:
        """One slot per adapter of the chosen model. The old model's images are dropped, and so are its
        ``adapter_scales`` where they do not count the new model's adapters (the run would refuse them)."""
        try:
            stale = len(parse_floats(self.scales_control.value)) not in (0, len(names))
        except SettingsError:
            stale = False  # the run says what is wrong with it
        if stale:
            self._syncing = True
            try:
                self.scales_control.value = ""
            finally:
                self._syncing = False
        for slot in self.slots:
            close_tree(slot)
        self.slots = [AdapterSlot(number, name, self.scale_spec, on_change=self._changed, on_scale=self._write,
                                  on_refused=self._refused)
                      for number, name in enumerate(names, start=1)] if len(names) > 1 else []
        self.children = [self.intro, *self.slots]
        self._follow_setting()
        self._follow()

    def show_for(self, wanted: bool) -> None:
        self.wanted = wanted
        self._follow()

    def adapter_images(self, inputs: Sequence[Any]) -> list[list[Any]] | None:
        """What a run's ``adapter_images`` is: ``None`` when no adapter has images of its own (each sees the
        inputs), else one list per adapter, the inputs where it has none."""
        if not self.shown or not any(slot.images for slot in self.slots):
            return None
        return [slot.images or list(inputs) for slot in self.slots]

    # -- scales ------------------------------------------------------------------------------------------

    def _write(self) -> None:
        """A slider moved: every adapter's scale into ``adapter_scales``."""
        if self._syncing:
            return
        self._syncing = True
        try:
            self.scales_control.value = floats_text([slot.scale.value for slot in self.slots])
        finally:
            self._syncing = False

    def _follow_setting(self) -> None:
        """The sliders show ``adapter_scales`` where it gives one per adapter, else ``scale`` for each."""
        if self._syncing or not self.slots:
            return
        try:
            scales = parse_floats(self.scales_control.value, "adapter_scales")
        except SettingsError:
            return  # the run says what is wrong with it
        if not scales:
            scales = (self.scale_control.value,) * len(self.slots)
        if len(scales) != len(self.slots):
            return
        self._syncing = True
        try:
            for slot, scale in zip(self.slots, scales):
                slot.scale.value = scale
        finally:
            self._syncing = False

    def _follow(self) -> None:
        self.layout.display = None if self.shown else "none"

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _refused(self, sentence: str) -> None:
        if self.on_refused is not None:
            self.on_refused(sentence)
