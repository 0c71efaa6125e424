"""Controls generated from :mod:`imageprompt_widgets.settings`: one widget per setting, no second copy of
any range, default or label. A setting added there (a new mode, a text prompt) appears here by itself.
"""

from __future__ import annotations

import random
from typing import Any

import ipywidgets as widgets

from ..settings import GenerationSettings, SettingSpec, setting_specs

#: Size choices step by this many pixels (the spec allows multiples of 8; a list of 121 is no help).
SIZE_CHOICE_STEP = 64
NATIVE_SIZE = "native"

_WIDE = {"description_width": "100px"}  # room for "image weight", "control scale"


def control_for(spec: SettingSpec) -> widgets.Widget:
    """The widget that edits one setting, labelled with the spec's label and its help as tooltip."""
    common: dict[str, Any] = {"description": spec.label, "style": _WIDE}
    if spec.kind == "choice":
        control = widgets.Dropdown(options=list(spec.choices), value=spec.default, **common)
    elif spec.kind == "bool":
        control = widgets.Checkbox(value=spec.default, indent=False, **common)
    elif spec.kind == "text":
        control = widgets.Text(value=spec.default, **common)
    elif spec.kind == "floats":  # comma-separated; the settings parse and validate the text
        control = widgets.Text(value=_floats_text(spec.default), placeholder="e.g. 1, 0.5", **common)
    elif spec.kind == "size":
        first = -(-int(spec.min) // SIZE_CHOICE_STEP) * SIZE_CHOICE_STEP
        sizes = list(range(first, int(spec.max) + 1, SIZE_CHOICE_STEP))
        options = [(NATIVE_SIZE, None)] + [(str(size), size) for size in sizes]
        control = widgets.Dropdown(options=options, value=spec.default, **common)
    elif spec.kind == "int" and spec.max - spec.min > 10_000:  # a seed: typed, not slid
        control = widgets.BoundedIntText(value=spec.default, min=spec.min, max=spec.max, step=spec.step, **common)
    elif spec.kind == "int":
        control = widgets.IntSlider(
            value=spec.default, min=spec.min, max=spec.max, step=spec.step, continuous_update=False, **common
        )
    elif spec.kind == "float":
        control = widgets.FloatSlider(
            value=spec.default, min=spec.min, max=spec.max, step=spec.step, continuous_update=False, **common
        )
    else:
        raise ValueError(f"no control for settings of kind {spec.kind!r} ({spec.name})")
    control.tooltip = spec.help  # ipywidgets 8 shows it; 7.7 ignores the unknown attribute
    return control


class SettingsControls(widgets.VBox):
    """Every setting as a control: the main ones in order, the advanced ones folded in an Accordion.

    ``settings()`` reads them into a validated :class:`GenerationSettings`; ``apply()`` writes one back
    (re-running a recipe). The seed field gets a dice button. Settings named in ``exclude`` get no
    control here (the panel sets them another way, e.g. per-image weights on the input tiles).
    """

    def __init__(self, exclude: tuple[str, ...] = (), **kwargs: Any) -> None:
        self.specs = {spec.name: spec for spec in setting_specs() if spec.name not in exclude}
        self.controls: dict[str, widgets.Widget] = {name: control_for(spec) for name, spec in self.specs.items()}
        self.dice = widgets.Button(description="", icon="random", tooltip="random seed", layout=widgets.Layout(width="44px"))
        self.dice.on_click(lambda _: self.roll_seed())
        main, advanced, structure = [], [], []
        for name, spec in self.specs.items():
            row = self.controls[name]
            if name == "seed":
                row = widgets.HBox([row, self.dice])
            (structure if spec.section == "structure" else advanced if spec.advanced else main).append(row)
        # The Structure section (settings with section="structure"); the panel adds its image and preview.
        self.structure_box = widgets.VBox(structure)
        self.structure_section = widgets.Accordion(children=[self.structure_box], selected_index=None)
        self.structure_section.set_title(0, "Structure")
        self.advanced = widgets.Accordion(children=[widgets.VBox(advanced)], selected_index=None)
        self.advanced.set_title(0, "advanced")
        super().__init__(children=[*main, self.structure_section, self.advanced], **kwargs)

    def __getitem__(self, name: str) -> widgets.Widget:
        return self.controls[name]

    def values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    def settings(self, **others: Any) -> GenerationSettings:
        """The controls' values (plus ``others``) as settings; a ``SettingsError`` if one is invalid."""
        return GenerationSettings.from_kwargs(**self.values(), **others)

    def apply(self, settings: GenerationSettings | dict[str, Any]) -> None:
        """Set every control from settings (unknown names are ignored: a recipe from another version)."""
        values = settings.to_dict() if isinstance(settings, GenerationSettings) else dict(settings)
        for name, value in values.items():
            control = self.controls.get(name)
            if control is None:
                continue
            if self.specs[name].kind == "floats":
                value = _floats_text(value)
            elif isinstance(control, widgets.Dropdown) and value not in [v for _, v in _pairs(control.options)]:
                control.options = [*_pairs(control.options), (str(value), value)]
            control.value = value

    def roll_seed(self) -> int:
        spec = self.specs["seed"]
        self.controls["seed"].value = random.randint(int(spec.min), int(spec.max))
        return self.controls["seed"].value


def _pairs(options: Any) -> list[tuple[str, Any]]:
    return [option if isinstance(option, tuple) else (str(option), option) for option in options]


def _floats_text(values: Any) -> str:
    return ", ".join(f"{value:g}" for value in values or ())
