"""Controls generated from :mod:`imageprompt_widgets.settings`: one widget per setting, no second copy of
any range, default or label. A setting added there (a scheduler, a negative prompt) appears here by itself,
in the group its spec names (``section``) or the one the method registry implies, and shows only while the
chosen method and structure read it (:func:`imageprompt_widgets.methods.settings_read`).

A setting of a new kind (a list of LoRAs, ControlNet units) needs one factory, registered with
:func:`control_factory`: it returns a widget whose ``value`` trait holds the setting's value and whose
``description`` is the label. Panel-level controls that are no setting (a "live" toggle, a dataset picker)
go into a group with :meth:`SettingsControls.add_to`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import ipywidgets as widgets

from ..methods import SHARED_SETTINGS, settings_read
from ..settings import GenerationSettings, SettingsError, SettingSpec, choice_label, setting_specs

#: Size choices step by this many pixels (the spec allows multiples of 8; a list of 121 is no help).
SIZE_CHOICE_STEP = 64
NATIVE_SIZE = "native"
#: The value of the native size's option: a Dropdown whose value is ``None`` shows an empty box (no option is
#: selected), so the control holds 0 and :meth:`SettingsControls.values` reads it as ``None``.
NATIVE = 0
#: The panel's groups, in order; a spec naming another ``section`` gets a group of its own after these.
GROUPS = ("images", "method", "generation", "structure", "advanced")
#: Groups folded away until opened (an Accordion); the others are always open.
FOLDED_GROUPS = ("advanced",)

_WIDE = {"description_width": "100px"}  # room for "image weight", "control scale"

ControlFactory = Callable[[SettingSpec], widgets.Widget]
CONTROL_FACTORIES: dict[str, ControlFactory] = {}


def control_factory(kind: str) -> Callable[[ControlFactory], ControlFactory]:
    """Register the factory that builds the control of settings of ``kind`` (a decorator)."""

    def register(factory: ControlFactory) -> ControlFactory:
        CONTROL_FACTORIES[kind] = factory
        return factory

    return register


def set_help(widget: widgets.Widget, text: str) -> None:
    """Show ``text`` on hover: ``tooltip`` in ipywidgets 8 (and on 7.x buttons), ``description_tooltip`` on
    other 7.x widgets (7.7, Colab's, has no synced ``tooltip`` there: the text would never reach the page)."""
    if "tooltip" in widget.keys:
        widget.tooltip = text
    elif "description_tooltip" in widget.keys:
        widget.description_tooltip = text


def help_of(widget: widgets.Widget) -> str:
    """The hover text the browser gets (the synced trait :func:`set_help` wrote)."""
    for name in ("tooltip", "description_tooltip"):
        if name in widget.keys:
            return getattr(widget, name) or ""
    return ""


class _RefusesOutOfRange:
    """A bounded number control that refuses a value from the browser outside its range with a sentence
    (ipywidgets itself would clamp it silently): the value stays, ``on_refused`` gets the sentence."""

    on_refused: Callable[[str], None] | None = None

    def set_state(self, sync_data: dict[str, Any]) -> None:
        value = sync_data.get("value")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not self.min <= value <= self.max:
            sentence = (f"{self.description}={value:g} is outside its range {self.min:g} to {self.max:g}; "
                        f"it stays at {self.value:g}.")
            sync_data = {key: item for key, item in sync_data.items() if key != "value"}
            self.send_state("value")  # the browser shows the kept value again
            if self.on_refused is not None:
                self.on_refused(sentence)
        super().set_state(sync_data)


class IntSlider(_RefusesOutOfRange, widgets.IntSlider):
    pass


class FloatSlider(_RefusesOutOfRange, widgets.FloatSlider):
    pass


class BoundedIntText(_RefusesOutOfRange, widgets.BoundedIntText):
    pass


@control_factory("choice")
def _choice(spec: SettingSpec) -> widgets.Widget:
    return widgets.Dropdown(options=[(choice_label(spec.name, choice), choice) for choice in spec.choices],
                            value=spec.default)


@control_factory("bool")
def _bool(spec: SettingSpec) -> widgets.Widget:
    return widgets.Checkbox(value=spec.default, indent=True)  # lined up with the other controls


@control_factory("text")
def _text(spec: SettingSpec) -> widgets.Widget:
    return widgets.Text(value=spec.default, continuous_update=False)


#: What SDXL's micro-conditioning boxes show while empty: the pair they take, in pixels, and what empty means
#: (a scale list's "e.g. 1, 0.5" would suggest fractions where SDXL wants whole pixels).
PIXEL_PAIR_PLACEHOLDERS = {
    "original_size": "height, width in px (empty: the output size)",
    "crops_coords_top_left": "top, left in px (empty: 0, 0)",
    "target_size": "height, width in px (empty: the output size)",
}


@control_factory("floats")
def _floats(spec: SettingSpec) -> widgets.Widget:  # comma-separated; the settings parse and validate the text
    placeholder = PIXEL_PAIR_PLACEHOLDERS.get(spec.name, "e.g. 1, 0.5")
    control = widgets.Text(value=floats_text(spec.default), placeholder=placeholder, continuous_update=False)
    if spec.name in PIXEL_PAIR_PLACEHOLDERS:
        control.layout.width = "96%"  # room for the placeholder, as the dropdowns have
    return control


@control_factory("size")
def _size(spec: SettingSpec) -> widgets.Widget:
    first = -(-int(spec.min) // SIZE_CHOICE_STEP) * SIZE_CHOICE_STEP
    sizes = list(range(first, int(spec.max) + 1, SIZE_CHOICE_STEP))
    return widgets.Dropdown(options=[(NATIVE_SIZE, NATIVE)] + [(str(size), size) for size in sizes],
                            value=NATIVE if spec.default is None else spec.default)


@control_factory("int")
def _int(spec: SettingSpec) -> widgets.Widget:
    if spec.max - spec.min > 10_000:  # a seed: typed, not slid
        return BoundedIntText(value=spec.default, min=spec.min, max=spec.max, step=spec.step)
    return IntSlider(value=spec.default, min=spec.min, max=spec.max, step=spec.step, continuous_update=False)


@control_factory("float")
def _float(spec: SettingSpec) -> widgets.Widget:
    return FloatSlider(value=spec.default, min=spec.min, max=spec.max, step=spec.step, continuous_update=False)


def control_for(spec: SettingSpec) -> widgets.Widget:
    """The widget that edits one setting, labelled with the spec's label, its help shown on hover."""
    factory = CONTROL_FACTORIES.get(spec.kind)
    if factory is None:
        raise ValueError(f"no control for settings of kind {spec.kind!r} ({spec.name}): register one with "
                         "imageprompt_widgets.widget.controls.control_factory.")
    control = factory(spec)
    control.description = spec.label
    if spec.kind == "choice":  # room for "words (name)" beside the label: the panel's column, not 300 px
        control.layout.width = "96%"
    if "style" in control.keys and hasattr(control.style, "description_width"):
        control.style.description_width = _WIDE["description_width"]
    set_help(control, technical_help(spec))
    return control


def technical_help(spec: SettingSpec) -> str:
    """The hover text: what the control does, then the setting's own name (as recipes, the command line and the
    docs call it) where the label says it in other words."""
    plain = spec.label.replace(" ", "_") == spec.name
    return spec.help if plain else f"{spec.help} (setting: {spec.name})"


def group_of(spec: SettingSpec) -> str:
    """The panel group of a setting: its spec's ``section``, else what its metadata and the registry imply."""
    if spec.section:
        return spec.section
    if spec.advanced:
        return "advanced"
    return "generation" if spec.name in SHARED_SETTINGS else "method"


def group_title(group: str) -> str:
    return group.replace("_", " ").capitalize()


class SettingsControls(widgets.VBox):
    """Every setting as a control, in titled groups (Images · Method · Generation · Structure · Advanced).

    ``settings()`` reads them into a validated :class:`GenerationSettings`; ``apply()`` writes values back
    (a recipe, a history item), refusing out-of-range or unknown values with a sentence; ``show_for(mode,
    structure)`` shows only the controls that method and structure read. Settings named in ``exclude`` get
    no control here (the panel sets them another way, e.g. per-image weights on the input tiles).
    ``on_refused`` gets the sentence when the browser sends a number outside a control's range.
    """

    def __init__(self, exclude: tuple[str, ...] = (), **kwargs: Any) -> None:
        self.specs = {spec.name: spec for spec in setting_specs() if spec.name not in exclude}
        self.controls: dict[str, widgets.Widget] = {name: control_for(spec) for name, spec in self.specs.items()}
        self.on_refused: Callable[[str], None] | None = None
        for control in self.controls.values():
            if isinstance(control, _RefusesOutOfRange):
                control.on_refused = self._refused
        self.dice = widgets.Button(description="", icon="random", layout=widgets.Layout(width="44px"))
        set_help(self.dice, "a random seed")
        self.dice.on_click(lambda _: self.roll_seed())
        self.rows: dict[str, widgets.Widget] = {}
        members: dict[str, list[widgets.Widget]] = {group: [] for group in GROUPS}
        for name, spec in self.specs.items():
            row = self.controls[name]
            if name == "seed":
                row = widgets.HBox([row, self.dice])
            self.rows[name] = row
            members.setdefault(group_of(spec), []).append(row)
        self.groups: dict[str, widgets.VBox] = {group: widgets.VBox(rows) for group, rows in members.items()}
        self.sections: dict[str, widgets.Widget] = {group: self._section(group) for group in self.groups}
        self._shown: frozenset[str] = frozenset(self.specs)
        self._capabilities: frozenset[str] | None = None  # the model's; None: not known, show everything
        super().__init__(children=list(self.sections.values()), **kwargs)
        self.show_for(self.controls["mode"].value, self.controls["structure"].value)
        for name in ("mode", "structure"):
            self.controls[name].observe(lambda _: self._follow_method(), names="value")

    def _section(self, group: str) -> widgets.Widget:
        box = self.groups[group]
        if group in FOLDED_GROUPS:
            section = widgets.Accordion(children=[box], selected_index=None)
            section.set_title(0, group_title(group))
            return section
        title = widgets.HTML(f"<b>{group_title(group)}</b>", layout=widgets.Layout(margin="6px 0 0 0"))
        return widgets.VBox([title, box])

    def __getitem__(self, name: str) -> widgets.Widget:
        return self.controls[name]

    def add_to(self, group: str, *parts: widgets.Widget, first: bool = False, before: str | None = None) -> None:
        """Put panel widgets that are no setting into a group (the model picker, uploads, a live toggle): last,
        ``first``, or just ``before`` the row of the setting named so."""
        box = self.groups[group]
        children = list(box.children)
        at = 0 if first else children.index(self.rows[before]) if before is not None else len(children)
        box.children = (*children[:at], *parts, *children[at:])
        self._update_sections()

    # -- what is shown ------------------------------------------------------------------------------

    @property
    def shown(self) -> frozenset[str]:
        """The settings whose controls are visible now."""
        return self._shown

    def show_for(self, mode: str, structure: str) -> None:
        """Show exactly the controls of the settings a run with this method and structure reads."""
        read = settings_read(mode, structure, self._capabilities)
        self._shown = frozenset(name for name in self.specs if name in read)
        for name, control in self.controls.items():
            display = None if name in self._shown else "none"
            control.layout.display = display
            if self.rows[name] is not control:
                self.rows[name].layout.display = display
        self._update_sections()

    def settings_read(self) -> frozenset[str]:
        """The settings a run with the chosen method and structure reads (the registry's answer)."""
        return settings_read(self.controls["mode"].value, self.controls["structure"].value, self._capabilities)

    def set_native_size(self, pixels: int | None) -> None:
        """Say in each size control what "native" is for the chosen model (``"native (1024)"`` on SDXL, ``(512)`` on
        SD 1.x); ``None`` where it is not known before the model loads. The chosen value stays."""
        label = f"{NATIVE_SIZE} ({pixels})" if pixels else NATIVE_SIZE
        for name, spec in self.specs.items():
            control = self.controls.get(name)
            if spec.kind != "size" or control is None or control.options[0][0] == label:
                continue
            value = control.value
            control.options = [(label, NATIVE), *control.options[1:]]
            control.value = value

    def set_capabilities(self, capabilities: Iterable[str] | None) -> None:
        """What the chosen model can do (``preset_capabilities``): a setting it cannot read is hidden, e.g. the
        negative prompt for a model without SD's text encoder."""
        self._capabilities = None if capabilities is None else frozenset(capabilities)
        self._follow_method()

    def _follow_method(self) -> None:
        self.show_for(self.controls["mode"].value, self.controls["structure"].value)

    def _update_sections(self) -> None:
        """A group with nothing visible in it is hidden whole (no empty title)."""
        for group, section in self.sections.items():
            visible = any(getattr(child.layout, "display", None) != "none" for child in self.groups[group].children)
            section.layout.display = None if visible else "none"

    # -- values -------------------------------------------------------------------------------------

    def values(self) -> dict[str, Any]:
        return {name: None if self.specs[name].kind == "size" and control.value == NATIVE else control.value
                for name, control in self.controls.items()}

    def settings(self, **others: Any) -> GenerationSettings:
        """The controls' values (plus ``others``) as settings; a ``SettingsError`` if one is invalid."""
        return GenerationSettings.from_kwargs(**self.values(), **others)

    def check(self, values: dict[str, Any], ignore: Iterable[str] = ()) -> dict[str, Any]:
        """The control values ``values`` would set, or a :class:`SettingsError` naming the first problem:
        an unknown setting, a value outside its range, or one no control here can show (a size that is not
        one of the panel's choices). Nothing is changed."""
        ignore = set(ignore)
        wanted = {name: value for name, value in values.items() if name not in ignore}
        unknown = sorted(set(wanted) - {spec.name for spec in setting_specs()})
        if unknown:
            raise SettingsError(f"Unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                                "it comes from another version of imageprompt_widgets.")
        combined = {**self.values(), **wanted}
        checked = GenerationSettings.from_kwargs(**{name: combined[name] for name in combined if name in self.specs})
        result = {}
        for name in wanted:
            if name not in self.controls:
                continue
            value = getattr(checked, name)
            control = self.controls[name]
            if self.specs[name].kind == "floats":
                value = floats_text(value)
            elif self.specs[name].kind == "size" and value is None:
                value = NATIVE
            elif isinstance(control, widgets.Dropdown):
                choices = [choice for _, choice in option_pairs(control.options)]
                if value not in choices:
                    shown = ", ".join(label for label, _ in option_pairs(control.options))
                    raise SettingsError(f"{name}={value!r} is not one of the panel's choices ({shown}).")
            result[name] = value
        return result

    def apply(self, values: GenerationSettings | dict[str, Any], ignore: Iterable[str] = ()) -> None:
        """Set controls from settings, all or nothing: a value outside a control's range or choices raises
        :class:`SettingsError` (ipywidgets would clamp it silently, or add it as a new option) and leaves
        every control as it was."""
        values = values.to_dict() if isinstance(values, GenerationSettings) else dict(values)
        for name, value in self.check(values, ignore).items():
            self.controls[name].value = value

    def roll_seed(self) -> int:
        spec = self.specs["seed"]
        self.controls["seed"].value = random.randint(int(spec.min), int(spec.max))
        return self.controls["seed"].value

    def _refused(self, sentence: str) -> None:
        if self.on_refused is not None:
            self.on_refused(sentence)


def option_pairs(options: Any) -> list[tuple[str, Any]]:
    """A Dropdown's options as ``(label, value)`` pairs, whichever form they were given in."""
    return [option if isinstance(option, tuple) else (str(option), option) for option in options]


def floats_text(values: Any) -> str:
    return ", ".join(f"{value:g}" for value in values or ())
