"""More ControlNet units in the Structure section: one row per unit beside the structure's own, edited as the
``control_units`` setting (its control, registered for settings of kind ``"units"``).

The structure's own unit is the flat settings above the rows (``structure``, ``canny_low``, ``control_scale``,
…). Each row is one more :class:`~imageprompt_widgets.settings.ControlUnit`: its kind, the settings that kind
reads (``UNIT_SETTINGS``; every control built from the unit's specs, so no range is written twice), an optional
picture of its own (default: the structure image) and a remove button. The editor's ``value`` is the setting's
JSON text, so recipes, history re-runs and ``SettingsControls.apply`` reach the rows like any other control.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import traitlets
from PIL import Image

from ..images import ImageInputError
from ..settings import (
    CONTROLNET_STRUCTURES,
    MAX_CONTROL_UNITS,
    UNIT_SETTINGS,
    ControlUnit,
    GenerationSettings,
    SettingsError,
    SettingSpec,
    parse_units,
    unit_specs,
    units_text,
)
from ..structure.controlnets import CONTROL_KINDS
from .controls import _RefusesOutOfRange, control_factory, control_for, set_help
from .gallery import close_tree
from .inputs import InputStrip, load_upload, show_count, uploaded_files

NO_PICTURE_TEXT = "No picture of its own: it reads the structure image."

Sentence = Callable[[str], None]


def unit_title(number: int, kind: str) -> str:
    """``ControlNet 2 · depth``: what a unit is called in the panel (1 is the structure's own)."""
    return f"ControlNet {number} · {CONTROL_KINDS[kind].map_name}"


class UnitRow(widgets.VBox):
    """One more ControlNet: a title with a remove button, the unit's controls (only those its kind reads) and an
    optional picture of its own."""

    def __init__(self, number: int, unit: ControlUnit, on_change: Callable[[], None],
                 on_remove: Callable[[UnitRow], None], on_pictures: Callable[[], None],
                 on_refused: Sentence | None) -> None:
        self.number = number
        self._quiet = False
        self._mirroring = False
        self._on_change, self._on_pictures, self._on_refused = on_change, on_pictures, on_refused
        self.controls: dict[str, widgets.Widget] = {spec.name: control_for(spec) for spec in unit_specs()}
        for control in self.controls.values():
            control.observe(lambda _: self._changed(), names="value")
            if isinstance(control, _RefusesOutOfRange):
                control.on_refused = on_refused
        self.title = widgets.HTML()
        self.remove_button = widgets.Button(description="remove ControlNet", icon="times",
                                            layout=widgets.Layout(width="auto"))
        self.remove_button.on_click(lambda _: on_remove(self))
        self.upload = widgets.FileUpload(accept="image/*", multiple=False)
        self.upload.observe(self._on_upload, names="value")
        self.picture = InputStrip(weighted=False, empty_text=NO_PICTURE_TEXT)
        self.picture.on_change = self._pictures_changed
        head = widgets.HBox([self.title, self.remove_button],
                            layout=widgets.Layout(justify_content="space-between", align_items="center"))
        super().__init__(children=[head, *self.controls.values(), self.upload, self.picture],
                         layout=widgets.Layout(border="1px solid #e0e0e0", padding="2px 4px", margin="4px 0"))
        self.set_unit(unit)
        self.renumber(number)

    @property
    def kind(self) -> str:
        return self.controls["kind"].value

    def values(self) -> dict[str, Any]:
        """The unit as the setting keeps it: every field, in the unit's order."""
        return {name: control.value for name, control in self.controls.items()}

    def set_unit(self, unit: ControlUnit) -> None:
        self._quiet = True
        try:
            for name, value in unit.to_dict().items():
                self.controls[name].value = value
        finally:
            self._quiet = False
        self._follow_kind()

    def renumber(self, number: int) -> None:
        self.number = number
        self.upload.description = f"Structure {number}"
        set_help(self.upload, f"a picture of its own for ControlNet {number} (default: the structure image)")
        set_help(self.remove_button, f"remove ControlNet {number}")
        self._follow_kind()

    @property
    def image(self) -> Image.Image | None:
        """The unit's own picture, or ``None`` (it reads the structure image)."""
        return self.picture.images[0] if self.picture.items else None

    def set_picture(self, image: Image.Image | None, name: str = "picture") -> None:
        """Give the unit a picture of its own (``None``: the structure image again)."""
        self._quiet = True
        try:
            self.picture.clear()
            if image is not None:
                self.picture.add([image], [name])
        finally:
            self._quiet = False
        self._pictures_changed()

    def _follow_kind(self) -> None:
        reads = UNIT_SETTINGS[self.kind]
        for name, control in self.controls.items():
            control.layout.display = None if name in reads else "none"
        self.title.value = f"<b>{unit_title(self.number, self.kind)}</b>"

    def _changed(self) -> None:
        if self._quiet:
            return
        self._follow_kind()
        self._on_change()

    def _on_upload(self, change: dict[str, Any]) -> None:
        if self._mirroring:
            return
        files = uploaded_files(change["new"])
        if not files:
            return
        try:
            image = load_upload(files[0])
        except ImageInputError as err:
            self._show_count([])
            if self._on_refused is not None:
                self._on_refused(str(err))
            return
        self.set_picture(image, files[0].name)

    def _pictures_changed(self) -> None:
        if self._quiet:
            return
        self._show_count(self.picture.names)
        self._on_pictures()

    def _show_count(self, names: list[str]) -> None:
        self._mirroring = True
        try:
            show_count(self.upload, names)
        finally:
            self._mirroring = False


class ControlUnitsEditor(widgets.VBox):
    """The ``control_units`` setting as rows of ControlNet units, with an add button (up to ``MAX_CONTROL_UNITS``
    with the structure's own).

    ``value`` is the setting's JSON text; setting it (a recipe, a history item) updates the rows in place, so each
    row keeps its picture. While the chosen structure is no ControlNet (``active`` false) the rows wait, hidden,
    and ``value`` is empty: a run reads no units then. ``on_refused`` gets a sentence about a unit that does not
    fit (start after end) or an upload that failed; ``on_pictures`` is called when a unit's picture changes.
    """

    value = traitlets.Unicode("")
    description = traitlets.Unicode("")

    def __init__(self, spec: SettingSpec, **kwargs: Any) -> None:
        self.spec = spec
        self.rows: list[UnitRow] = []
        self.active = True
        self.primary_kind = CONTROLNET_STRUCTURES[0]  # the structure's own unit's kind (the panel keeps it)
        self.on_refused: Sentence | None = None
        self.on_pictures: Callable[[], None] | None = None
        self._writing = False
        self.intro = widgets.HTML()
        self.add_button = widgets.Button(description="add a ControlNet", icon="plus",
                                         layout=widgets.Layout(width="auto"))
        set_help(self.add_button, spec.help)  # the setting's help, where 7.7 and 8 both show it
        self.add_button.on_click(lambda _: self.add())
        self.count_note = widgets.HTML()
        self.footer = widgets.HBox([self.add_button, self.count_note], layout=widgets.Layout(align_items="center"))
        super().__init__(**kwargs)
        if "tooltip" in self.keys:  # the help is on the add button, not over every row
            self.observe(lambda change: change["new"] and setattr(self, "tooltip", None), names="tooltip")
        self._render()

    # -- rows ---------------------------------------------------------------------------------------

    def add(self, unit: ControlUnit | None = None) -> UnitRow | None:
        """Add a unit (default: the kind used least so far, every other field at its default); ``None`` when the
        run has as many ControlNets as it can take."""
        if len(self.rows) + 1 >= MAX_CONTROL_UNITS:
            return None
        if unit is None:
            used = Counter([self.primary_kind, *(row.kind for row in self.rows)])
            unit = ControlUnit(kind=min(CONTROL_KINDS, key=lambda kind: used[kind]))
        row = self._new_row(len(self.rows) + 2, unit)
        self.rows.append(row)
        self._render()
        self._write()
        return row

    def remove(self, row: UnitRow) -> None:
        had_picture = row.image is not None
        self.rows = [other for other in self.rows if other is not row]
        close_tree(row)
        self._render()
        self._write()
        if had_picture:
            self._pictures_changed()

    def unit_images(self) -> list[Image.Image | None]:
        """Each row's own picture (``None`` where it reads the structure image)."""
        return [row.image for row in self.rows]

    def set_active(self, active: bool) -> None:
        """Whether the chosen structure runs ControlNets (the rows count) or not (they wait, hidden)."""
        self.active = active
        self._write()

    # -- value ----------------------------------------------------------------------------------------

    @traitlets.validate("value")
    def _normalised(self, proposal: Any) -> str:
        """A value set from outside is checked by the engine's own rules (each unit, how many) and kept in the
        setting's one spelling; what the rows write is kept as it is (the run checks it)."""
        text = proposal["value"]
        if self._writing or not text.strip():
            return text
        return GenerationSettings(structure=CONTROLNET_STRUCTURES[0], control_units=text).control_units

    @traitlets.observe("value")
    def _follow_value(self, change: Any) -> None:
        if self._writing:
            return
        text = change["new"]
        if not text.strip() and not self.active:
            return  # the structure reads no units: the rows wait for it
        units = parse_units(text) if text.strip() else ()
        for row, unit in zip(self.rows, units):
            row.set_unit(unit)
        for row in self.rows[len(units):]:
            close_tree(row)
        self.rows = self.rows[: len(units)] + [self._new_row(len(self.rows) + 2 + i, unit)
                                              for i, unit in enumerate(units[len(self.rows):])]
        self._render()

    def _write(self) -> None:
        """The rows into ``value``; a unit that does not fit is named at once (the run refuses it too)."""
        rows = [row.values() for row in self.rows] if self.active else []
        self._writing = True
        try:
            self.value = units_text(rows)
        finally:
            self._writing = False
        for row, values in zip(self.rows, rows):
            try:
                ControlUnit(**values)
            except SettingsError as err:
                if self.on_refused is not None:
                    self.on_refused(f"{unit_title(row.number, row.kind)}: {err}")

    # -- helpers ----------------------------------------------------------------------------------------

    def _new_row(self, number: int, unit: ControlUnit) -> UnitRow:
        return UnitRow(number, unit, on_change=self._write, on_remove=self.remove,
                       on_pictures=self._pictures_changed, on_refused=self._refused)

    def _render(self) -> None:
        for number, row in enumerate(self.rows, start=2):
            if row.number != number:
                row.renumber(number)
        total = len(self.rows) + 1
        full = total >= MAX_CONTROL_UNITS
        self.add_button.disabled = full
        self.intro.value = (_small("ControlNet 1 is the structure above; these run beside it, each on its own map.")
                            if self.rows else "")
        self.count_note.value = _small(f"{total} of at most {MAX_CONTROL_UNITS} ControlNets.") if full else ""
        self.children = [self.intro, *self.rows, self.footer]

    def _pictures_changed(self) -> None:
        if self.on_pictures is not None:
            self.on_pictures()

    def _refused(self, sentence: str) -> None:
        if self.on_refused is not None:
            self.on_refused(sentence)


def _small(text: str) -> str:
    return f"<small style='line-height:1.3;display:block'>{text}</small>"


@control_factory("units")
def _units(spec: SettingSpec) -> widgets.Widget:
    return ControlUnitsEditor(spec)
