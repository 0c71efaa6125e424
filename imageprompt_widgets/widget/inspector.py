"""Inspector tab of the widget: renders the pure views of imageprompt_widgets.views for the last result.

Every section is a thin wrapper: the numbers and pictures come from :mod:`imageprompt_widgets.views`,
so what the tab shows is exactly what a notebook cell gets from the same functions. A view that
fails shows its error in its own section; the other sections still fill. Replays that run the UNet
again (the interpolation strip, the x0 filmstrip) go through the controller's ``submit_task``: off the
kernel thread, with progress in the panel's status and its Cancel button working.

A section draws only when it is open and the tab is visible (``set_visible``; the panel passes its tab's
state): a finished run costs nothing here while nobody looks, and a live run (``show(..., defer=True)``) draws
nothing on its worker thread: opening a section (or the "Draw" button) draws that run then.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets

from .. import views
from ..engine.controller import Controller, Event, Failed, Finished, Job, TaskContext
from ..engine.runners import InlineRunner
from ..presets import runs_toy_weights
from .gallery import close_tree, picture
from .words import TITLE as WORDS_TITLE
from .words import WordsSection

EMPTY_TEXT = "Generate something to inspect its tensors here."
#: What the Denoising tab says about a run that kept no latents (the panel's checkbox keeps them).
NO_LATENTS_TEXT = ("This run kept no latents, so there is no filmstrip: tick “keep latents (Denoising view)” "
                   "under Generation and press Generate again.")
SECTION_TITLES = ("Tensors", "What CLIP saw", "Scale gap", "Direction gap", "Pooled slot", "Similarity", "Tokens", "Attention",
                  "Denoising", "Interpolation", "Adapter tokens", WORDS_TITLE)
#: What the Attention section says about a run that recorded no attention (the panel's checkbox records it).
NO_ATTENTION_TEXT = ("This run recorded no attention maps: tick “trace attention (Attention view)” under "
                     "Generation and press Generate again.")
#: What the Direction gap section says before its button is pressed.
DIRECTION_GAP_TEXT = ("Where the image embedding points against SD's own text tokens (cosines), and why norm "
                      "matching fixes its length but not its direction. It runs SD's text encoder on the prompts "
                      "typed here (and CLIP's text tower where the model has one): press Compare.")
#: What the placeholder adds while sections wait to be drawn.
DRAW_ON_OPEN_TEXT = "Each section is drawn when it is opened."
#: The button that draws the open section of a live run (drawn on request, not on the run's thread).
DRAW_LABEL = "Draw this run"
#: What the Pooled slot section says above its picture ({texts}: what the text references are, see below).
POOLED_SLOT_TEXT = ("SDXL's pooled slot (one vector beside the tokens, in OpenCLIP bigG's space): what the UNet got, "
                    "beside {texts} and the input image's bigG embedding, computed now.")
#: The text references of the Pooled slot section: the run's prompt, or (none typed) the view's reference texts.
POOLED_PROMPT = "the prompt's pooled embedding"
POOLED_REFERENCES = "the pooled embeddings of a few reference texts (this run had no prompt)"
#: What the Adapter tokens section says about a run that fed no IP-Adapter.
NO_ADAPTER_TEXT = "This run fed no IP-Adapter: its tokens show here after an ip_adapter run."


def _toy_row(result: Any, pipeline: Any, inputs: Sequence[Any] | None) -> str:
    """On the toy world's presets: this run's row of the route scoreboard (what the judge read in the first input
    and in the first output; docs/toy_world.md has every route's rates)."""
    preset = getattr(pipeline, "preset", None)
    if preset is None or not runs_toy_weights(preset) or not inputs or not result.images:
        return ""
    from ..images import load_image
    from ..toy.judge import run_row

    return "\n\n" + run_row(load_image(inputs[0]), result.images[0])  # inputs as given: a path, bytes, a PIL image


def applicable_sections(result: Any, pipeline: Any) -> tuple[str, ...]:
    """The sections that mean something for this run: none about the image for a words-only run (no image was
    encoded); Adapter tokens only where an IP-Adapter read the image; Pooled slot only on SDXL (SD 1.x has none),
    where the Direction gap (SD 1.x's question) gives way to it."""
    has_image = result.trace.image_embeds.shape[0] > 0
    adapter = result.settings.mode == "ip_adapter" and bool(getattr(pipeline, "ip_adapters", ()))
    pooled = result.trace.pooled_prompt_embeds is not None
    only_some = {"Adapter tokens": adapter, "Pooled slot": pooled, "Direction gap": has_image and not pooled}
    return tuple(title for title in SECTION_TITLES
                 if title in ("Tensors", "Attention", "Denoising") or only_some.get(title, has_image))


def _pre(text: str) -> str:
    return f"<pre style='font-size: 11px; line-height: 1.3; margin: 0'>{html.escape(text)}</pre>"


def _x0_unet_calls(trace: Any) -> int:
    """How many UNet calls the x0 filmstrip makes: one per shown frame, except the final latent (its own x0)."""
    if trace.latents is None:
        return 0
    steps = [trace.latent_steps[i] if trace.latent_steps else i + 1 for i in views.frame_indices(trace.latents.shape[0])]
    return sum(1 for step in steps if step < len(trace.timesteps))


def _clip_square(image: Any, processor: Any, crop: str) -> Any:
    """The square CLIP saw of ``image`` (its center crop, squash or padding), without running the encoder."""
    from ..encoding import square_for_clip
    from ..images import load_image

    image = load_image(image)
    if crop != "center_crop":
        return square_for_clip(image, crop, processor)
    return views.clip_input_images(processor(images=[image], return_tensors="pt")["pixel_values"], processor)[0]


def _split_texts(value: str) -> list[str]:
    """Prompts typed into one field, separated by ``;`` or new lines."""
    return [part.strip() for part in value.replace("\n", ";").split(";") if part.strip()]


class InspectorTab(widgets.VBox):
    """The "Inspector" tab: ``show(result, pipeline)`` after each finished run, ``clear()`` to empty it.

    ``controller`` runs its replays (the panel's own); without one they run inline on an own controller.
    """

    def __init__(self, controller: Controller | None = None, **kwargs: Any) -> None:
        self.controller = controller
        self._inline: Controller | None = None
        self.result: Any = None
        self.pipeline: Any = None
        self.placeholder = widgets.HTML(EMPTY_TEXT)

        self.summary = widgets.HTML()
        self.clip_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.clip_text = widgets.HTML()
        self.scale_gap_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.scale_gap_text = widgets.HTML()
        self.similarity_texts = widgets.Text(
            description="texts", placeholder="a cat; a dog (separated by ;)", continuous_update=False
        )
        self.similarity_button = widgets.Button(description="Compare")
        self.similarity_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.similarity_note = widgets.HTML()
        self.token_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.token_text = widgets.HTML()
        self.filmstrip_x0 = widgets.Checkbox(
            description="x0 estimates (one extra UNet call per frame)", value=False, indent=False,
            layout=widgets.Layout(width="auto"),
        )
        self.filmstrip_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.filmstrip_table = widgets.HTML()
        self.interpolation_text = widgets.Text(
            description="towards", placeholder="a text (empty: the second input image)"
        )
        self.interpolation_count = widgets.IntSlider(description="images", value=5, min=2, max=8)
        self.interpolation_button = widgets.Button(description="Interpolate", disabled=True)
        self.interpolation_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.interpolation_note = widgets.HTML()
        self.adapter_text = widgets.HTML()
        self.attention_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.attention_text = widgets.HTML()
        self.direction_texts = widgets.Text(
            description="prompts", value="; ".join(views.DEFAULT_PROMPTS), continuous_update=False,
            layout=widgets.Layout(width="70%"),
        )
        self.direction_button = widgets.Button(description="Compare", disabled=True)
        self.direction_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.direction_note = widgets.HTML()
        self.pooled_image = picture(format="png", layout=widgets.Layout(max_width="100%"))
        self.pooled_text = widgets.HTML()
        self.adapter_images: list[widgets.Image] = []  # one per IP-Adapter of the run
        self.adapter_box = widgets.VBox()

        self.similarity_button.on_click(lambda _: self.update_similarity())
        self.interpolation_button.on_click(lambda _: self.run_interpolation())
        self.direction_button.on_click(lambda _: self.run_direction_gap())
        self.filmstrip_x0.observe(lambda _: self.update_filmstrip(), names="value")

        # An Accordion, not a Tab: beside the controls the panel's column is narrow, and seven tab titles
        # would be cut to a few letters each.
        self.sections = widgets.Accordion(
            children=[
                widgets.VBox([self.summary]),
                widgets.VBox([self.clip_text, self.clip_image]),
                widgets.VBox([self.scale_gap_text, self.scale_gap_image]),
                widgets.VBox([widgets.HBox([self.direction_texts, self.direction_button],
                                           layout=widgets.Layout(flex_flow="row wrap")),
                              self.direction_note, self.direction_image]),
                widgets.VBox([self.pooled_text, self.pooled_image]),
                widgets.VBox([widgets.HBox([self.similarity_texts, self.similarity_button],
                                           layout=widgets.Layout(flex_flow="row wrap")),
                              self.similarity_note, self.similarity_image]),
                widgets.VBox([self.token_text, self.token_image]),
                widgets.VBox([self.attention_text, self.attention_image]),
                widgets.VBox([self.filmstrip_x0, self.filmstrip_image, self.filmstrip_table]),
                widgets.VBox([widgets.HBox([self.interpolation_text, self.interpolation_count,
                                            self.interpolation_button], layout=widgets.Layout(flex_flow="row wrap")),
                              self.interpolation_note, self.interpolation_image]),
                widgets.VBox([self.adapter_text, self.adapter_box]),
            ]
        )
        self.words = WordsSection()  # self-contained: its own module, one child and one title here
        self.sections.children = (*self.sections.children, self.words)
        self.boxes: dict[str, widgets.Widget] = dict(zip(SECTION_TITLES, self.sections.children))
        self._titles(SECTION_TITLES)
        self.sections.selected_index = 0
        self.sections.layout.display = "none"
        self.errors: dict[str, str] = {}  # section title -> the error it shows
        self.labels: list[str] | None = None  # the inputs' names, where the panel gave the inputs
        self.views: dict[str, Any] = {}  # section title -> the view it shows (numbers included)
        self.visible = True  # a tab on its own is visible; the panel says when its Inspector tab is not
        self.pending: set[str] = set()  # sections not yet drawn for the shown run
        self._inputs: Sequence[Any] | None = None
        self._adapter_images: Sequence[Sequence[Any]] | None = None
        self.draw_button = widgets.Button(description=DRAW_LABEL, layout=widgets.Layout(display="none"))
        self.draw_button.on_click(lambda _: self.draw_open_section(force=True))
        self.sections.observe(lambda _: self.draw_open_section(), names="selected_index")
        super().__init__(children=[self.placeholder, self.draw_button, self.sections], **kwargs)

    # -- public interface (called by the panel) ------------------------------------------------

    def show(self, result: Any, pipeline: Any, inputs: Sequence[Any] | None = None,
             adapter_images: Sequence[Sequence[Any]] | None = None, labels: Sequence[str] | None = None,
             *, defer: bool = False) -> None:
        """Take a finished run: the open section draws now if the tab is visible (unless ``defer``: a live run's
        worker thread draws nothing), every other section when it is opened. ``inputs`` (the input images) adds
        the originals, and their file names (or ``labels``) label the pictures; ``adapter_images`` are the run's
        per-adapter images."""
        was_open = self._open_title()
        self.clear()
        self.result, self.pipeline = result, pipeline
        self._inputs, self._adapter_images = inputs, adapter_images
        trace = result.trace
        applying = applicable_sections(result, pipeline)
        self._titles(applying)
        if was_open in self.shown_sections:  # the section a user keeps open stays open from run to run
            self.sections.selected_index = self.shown_sections.index(was_open)
        if inputs and len(inputs) == trace.image_embeds.shape[0]:
            self.labels = list(labels) if labels and len(labels) == len(inputs) else views.source_labels(inputs)
        has_image = "What CLIP saw" in applying
        if has_image:
            self.direction_note.value = html.escape(DIRECTION_GAP_TEXT)
            self.direction_button.disabled = False
            has_two = trace.image_embeds.shape[0] > 1
            self.interpolation_note.value = (
                "Generates images along a slerp from the first input image's embedding to the text typed here"
                + (" (or to the second input image)" if has_two else "")
                + ", as repeat prompts with this run's seed, steps, guidance, scale and norm matching. "
                "Press Interpolate to make the strip."
            )
            self.interpolation_button.disabled = False
        timing = result.describe_timings() or f"{result.seconds:.1f} s"
        self.placeholder.value = html.escape(
            f"{len(trace.tensors())} tensors traced; the run took {timing}. {DRAW_ON_OPEN_TEXT}"
            + ("" if has_image else " A words-only run: no image, so no image sections."))
        self.sections.layout.display = None
        self.pending = set(applying)
        if not defer:
            self.draw_open_section()
        self._show_draw_button()

    def set_visible(self, visible: bool) -> None:
        """Whether the tab is on screen (the panel calls this when its tabs switch): becoming visible draws the
        open section of the shown run."""
        self.visible = visible
        self.draw_open_section()

    def draw_open_section(self, force: bool = False) -> None:
        """Draw the open section for the shown run, once, if the tab is visible (``force``: the Draw button)."""
        title = self._open_title()
        if self.result is not None and title in self.pending and (self.visible or force):
            self.pending.discard(title)
            self._draw(title)
        self._show_draw_button()

    def _open_title(self) -> str | None:
        index = self.sections.selected_index
        shown = self.shown_sections
        return shown[index] if index is not None and index < len(shown) else None

    def _show_draw_button(self) -> None:
        waiting = self.result is not None and self._open_title() in self.pending
        self.draw_button.layout.display = None if waiting and self.visible else "none"

    def _draw(self, title: str) -> None:
        result, pipeline, trace = self.result, self.pipeline, self.result.trace
        if title == "Tensors":
            self._fill(title, lambda: setattr(self.summary, "value", _pre(trace.summary() + _toy_row(
                result, pipeline, self._inputs))), self.summary)
        elif title == "What CLIP saw":
            inputs = self._inputs
            self._fill(title, lambda: self._set_image(
                self.clip_image, title,
                views.what_clip_saw(trace.pixel_values, pipeline.image_processor, inputs, crop=result.settings.crop),
            ), self.clip_text)
            if title not in self.errors:
                side = trace.pixel_values.shape[-1]
                self.clip_text.value = html.escape(
                    f"The {side}x{side} picture the vision tower encoded (normalisation undone)"
                    + (", beside the original." if inputs else ".")
                )
        elif title == "Scale gap":
            self._fill(title, self._show_scale_gap, self.scale_gap_text)
        elif title == "Pooled slot":
            self._fill(title, self._show_pooled_slot, self.pooled_text)
        elif title == "Similarity":
            self._fill(title, self.update_similarity, self.similarity_note)
        elif title == "Tokens":
            self._fill(title, self._show_tokens, self.token_text)
        elif title == "Attention":
            self._fill(title, self._show_attention, self.attention_text)
        elif title == "Adapter tokens":
            self._fill(title, lambda: self._show_adapter_tokens(self._adapter_images), self.adapter_text)
        elif title == "Denoising":
            self.update_filmstrip()
        elif title == WORDS_TITLE:
            self._fill(title, lambda: self.words.show(result, self._submit), self.words.text)
        # "Direction gap" and "Interpolation" compute on their buttons: nothing to draw on opening.

    def draw_all(self) -> None:
        """Draw every section now (a notebook cell that wants the whole tab at once, and the tests)."""
        for title in self.shown_sections:
            if title in self.pending:
                self.pending.discard(title)
                self._draw(title)
        self._show_draw_button()

    def clear(self) -> None:
        """Empty every section (before a new run, or when the result is gone)."""
        self.result = self.pipeline = None
        self.labels = None
        self.errors = {}
        self.views = {}
        self.pending = set()
        self._inputs = self._adapter_images = None
        self.placeholder.value = EMPTY_TEXT
        for image in (self.clip_image, self.scale_gap_image, self.similarity_image, self.token_image,
                      self.filmstrip_image, self.interpolation_image, self.attention_image, self.direction_image,
                      self.pooled_image):
            image.value = b""
        for text in (self.summary, self.clip_text, self.scale_gap_text, self.similarity_note, self.token_text,
                     self.filmstrip_table, self.interpolation_note, self.adapter_text, self.attention_text,
                     self.direction_note, self.pooled_text):
            text.value = ""
        self._set_adapter_images(0)
        self.words.clear()
        self.interpolation_button.disabled = True
        self.direction_button.disabled = True
        self.sections.layout.display = "none"
        self.draw_button.layout.display = "none"

    @property
    def shown_sections(self) -> tuple[str, ...]:
        """The titles of the sections on screen (those that apply to the run shown)."""
        return tuple(title for title, box in self.boxes.items() if box in self.sections.children)

    def _titles(self, titles: Sequence[str]) -> None:
        """Show only these sections, in the tab's order (a section that does not apply has no title bar)."""
        chosen = [title for title in SECTION_TITLES if title in titles]
        self.sections.selected_index = None
        self.sections.children = [self.boxes[title] for title in chosen]
        if "titles" in self.sections.keys:  # ipywidgets 8
            self.sections.titles = tuple(chosen)
        else:
            for index, title in enumerate(chosen):
                self.sections.set_title(index, title)
        self.sections.selected_index = 0

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

    def run_interpolation(self) -> Job | None:
        """Generate the interpolation strip (the "Interpolate" button) as a controller task."""
        if self.result is None:
            return None
        trace, settings = self.result.trace, self.result.settings
        target = self.interpolation_text.value.strip()
        if not target:
            if trace.image_embeds.shape[0] < 2:
                self.interpolation_note.value = "Type a text to interpolate towards (this run had one input image)."
                return None
            end: Any = trace.image_embeds[1]
        else:
            end = target
        start, count = trace.image_embeds[0], self.interpolation_count.value

        def interpolate(task: TaskContext) -> Any:
            per_image = Controller.step_plan(task.pipeline, settings.replace(structure="none")).total
            task.start(count * per_image)
            finished = [0]  # images done: each restarts its own step count

            def on_step(info: Any) -> None:
                task.advance(finished[0] * per_image + info.step)
                if info.step == info.total:
                    finished[0] += 1

            walk = task.pipeline.interpolate(start, end, count, settings, on_step=on_step, cancel=task.cancel)
            return views.interpolation_view(walk)

        self.interpolation_button.disabled = True
        self.interpolation_image.value = b""
        self.interpolation_note.value = "Generating…"
        return self._submit(interpolate, "Interpolation", lambda end: self._interpolation_done(end, settings.seed))

    def _interpolation_done(self, end: Event, seed: int) -> None:
        self.interpolation_button.disabled = self.result is None
        if isinstance(end, Failed):
            self.interpolation_note.value = self._error("Interpolation", end.error)
        elif not isinstance(end, Finished):
            self.interpolation_note.value = "Cancelled."
        else:
            view = end.result
            self._set_image(self.interpolation_image, "Interpolation", view)
            self.interpolation_note.value = html.escape(
                f"{len(view.images)} images, t = " + ", ".join(f"{w:.2f}" for w in view.weights) + f", seed {seed}."
            )

    def _submit(self, task: Any, label: str, on_end: Callable[[Event], None]) -> Job:
        """Run ``task`` on the panel's controller, or inline on an own one (a tab used on its own)."""
        controller = self.controller
        if controller is None:
            if self._inline is None or self._inline.pipeline is not self.pipeline:
                self._inline = Controller(pipeline=self.pipeline, runner=InlineRunner(), previews=False)
            controller = self._inline
        return controller.submit_task(task, label=label, on_end=on_end)

    def _show_scale_gap(self) -> None:
        view = views.scale_gap(self.result.trace, self.pipeline, scale=self.result.settings.scale)
        self._set_image(self.scale_gap_image, "Scale gap", view)
        self.scale_gap_text.value = html.escape(view.describe())

    def _show_pooled_slot(self) -> None:
        inputs = self._inputs if self._inputs and self.result.trace.image_embeds.shape[0] == len(self._inputs) else None
        view = views.pooled_slot(self.result, self.pipeline, inputs)
        self._set_image(self.pooled_image, "Pooled slot", view)
        texts = POOLED_PROMPT if self.result.settings.prompt.strip() else POOLED_REFERENCES
        self.pooled_text.value = html.escape(f"{POOLED_SLOT_TEXT.format(texts=texts)} {view.describe()}")

    def _show_tokens(self) -> None:
        view = views.token_view(self.result.trace, 0, self.pipeline.image_processor)
        self._set_image(self.token_image, "Tokens", view)
        tokens, dims = view.prompt_embeds.shape
        self.token_text.value = html.escape(
            f"{tokens} prompt tokens x {dims} dims, {view.distinct_tokens} distinct rows."
        )

    def _show_attention(self) -> None:
        if self.result.trace.attention_maps is None:
            self.attention_text.value = html.escape(NO_ATTENTION_TEXT)
            return
        view = views.attention_view(self.result, self.pipeline)
        self._set_image(self.attention_image, "Attention", view)
        self.attention_text.value = (
            html.escape("Where each group of prompt tokens acts in the first output: its share of the "
                        "cross-attention at each latent position (mean over heads, layers and steps).")
            + _pre(views.attention_summary(view))
            # what the view knows about these maps: identical tokens in repeat, the adapter's own softmax, and on
            # the toy world how well its maps localise (measured), so a class reads them as they deserve
            + "".join(f"<p style='margin: 6px 0 0'>{html.escape(note)}</p>" for note in view.notes)
        )

    def run_direction_gap(self) -> Job | None:
        """Compare the image embedding's direction with SD's text tokens (the "Compare" button), as a controller
        task: it runs SD's text encoder, and CLIP's text tower loads the first time."""
        if self.result is None:
            return None
        result, prompts = self.result, _split_texts(self.direction_texts.value)

        def compare(task: TaskContext) -> Any:
            return views.direction_gap(result.trace, task.pipeline, prompts)

        self.direction_button.disabled = True
        self.direction_image.value = b""
        self.direction_note.value = "Comparing…"
        return self._submit(compare, "Direction gap", lambda end: self._direction_done(end, result))

    def _direction_done(self, end: Event, result: Any) -> None:
        if result is not self.result:
            return  # a newer run replaced the one this was for
        self.direction_button.disabled = False
        if isinstance(end, Failed):
            self.direction_note.value = self._error("Direction gap", end.error)
        elif not isinstance(end, Finished):
            self.direction_note.value = "Cancelled."
        else:
            self._set_image(self.direction_image, "Direction gap", end.result)
            self.direction_note.value = html.escape(end.result.describe())

    def _show_adapter_tokens(self, adapter_images: Sequence[Sequence[Any]] | None) -> None:
        """Each IP-Adapter's tokens (and a Plus adapter's query maps) over the picture it saw first."""
        result, pipeline = self.result, self.pipeline
        names = tuple(getattr(pipeline, "ip_adapters", ()))
        if result.settings.mode != "ip_adapter" or not names:
            self._set_adapter_images(0)
            self.adapter_text.value = html.escape(NO_ADAPTER_TEXT)
            return
        from ..views.adapter_tokens import adapter_tokens_view

        processor = pipeline.image_processor
        seen_inputs = views.clip_input_images(result.trace.pixel_values[:1], processor)[0]
        described = []
        images = self._set_adapter_images(len(names))
        for adapter, image in enumerate(images):
            own = list(adapter_images[adapter][:1]) if adapter_images else []
            seen = _clip_square(own[0], processor, result.settings.crop) if own else seen_inputs
            view = adapter_tokens_view(pipeline.adapter_tokens(result, adapter=adapter), seen=seen)
            self.views[f"Adapter tokens {adapter}"] = view
            image.value = view.to_png()
            described.append(view.describe())
        self.adapter_text.value = html.escape(
            "What each IP-Adapter's cross-attention reads (rows: tokens); for a Plus adapter, where each resampler "
            "query looked in the picture. " + "; ".join(described) + "."
        )

    def _set_adapter_images(self, count: int) -> list[widgets.Image]:
        """``count`` pictures in the Adapter tokens section (the run's adapters)."""
        for image in self.adapter_images[count:]:
            close_tree(image)
        self.adapter_images = self.adapter_images[:count] + [
            picture(format="png", layout=widgets.Layout(max_width="100%")) for _ in range(count - len(self.adapter_images))
        ]
        for image in self.adapter_images:
            image.value = b""
        self.adapter_box.children = list(self.adapter_images)
        return self.adapter_images

    def update_filmstrip(self) -> Job | None:
        """Redraw the filmstrip (after a run, or when "x0 estimates" is switched).

        The noisy latents are only decoded (cheap, here); x0 estimates run the UNet once per frame, so
        they are a controller task.
        """
        if self.result is None:
            return None
        self.errors.pop("Denoising", None)
        self.filmstrip_image.value = b""
        result, x0 = self.result, self.filmstrip_x0.value
        has_latents = result.trace.latents is not None
        self.filmstrip_x0.layout.display = None if has_latents else "none"
        if not has_latents:
            self.filmstrip_table.value = html.escape(NO_LATENTS_TEXT)
            return None
        if not x0:
            self._fill("Denoising", lambda: self._show_filmstrip(self._filmstrip(result, self.pipeline, False)),
                       self.filmstrip_table)
            return None
        frames = _x0_unet_calls(result.trace)

        def replay(task: TaskContext) -> Any:
            with task.unet_steps(frames):
                return self._filmstrip(result, task.pipeline, True)

        self.filmstrip_table.value = "Computing the x0 estimates…"
        return self._submit(replay, "x0 filmstrip", lambda end: self._filmstrip_done(end, result))

    def _filmstrip_done(self, end: Event, result: Any) -> None:
        if result is not self.result:
            return  # a newer run replaced the one this was for
        if isinstance(end, Failed):
            self.filmstrip_table.value = self._error("Denoising", end.error)
        elif not isinstance(end, Finished):
            self.filmstrip_table.value = "Cancelled; switch the box off and on to compute the x0 estimates."
        else:
            self._show_filmstrip(end.result)

    @staticmethod
    def _filmstrip(result: Any, pipeline: Any, x0: bool) -> Any:
        # The cheap preview decoder: an exact VAE decode of every frame is slow on a CPU.
        return views.filmstrip(result, pipeline, decoder="auto", x0=x0)

    def _show_filmstrip(self, view: Any) -> None:
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
