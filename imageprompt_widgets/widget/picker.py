"""The model picker: every preset, with its download size and whether it is on this machine already."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ipywidgets as widgets

from ..engine.controller import preset_availability
from ..presets import PRESETS, Preset
from .controls import set_help


class ModelPicker(widgets.Dropdown):
    """A ``Dropdown`` whose values are preset names (``tiny``, ``sd14``, …) and whose labels say what
    choosing one costs: ``"sd14 · about 7.2 GB · not downloaded"``, ``"tiny · offline · built"``.

    A model that is no preset (a local folder, a ``Preset`` of one's own) is listed too, under its name.
    ``relabelling`` is true while :meth:`refresh` rewrites the labels (observers ignore those changes).
    """

    def __init__(self, current: Preset | None = None, **kwargs: Any) -> None:
        self.presets: dict[str, Preset] = dict(PRESETS)
        if current is not None and current.name not in self.presets:
            self.presets[current.name] = current
        self.relabelling = False
        super().__init__(options=self._options(), value=current.name if current is not None else None,
                         description="model", style={"description_width": "100px"}, **kwargs)
        set_help(self, "the Stable Diffusion model and image encoder; weights load (and download, the first "
                       "time) on the next Generate")

    def preset(self, name: str | None = None) -> Preset | None:
        """The preset chosen (or named)."""
        name = self.value if name is None else name
        return self.presets.get(name) if name is not None else None

    def refresh(self) -> None:
        """Look at the disk again ("downloaded" after a first load); the chosen model stays chosen."""
        options = self._options()
        if tuple(options) == tuple(self.options):
            return
        with self.relabel():
            value = self.value
            self.options = options
            self.value = value

    @contextlib.contextmanager
    def relabel(self) -> Iterator[None]:
        self.relabelling = True
        try:
            yield
        finally:
            self.relabelling = False

    def _options(self) -> list[tuple[str, str]]:
        return [(preset_availability(preset).label(), name) for name, preset in self.presets.items()]
