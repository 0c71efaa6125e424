"""The inspector's Words section: what a ``words`` run found (the chain's steps with their gains, or the search's
cosines), and on request the phrases nearest the picture (``pipe.nearest_words``: CLIP's text tower loads then).

Self-contained: the inspector adds it as one more accordion section and calls ``show``/``clear``; the numbers and
the plot come from :mod:`imageprompt_widgets.views.words`.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ..engine.controller import Event, Failed, Finished, TaskContext
from ..views.words import words_view
from .gallery import picture

TITLE = "Words"
#: How many nearest phrases the button lists.
NEAREST_COUNT = 10


def _pre(text: str) -> str:
    return f"<pre style='font-size: 11px; line-height: 1.3; margin: 0'>{html.escape(text)}</pre>"


class WordsSection(widgets.VBox):
    """``show(result, pipeline, submit)`` after a run; ``submit(task, label, on_end)`` runs the nearest-words lookup
    off the kernel thread (the inspector's own ``_submit``)."""

    def __init__(self, **kwargs: Any) -> None:
        self.text = widgets.HTML()
        self.image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.nearest_button = widgets.Button(description="Nearest words", disabled=True)
        self.result: Any = None
        self.view: Any = None
        self._submit: Callable[..., Any] | None = None
        self.nearest_button.on_click(lambda _: self.find_nearest())
        super().__init__(children=[self.nearest_button, self.text, self.image], **kwargs)

    def show(self, result: Any, submit: Callable[..., Any]) -> None:
        self.result, self._submit = result, submit
        self._render(words_view(result))
        self.nearest_button.disabled = False

    def clear(self) -> None:
        self.result = self.view = None
        self.text.value = ""
        self.image.value = b""
        self.nearest_button.disabled = True

    def find_nearest(self) -> Any:
        """The table's phrases nearest the run's (first) image embedding, as a controller task."""
        if self.result is None or self._submit is None:
            return None
        result = self.result

        def nearest(task: TaskContext) -> Any:
            return task.pipeline.nearest_words(result.trace.image_embeds[:1], k=NEAREST_COUNT)

        self.nearest_button.disabled = True
        return self._submit(nearest, "Nearest words", lambda end: self._nearest_done(end, result))

    def _nearest_done(self, end: Event, result: Any) -> None:
        if result is not self.result:
            return
        self.nearest_button.disabled = False
        if isinstance(end, Failed):
            message = str(end.error) if isinstance(end.error, ValueError) else f"{type(end.error).__name__}: {end.error}"
            self.text.value = f"<span style='color: #b00020'>{html.escape(message)}</span>"
        elif isinstance(end, Finished):
            self._render(words_view(result, nearest=end.result))

    def _render(self, view: Any) -> None:
        self.view = view
        self.text.value = html.escape(view.describe()) + (_pre(view.table()) if view.table() else "")
        try:
            self.image.value = view.to_png() if (view.steps or view.search_cosines or view.nearest) else b""
        except ImportError as err:  # no matplotlib: the numbers above still show
            self.text.value += html.escape(str(err))
