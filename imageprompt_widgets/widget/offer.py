"""A question on one line, under the status line: "download this model, or stay?". A mode change never starts a
download on its own (thirty people on classroom wifi); the panel asks here instead, naming the size."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets

from .controls import set_help


class DownloadOffer(widgets.HBox):
    """Two buttons, hidden until :meth:`ask`: ``download`` (the model is chosen; the next Generate downloads it)
    and ``stay`` (nothing changes but the method, back to one the model runs). Either answer hides the line."""

    def __init__(self) -> None:
        self.download_button = widgets.Button(button_style="warning", icon="download",
                                              layout=widgets.Layout(width="auto"))
        self.stay_button = widgets.Button(icon="times", layout=widgets.Layout(width="auto"))
        set_help(self.download_button, "choose that model: the next Generate downloads it, with progress here")
        set_help(self.stay_button, "keep the model you have; the method goes back to one it runs")
        self._on_download: Callable[[], None] | None = None
        self._on_stay: Callable[[], None] | None = None
        self.download_button.on_click(lambda _: self._answer(self._on_download))
        self.stay_button.on_click(lambda _: self._answer(self._on_stay))
        super().__init__([self.download_button, self.stay_button],
                         layout=widgets.Layout(display="none", flex_flow="row wrap", margin="2px 0"))

    @property
    def asking(self) -> bool:
        """Whether the question is on screen."""
        return self.layout.display != "none"

    def ask(self, *, download: str, stay: str, on_download: Callable[[], None], on_stay: Callable[[], None]) -> None:
        self.download_button.description, self.stay_button.description = download, stay
        self._on_download, self._on_stay = on_download, on_stay
        self.layout.display = None

    def withdraw(self) -> None:
        self.layout.display = "none"
        self._on_download = self._on_stay = None

    def _answer(self, action: Callable[[], None] | None) -> None:
        self.withdraw()
        if action is not None:
            action()
