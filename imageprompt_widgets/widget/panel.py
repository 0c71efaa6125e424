"""ImagePromptWidget: the panel users ``display()``. A face over the engine's
:class:`~imageprompt_widgets.controller.Controller`: it reads its controls into settings, hands them to
the controller, and renders what the controller reports (status, progress, previews, results, errors).

Only traits are set while a run is in progress (``Image.value``, ``IntProgress.value``, ``HTML.value``),
never ``with output:``, so updates from the worker thread render in JupyterLab, Notebook 7 and VS Code.
"""

from __future__ import annotations

import html
import traceback
from concurrent.futures import Future
from typing import Any

import ipywidgets as widgets
from PIL import Image

from ..controller import (
    PREVIEW_INTERVAL,
    BusyChanged,
    Cancelled,
    Cancelling,
    Controller,
    Event,
    Failed,
    Finished,
    Job,
    Loading,
    Preview,
    Queued,
    Started,
    Step,
    SubscriberFailed,
    Waiting,
)
from ..images import ImageInputError, describe_source, load_images
from ..presets import Preset
from ..runners import Runner
from ..settings import GenerationSettings
from .controls import SettingsControls
from .gallery import History, HistoryItem, OutputGrid, close_tree
from .inputs import UPLOAD_HINT, InputStrip, load_upload, uploaded_files
from .inspector import InspectorTab

#: Settings the panel sets itself instead of through a generated control.
_OWN_SETTINGS = ("weights",)
_LOST_NOTHING = "nothing from earlier runs is lost."


class ImagePromptWidget(widgets.VBox):
    """Use an image as the prompt of Stable Diffusion, in a notebook.

    ``model`` is a preset name (``"sd14"``, ``"sd15"``, ``"tiny"``) or a model folder; ``pipeline`` an
    already loaded :class:`~imageprompt_widgets.ImagePromptPipeline` instead. Weights load on the first
    Generate, never on display. Keyword settings (``steps=20``) set the controls' starting values.

    ``runner`` decides where generation runs (a worker thread; inline on Colab); ``preview`` is
    ``"auto"``, ``"linear"`` or ``"taesd"`` (with ``taesd=`` a local AutoencoderTiny folder).
    """

    def __init__(
        self,
        model: str | Preset | None = None,
        *,
        pipeline: Any = None,
        runner: Runner | None = None,
        preview: str = "auto",
        taesd: str | None = None,
        preview_interval: float = PREVIEW_INTERVAL,
        history_size: int = 48,
        history_bytes: int = 256 * 2**20,
        save_dir: str = "imageprompt-outputs",
        **settings: Any,
    ) -> None:
        # Unknown model names and preview kinds fail here, at once; no weights load before the first Generate.
        self.controller = Controller(model, pipeline=pipeline, runner=runner, preview=preview, taesd=taesd,
                                     preview_interval=preview_interval)
        self.result = None
        self.previews_shown = 0  # preview frames shown in the last run (for tests and the curious)
        self._explained: set[str] = set()  # why a run's step total differs from steps: said once per panel
        self._step_note = ""

        self.upload = widgets.FileUpload(accept="image/*", multiple=True, description="Upload",
                                         layout=widgets.Layout(width="auto", min_width="120px"))
        self.inputs = InputStrip()
        self.negative_upload = widgets.FileUpload(accept="image/*", multiple=True, description="Negative")
        self.negatives = InputStrip(weighted=False, empty_text="Optional: images that guidance pushes away from.")
        for upload, strip in ((self.upload, self.inputs), (self.negative_upload, self.negatives)):
            upload.observe(lambda change, upload=upload, strip=strip: self._on_upload(change, upload, strip),
                           names="value")
            upload.observe(self._on_upload_error, names="error")
        self.controls = SettingsControls(exclude=_OWN_SETTINGS)
        preset = self.controller.preset
        starting = {**dict(preset.defaults if preset else ()), **settings}  # e.g. variations: zero negative
        if starting:
            self.controls.apply(GenerationSettings.from_kwargs(**starting))
        # Structure section: an optional structure image and the edge map an "edges" run would use.
        self.structure_image: Image.Image | None = None
        self.structure_upload = widgets.FileUpload(accept="image/*", multiple=False, description="Structure")
        self.structure_upload.observe(self._on_structure_upload, names="value")
        self.edge_note = widgets.HTML()
        self.edge_preview = widgets.Image(format="png", layout=widgets.Layout(max_width="220px", display="none"))
        self.controls.structure_box.children = (
            *self.controls.structure_box.children, self.structure_upload, self.edge_note, self.edge_preview,
        )
        for name in ("structure", "canny_low", "canny_high", "height", "width"):
            self.controls[name].observe(lambda _: self._update_edge_preview(), names="value")
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.generate_button.on_click(lambda _: self.generate())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="100%"))
        self._status_text = ""
        self.status_line = widgets.HTML()  # not a Label: a Label cuts a long sentence off with an ellipsis
        self.details_text = widgets.HTML()
        self.details = widgets.Accordion(children=[self.details_text], selected_index=None,
                                         layout=widgets.Layout(display="none"))
        self.details.set_title(0, "details")
        self._say("Add an image, then press Generate.")
        self.grid = OutputGrid()
        self.history = History(
            max_items=history_size, max_bytes=history_bytes, save_dir=save_dir,
            on_use=self._use_as_input, on_rerun=self.rerun, on_saved=lambda path: self._say(f"Saved {path}."),
        )
        self.inspector = InspectorTab(controller=self.controller)
        self.tabs = widgets.Tab(children=[self.history, self.inspector])
        self.tabs.set_title(0, "History")
        self.tabs.set_title(1, "Inspector")

        left = widgets.VBox(
            [
                widgets.HBox([self.upload, widgets.HTML(UPLOAD_HINT)]),
                self.inputs,
                widgets.HBox([self.negative_upload, self.negatives]),
                self.controls,
                widgets.HBox([self.generate_button, self.cancel_button]),
                self.progress,
                self.status_line,
                self.details,
            ],
            layout=widgets.Layout(width="460px", min_width="360px"),
        )
        right = widgets.VBox([self.grid], layout=widgets.Layout(flex="1 1 auto", margin="0 0 0 12px"))
        super().__init__(children=[widgets.HBox([left, right]), self.tabs])
        self._unsubscribe = self.controller.subscribe(self._on_event)

    # -- public API ----------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """The text of the status line (progress, results, errors)."""
        return self._status_text

    @property
    def pipeline(self) -> Any:
        """The :class:`~imageprompt_widgets.ImagePromptPipeline` in use; ``None`` before the first load."""
        return self.controller.pipeline

    def __repr__(self) -> str:
        """One line where a widget cannot render (a plain console, or re-displayed after ``close()``)."""
        if self.comm is None:
            return "ImagePromptWidget(closed: create a new one with ImagePromptWidget() to continue)"
        return f"ImagePromptWidget(status={self.status!r})"

    @property
    def busy(self) -> bool:
        """Whether a run is in progress or waiting."""
        return self.controller.busy

    def set_images(self, images: Any, weights: list[float] | None = None) -> None:
        """Replace the inputs: paths, bytes, PIL images, arrays, upload values (as ``load_image`` takes)."""
        self._replace(self.inputs, images, weights)
        self._say(f"{_count(len(self.inputs.items), 'input image')} ready; press Generate.")
        self._update_edge_preview()

    def set_structure_image(self, image: Any) -> None:
        """The picture whose layout structure="edges"/"img2img" keeps (``None``: the first input image)."""
        try:
            self.structure_image = None if image is None else load_images(image)[0]
        except ImageInputError as err:
            self._report(err)
            raise
        self._update_edge_preview()

    def set_negative_images(self, images: Any) -> None:
        """Images whose embeddings become the negative conditioning (``[]`` to remove them)."""
        self._replace(self.negatives, images)
        self._say(f"{_count(len(self.negatives.items), 'negative image')} set.")

    def _replace(self, strip: InputStrip, images: Any, weights: list[float] | None = None) -> None:
        """Load every image first, so a bad one leaves the strip as it was (and is named in the status)."""
        try:
            loaded = load_images(images) if not isinstance(images, (list, tuple)) or images else []
        except ImageInputError as err:
            self._report(err)
            raise
        sources = images if isinstance(images, (list, tuple)) and len(images) == len(loaded) else [images] * len(loaded)
        strip.clear()
        strip.add(loaded, [describe_source(source) for source in sources], weights)

    def generate(self) -> Future:
        """Start a run with the current inputs and controls and return at once with its future.

        While one runs, a new run waits (one at a time; a newer press replaces a waiting one, whose
        future is then cancelled). The future's result is the
        :class:`~imageprompt_widgets.GenerationResult` (``cancelled=True`` when stopped mid-run), or
        ``None`` when the run was stopped before its first step. Errors are shown in the status line and
        raised by ``future.result()``.
        """
        try:
            images = self.inputs.images
            if not images:
                raise ImageInputError("Add an image first: upload one, or call w.set_images('path/to/image').")
            settings = self.controls.settings(weights=tuple(self.inputs.weights))
            structure_image = self.structure_image if settings.structure != "none" else None
            job = self.controller.submit(images, settings, negative_image=self.negatives.images or None,
                                         structure_image=structure_image)
        except ValueError as err:
            self._report(err)
            future: Future = Future()
            future.set_exception(err)
            return future
        return job.future

    def cancel(self) -> None:
        """Stop the running generation after its current step, and drop a waiting one."""
        self.controller.cancel()

    def rerun(self, item: HistoryItem) -> Future:
        """Run a history item's recipe again: its inputs, weights and settings."""
        self.controls.apply(item.recipe.get("settings", {}))
        self.inputs.clear()
        self.inputs.add(item.inputs, [f"input {i + 1}" for i in range(len(item.inputs))], item.weights)
        self.negatives.clear()
        self.negatives.add(item.negatives, [f"negative {i + 1}" for i in range(len(item.negatives))])
        return self.generate()

    def close(self) -> None:
        """Stop work and close every part (the kernel keeps widgets alive until they are closed)."""
        if hasattr(self, "_unsubscribe"):  # ipywidgets also closes half-built widgets whose __init__ raised
            self.controller.close()
            self._unsubscribe()
        for child in self.children:
            close_tree(child)
        if isinstance(self.layout, widgets.Widget):
            self.layout.close()
        super().close()

    # -- what the controller reports -------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """Render one controller event (on the thread the job runs on: only traits are set)."""
        if isinstance(event, BusyChanged):
            self.cancel_button.disabled = not event.busy
        elif isinstance(event, Cancelling):
            self._say("Cancelling…")
        elif isinstance(event, SubscriberFailed):
            self._details(f"Showing {type(event.event).__name__} failed: {event.error}", event.details)
        elif isinstance(event, Queued):
            replaced = " (replacing the one that was waiting)" if event.replaced is not None else ""
            self._say(f"Queued{replaced}: starts when the current run ends.")
        elif isinstance(event, Loading):
            self._say(event.message)
            download = event.download
            if download is not None and download.total:  # bytes (JavaScript counts exactly up to 2**53)
                self.progress.value = 0
                self.progress.max = download.total
                self.progress.value = min(download.done, download.total)
        elif isinstance(event, Waiting):
            self._say("Waiting for another run on the same model to finish…")
        elif isinstance(event, Started):
            self._on_started(event)
        elif isinstance(event, Step):
            self.progress.value = event.step
            self._say(self._step_text(event))
        elif isinstance(event, Preview):
            self.grid.show_previews(list(event.jpegs))
            self.previews_shown += 1
        elif isinstance(event, Finished):
            if event.job.kind == "generate":
                self._show(event.job, event.result)
            else:
                self._say(f"{event.job.kind} done in {event.job.seconds:.1f} s.")
        elif isinstance(event, Cancelled):
            self._on_cancelled(event)
        elif isinstance(event, Failed):
            self._report(event.error)

    def _on_started(self, event: Started) -> None:
        job = event.job
        self.progress.value = 0  # first, so the new max never clamps an old value
        self.progress.max = max(event.total_steps, 1)  # fixed for the whole run: it is what runs
        self._step_note = ""
        if event.reason and event.reason not in self._explained:
            self._explained.add(event.reason)
            self._step_note = f" ({event.reason})"
        if job.kind == "generate":
            self.grid.begin(job.settings.num_images)
            self.previews_shown = 0
            self._say(f"Starting: {event.total_steps} steps{self._step_note}")
        else:
            self._say(f"{job.kind}: starting ({event.total_steps} steps)")

    def _step_text(self, event: Step) -> str:
        if event.job.kind != "generate":
            return f"{event.job.kind}: step {event.step}/{event.total}"
        hint = "" if self.controller.background else " — stop with the kernel's stop button"
        return f"Step {event.step}/{event.total} · {event.steps_per_second:.1f} it/s{hint}{self._step_note}"

    def _on_cancelled(self, event: Cancelled) -> None:
        if event.interrupted:
            self._say(f"Stopped with the kernel's stop button; {_LOST_NOTHING}")
        elif not event.step and not event.idle:
            return  # stopped before its first step while another run is pending: that one reports
        elif event.step and event.total:
            self._say(f"Cancelled after step {event.step} of {event.total}; {_LOST_NOTHING}")
        elif event.ran:
            self._say("Cancelled before it started.")
        else:
            self._say(f"Cancelled; {_LOST_NOTHING}")

    def _show(self, job: Job, result: Any) -> None:
        self.grid.show_final(result.images)
        if "control_image" in result.trace.extras:  # exactly what the ControlNet saw
            self._show_edges(result.trace.extras["control_image"][0, 0], "the edge map of this run")
        self.history.add_run(result.images, result.recipe, job.images, list(job.settings.weights), job.negatives)
        self.result = result
        speed = f", {job.steps_per_second:.1f} it/s" if job.step else ""
        done = f"Done: {_count(len(result.images), 'image')} in {result.seconds:.1f} s{speed}, seed {result.settings.seed}."
        prompt = self.controls.controls.get("prompt")
        caption = result.recipe.get("caption")
        if caption and prompt is not None and not prompt.value.strip():
            prompt.value = caption  # the caption route: show BLIP's words where the user can edit them
            done += " BLIP's caption is in the prompt field: edit it and Generate again."
        self._say(done)
        try:
            self.inspector.show(result, self.controller.pipeline)
        except Exception as err:  # noqa: BLE001 - a broken view must not hide the images
            self._details(f"The inspector failed: {type(err).__name__}: {err}", traceback.format_exc())

    # -- inputs --------------------------------------------------------------------------------

    def _on_upload(self, change: dict[str, Any], upload: widgets.FileUpload, strip: InputStrip) -> None:
        files = uploaded_files(change["new"])
        if not files:
            return
        images, names, problems = [], [], []
        for file in files:
            try:
                images.append(load_upload(file))
                names.append(file.name)
            except ImageInputError as err:
                problems.append(str(err))
        strip.add(images, names)
        _clear_upload(upload)
        if strip is self.inputs:
            self._update_edge_preview()
        added = f"Added {_count(len(images), 'image')}. " if images else ""
        if problems:
            more = f" (and {len(problems) - 1} more problem(s), below)" if len(problems) > 1 else ""
            self._say(f"{added}{problems[0]}{more}", error=True)
            self._details("\n".join(problems))
        else:
            self._say(f"{added}Press Generate.")

    def _on_upload_error(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self._say(f"The upload failed in the browser ({change['new']}); try w.set_images('path/to/file').",
                      error=True)

    def _use_as_input(self, item: HistoryItem) -> None:
        self.inputs.clear()
        self.inputs.add([item.image], [f"seed {item.seed} #{item.index}"])
        self._say(f"Using seed {item.seed} #{item.index} as the input; press Generate.")

    # -- structure -----------------------------------------------------------------------------

    def _on_structure_upload(self, change: dict[str, Any]) -> None:
        files = uploaded_files(change["new"])
        if not files:
            return
        try:
            self.set_structure_image(load_upload(files[0]))
            self._say(f"Structure image {files[0].name!r} set; the Structure section uses it.")
        except ImageInputError:
            pass  # set_structure_image reported it
        finally:
            _clear_upload(self.structure_upload)

    def _update_edge_preview(self) -> None:
        """Show the edge map an "edges" run would use: the structure image (else the first input), the
        thresholds, and the run's size (the model's native size is known once it has loaded; 512 before)."""
        from .. import structure

        source = self.structure_image if self.structure_image is not None else next(iter(self.inputs.images), None)
        if self.controls["structure"].value != "edges" or source is None:
            self.edge_preview.layout.display = "none"
            self.edge_note.value = ""
            return
        native = getattr(self.controller.pipeline, "native_size", 512)
        size = structure.fit_size(source.size, self.controls["height"].value, self.controls["width"].value, native)
        try:
            edges = structure.edge_map(source, self.controls["canny_low"].value, self.controls["canny_high"].value, size)
        except ValueError as err:  # OpenCV missing: the sentence names the extra to install
            self._report(err)
            return
        self._show_edges(edges, f"edges at {size[0]}×{size[1]}")

    def _show_edges(self, edges: Any, note: str) -> None:
        from ..preview import encode_png

        if not isinstance(edges, Image.Image):  # a [H, W] tensor in 0..1 from the trace
            edges = Image.fromarray((edges.clamp(0, 1) * 255).round().byte().cpu().numpy())
        self.edge_preview.value = encode_png(edges)
        self.edge_preview.layout.display = None
        self.edge_note.value = f"<small>{html.escape(note)}</small>"

    # -- status --------------------------------------------------------------------------------

    def _say(self, text: str, error: bool = False) -> None:
        self._status_text = text
        color = "#b00020" if error else "inherit"
        self.status_line.value = f"<div style='color:{color};line-height:1.3'>{html.escape(text)}</div>"
        if not error:
            self.details.layout.display = "none"

    def _details(self, *parts: str) -> None:
        body = "\n\n".join(part for part in parts if part)
        self.details_text.value = f"<pre style='white-space:pre-wrap;font-size:11px'>{html.escape(body)}</pre>"
        self.details.layout.display = None

    def _report(self, err: BaseException) -> None:
        """One readable sentence in the status line; the traceback folded below it."""
        self._say(error_sentence(err), error=True)
        self._details("".join(traceback.format_exception(err)))


def _clear_upload(upload: widgets.FileUpload) -> None:
    """Forget the uploaded bytes (the images are decoded) so the same file can be uploaded again."""
    if hasattr(upload, "data"):  # ipywidgets 7.x: value is derived from data and metadata
        with upload.hold_trait_notifications():
            upload.metadata, upload.data = [], []
            upload.set_trait("value", {})
    else:
        upload.value = ()


def error_sentence(err: BaseException) -> str:
    """The status line for an error: our own errors are already sentences; others get one."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower():
        return ("Out of memory: try fewer images at once or a smaller size "
                "(images already generated are kept).")
    if isinstance(err, ValueError):
        return text
    return f"Generation failed ({type(err).__name__}: {text}); details below, and the panel is still usable."


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
