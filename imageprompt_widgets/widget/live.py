"""The panel's "live" toggle: every change re-runs, so a class can *feel* a scale or a weight.

While it is on, a changed control (sliders and text fields report on release, ``continuous_update=False``),
an added or removed image or a moved image weight starts a new run: a running one is cancelled after its
current step and the newest settings wait behind it (the controller keeps one waiting run, so a burst of changes
collapses into one run: the debounce). Turning it on moves a model with a live twin (``sd15`` → ``sd15-live``:
LCM-LoRA, 4 steps, no unconditional pass) to that twin, and turning it off moves back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ..presets import LIVE_TWINS
from .controls import set_help

LIVE_LABEL = "live (re-run on every change)"


class LiveToggle(widgets.Checkbox):
    """A checkbox that, while ticked, calls ``rerun`` for every :meth:`changed` (the panel wires its controls).

    ``switch_model(name)`` moves the panel to another preset; ``model()`` names the current one; ``say`` puts a
    sentence in the status line; ``ready()`` says whether a run could start (images are in).
    """

    def __init__(self, rerun: Callable[[], Any], switch_model: Callable[[str], None], model: Callable[[], str | None],
                 say: Callable[[str], None], ready: Callable[[], bool]) -> None:
        super().__init__(value=False, description=LIVE_LABEL, indent=False, layout=widgets.Layout(width="auto"))
        set_help(self, "re-run on every change (a running run is cancelled after its step); with sd15 or tiny it "
                       "switches to their 4-step LCM-LoRA twin")
        self._rerun, self._switch_model, self._model, self._say, self._ready = rerun, switch_model, model, say, ready
        self._left: str | None = None  # the model live mode moved away from (moved back when it ends)
        self.runs_started = 0
        self.observe(self._toggled, names="value")

    def watch(self, *controls: widgets.Widget) -> None:
        """Re-run when any of ``controls`` changes its value."""
        for control in controls:
            control.observe(lambda _: self.changed(), names="value")

    def changed(self) -> None:
        """Something the next run reads changed: re-run now (cancelling the running one) while live."""
        if self.value and self._ready():
            self.runs_started += 1
            self._rerun()

    def _toggled(self, change: dict[str, Any]) -> None:
        model = self._model()
        if change["new"]:
            twin = LIVE_TWINS.get(model or "")
            if twin is not None:
                self._left = model
                self._switch_model(twin)
                self._say(f"Live: switched to {twin!r} (LCM-LoRA, 4 steps, no unconditional pass); every change "
                          f"re-runs. Untick live to go back to {model!r}.")
            else:
                fast = "" if model in LIVE_TWINS.values() else " (tip: sd15 or tiny have a fast 4-step live twin)"
                self._say(f"Live: every change re-runs{fast}.")
            self.changed()
            return
        back, self._left = self._left, None
        if back is not None and model == LIVE_TWINS.get(back):
            self._switch_model(back)
            self._say(f"Live is off: back to {back!r}.")
        else:
            self._say("Live is off: press Generate to run.")
