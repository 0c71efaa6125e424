"""Inspector tab of the widget: renders the pure views of imageprompt_widgets.views for the last result.

Every section is a thin wrapper: the numbers and pictures come from :mod:`imageprompt_widgets.views`,
so what the tab shows is exactly what a notebook cell gets from the same functions. A view that
fails shows its error in its own section; the other sections still fill.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets

from .. import views

EMPTY_TEXT = "Generate something to inspect its tensors here."
SECTION_TITLES = ("Tensors", "What CLIP saw", "Scale gap", "Similarity", "Tokens", "Denoising", "Interpolation")


def _pre(text: str) -> str:
    return f"<pre style='font-size: 11px; line-height: 1.3; margin: 0'>{html.escape(text)}</pre>"


def _split_texts(value: str) -> list[str]:
    """Prompts typed into one field, separated by ``;`` or new lines."""
    return [part.strip() for part in value.replace("\n", ";").split(";") if part.strip()]


class InspectorTab(widgets.VBox):
    """The "Inspector" tab: ``show(result, pipeline)`` after each finished run, ``clear()`` to empty it."""

    def __init__(self, **kwargs: Any) -> None:
        self.result: Any = None
        self.pipeline: Any = None
        self.placeholder = widgets.HTML(EMPTY_TEXT)

        self.summary = widgets.HTML()
        self.clip_image = widgets.Image(format="png")
        self.clip_text = widgets.HTML()
        self.scale_gap_image = widgets.Image(format="png")
        self.scale_gap_text = widgets.HTML()
        self.similarity_texts = widgets.Text(
            description="texts", placeholder="a cat; a dog (separated by ;)", continuous_update=False
        )
        self.similarity_button = widgets.Button(description="Compare")
        self.similarity_image = widgets.Image(format="png")
        self.similarity_note = widgets.HTML()
        self.token_image = widgets.Image(format="png")
        self.token_text = widgets.HTML()
        self.filmstrip_x0 = widgets.Checkbox(
            description="x0 estimates (one extra UNet call per frame)", value=False, indent=False,
            layout=widgets.Layout(width="auto"),
        )
        self.filmstrip_image = widgets.Image(format="png")
        self.filmstrip_table = widgets.HTML()
        self.interpolation_text = widgets.Text(
            description="towards", placeholder="a text (empty: the second input image)"
        )
        self.interpolation_count = widgets.IntSlider(description="images", value=5, min=2, max=8)
        self.interpolation_button = widgets.Button(description="Interpolate", disabled=True)
        self.interpolation_image = widgets.Image(format="png")
        self.interpolation_note = widgets.HTML()

        self.similarity_button.on_click(lambda _: self.update_similarity())
        self.interpolation_button.on_click(lambda _: self.run_interpolation())
        self.filmstrip_x0.observe(lambda _: self.update_filmstrip(), names="value")

        self.sections = widgets.Tab(
            children=[
                widgets.VBox([self.summary]),
                widgets.VBox([self.clip_text, self.clip_image]),
                widgets.VBox([self.scale_gap_text, self.scale_gap_image]),
                widgets.VBox([widgets.HBox([self.similarity_texts, self.similarity_button]),
                              self.similarity_note, self.similarity_image]),
                widgets.VBox([self.token_text, self.token_image]),
                widgets.VBox([self.filmstrip_x0, self.filmstrip_image, self.filmstrip_table]),
                widgets.VBox([widgets.HBox([self.interpolation_text, self.interpolation_count,
                                            self.interpolation_button]),
                              self.interpolation_note, self.interpolation_image]),
            ]
        )
        for index, title in enumerate(SECTION_TITLES):
            self.sections.set_title(index, title)  # works on ipywidgets 7 and 8
        self.sections.layout.display = "none"
        self.errors: dict[str, str] = {}  # section title -> the error it shows
        self.labels: list[str] | None = None  # the inputs' names, where the panel gave the inputs
        self.views: dict[str, Any] = {}  # section title -> the view it shows (numbers included)
        super().__init__(children=[self.placeholder, self.sections], **kwargs)

    # -- public interface (called by the panel) ------------------------------------------------

    def show(self, result: Any, pipeline: Any, inputs: Sequence[Any] | None = None) -> None:
        """Fill every section from a finished run; ``inputs`` (the input images) adds the originals, and their
        file names label the pictures."""
        self.clear()
        self.result, self.pipeline = result, pipeline
        trace = result.trace
        if inputs and len(inputs) == trace.image_embeds.shape[0]:
            self.labels = views.source_labels(inputs)
        self._fill("Tensors", lambda: setattr(self.summary, "value", _pre(trace.summary())), self.summary)
        self._fill("What CLIP saw", lambda: self._set_image(
            self.clip_image, "What CLIP saw",
            views.what_clip_saw(trace.pixel_values, pipeline.image_processor, inputs, crop=result.settings.crop),
        ), self.clip_text)
        if "What CLIP saw" not in self.errors:
            side = trace.pixel_values.shape[-1]
            self.clip_text.value = html.escape(
                f"The {side}x{side} picture the vision tower encoded (normalisation undone)"
                + (", beside the original." if inputs else ".")
            )
        self._fill("Scale gap", self._show_scale_gap, self.scale_gap_text)
        self._fill("Similarity", self.update_similarity, self.similarity_note)
        self._fill("Tokens", self._show_tokens, self.token_text)
        self.update_filmstrip()
        has_two = trace.image_embeds.shape[0] > 1
        self.interpolation_note.value = (
            "Generates images along a slerp from the first input image's embedding to the text typed here"
            + (" (or to the second input image)" if has_two else "")
            + ", as repeat prompts with this run's seed, steps, guidance, scale and norm matching."
        )
        self.interpolation_button.disabled = False
        self.placeholder.value = (
            f"{len(trace.tensors())} tensors traced; run took {getattr(result, 'seconds', 0.0):.1f} s."
        )
        self.sections.layout.display = None

    def clear(self) -> None:
        """Empty every section (before a new run, or when the result is gone)."""
        self.result = self.pipeline = None
        self.labels = None
        self.errors = {}
        self.views = {}
        self.placeholder.value = EMPTY_TEXT
        for image in (self.clip_image, self.scale_gap_image, self.similarity_image, self.token_image,
                      self.filmstrip_image, self.interpolation_image):
            image.value = b""
        for text in (self.summary, self.clip_text, self.scale_gap_text, self.similarity_note, self.token_text,
                     self.filmstrip_table, self.interpolation_note):
            text.value = ""
        self.interpolation_button.disabled = True
        self.sections.layout.display = "none"

    # -- sections -------------------------------------------------------------------------------

    def update_similarity(self) -> None:
        """Recompute the similarity heatmap with the texts typed (the "Compare" button)."""
        if self.result is None:
            return
        trace = self.result.trace
        try:
            view = views.similarity(trace.image_embeds, self.pipeline, _split_texts(self.similarity_texts.value),
                                    labels=self.labels)
        except Exception as err:  # noqa: BLE001 - shown in the section instead of dying in a callback
            self.similarity_note.value = self._error("Similarity", err)
            return
        self._set_image(self.similarity_image, "Similarity", view)
        self.similarity_note.value = html.escape(view.note)

    def run_interpolation(self) -> None:
        """Generate the interpolation strip (the "Interpolate" button; blocks while it runs)."""
        if self.result is None:
            return
        trace, settings = self.result.trace, self.result.settings
        target = self.interpolation_text.value.strip()
        if not target:
            if trace.image_embeds.shape[0] < 2:
                self.interpolation_note.value = "Type a text to interpolate towards (this run had one input image)."
                return
            end: Any = trace.image_embeds[1]
        else:
            end = target
        self.interpolation_button.disabled = True
        self.interpolation_note.value = "Generating…"
        try:
            walk = self.pipeline.interpolate(trace.image_embeds[0], end, self.interpolation_count.value, settings)
        except Exception as err:  # noqa: BLE001
            self.interpolation_note.value = self._error("Interpolation", err)
        else:
            view = views.interpolation_view(walk)
            self._set_image(self.interpolation_image, "Interpolation", view)
            self.interpolation_note.value = html.escape(
                f"{len(view.images)} images, t = " + ", ".join(f"{w:.2f}" for w in view.weights)
                + f", seed {settings.seed}."
            )
        finally:
            self.interpolation_button.disabled = False

    def _show_scale_gap(self) -> None:
        view = views.scale_gap(self.result.trace, self.pipeline, scale=self.result.settings.scale)
        self._set_image(self.scale_gap_image, "Scale gap", view)
        self.scale_gap_text.value = html.escape(view.describe())

    def _show_tokens(self) -> None:
        view = views.token_view(self.result.trace, 0, self.pipeline.image_processor)
        self._set_image(self.token_image, "Tokens", view)
        tokens, dims = view.prompt_embeds.shape
        self.token_text.value = html.escape(
            f"{tokens} prompt tokens x {dims} dims, {view.distinct_tokens} distinct rows."
        )

    def update_filmstrip(self) -> None:
        """Redraw the filmstrip (after a run, or when "x0 estimates" is switched)."""
        if self.result is None:
            return
        self.errors.pop("Denoising", None)
        self.filmstrip_image.value = b""
        self._fill("Denoising", self._show_filmstrip, self.filmstrip_table)

    def _show_filmstrip(self) -> None:
        # The cheap preview decoder: an exact VAE decode of every frame is slow on a CPU.
        view = views.filmstrip(self.result, self.pipeline, decoder="auto", x0=self.filmstrip_x0.value)
        self._set_image(self.filmstrip_image, "Denoising", view)
        what = "The model's clean estimate (x0) at" if view.x0 else "The noisy latents after"
        self.filmstrip_table.value = (
            html.escape(f"{what} each traced step, decoded with the {view.decoder} preview decoder.")
            + _pre(view.table())
        )

    # -- helpers --------------------------------------------------------------------------------

    def _fill(self, section: str, fill: Callable[[], None], message_widget: widgets.HTML) -> None:
        try:
            fill()
        except Exception as err:  # noqa: BLE001 - one broken view must not blank the whole tab
            message_widget.value = self._error(section, err)

    def _error(self, section: str, err: Exception) -> str:
        text = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        self.errors[section] = text
        return f"<span style='color: #b00020'>{html.escape(text)}</span>"

    def _set_image(self, image: widgets.Image, section: str, view: Any) -> None:
        self.views[section] = view
        image.value = view.to_png()
