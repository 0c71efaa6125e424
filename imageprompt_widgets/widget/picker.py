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
    choosing one costs and what its pictures are: real models first (``"sd14 · about 7.2 GB · not downloaded"``),
    then the toy world's (``"toy · toy world · shipped"``), then random weights (``"tiny · random weights,
    noise · built"``). Short enough for the closed dropdown in the panel's column: the tooltip says the rest.

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
                       "time) on the next Generate. Real models download; the toy world (trained on coloured "
                       "shapes) ships with the package; random-weight models draw noise, for tests (setting: model)")

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
        """Real models first, then the toy world's, then the random-weight ones (each says so)."""
        lines = [(GROUP_ORDER.index(group_of(preset)), index, picker_label(preset), name)
                 for index, (name, preset) in enumerate(self.presets.items())]
        return [(label, name) for _, _, label, name in sorted(lines)]


#: The picker's three groups: real Stable Diffusion (downloads), the toy world (trained on coloured shapes,
#: shipped), random weights (built here: noise, for tests and CI).
GROUP_ORDER = ("real", "toy", "random")
RANDOM_WORDS = "random weights, noise"
TOY_WORDS = "toy world"


def group_of(preset: Preset) -> str:
    """``"random"`` for presets built here with random weights, ``"toy"`` for the toy world's shipped weights,
    ``"real"`` for everything else (the Hub's models, a folder of one's own)."""
    if preset.offline_builder:
        return "random"
    return "toy" if preset_availability(preset).state == "shipped" else "real"


def picker_label(preset: Preset) -> str:
    """``"sd14 · about 7.2 GB · not downloaded"``, ``"toy · toy world · shipped"``, ``"tiny · random weights,
    noise · built"``."""
    found = preset_availability(preset)
    group = group_of(preset)
    if group == "real":
        return " · ".join(part for part in (preset.name, found.download, found.status) if part)
    words = RANDOM_WORDS if group == "random" else TOY_WORDS
    state = "shipped" if found.state == "shipped" else found.status  # "built", "builds in seconds"
    return f"{preset.name} · {words} · {state}"
