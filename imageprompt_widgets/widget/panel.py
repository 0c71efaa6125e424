"""ImagePromptWidget: the panel users ``display()``. A view over the engine: it reads its controls into
settings, runs the pipeline on a runner, and shows progress, previews, results and errors.

Only traits are set while a run is in progress (``Image.value``, ``IntProgress.value``, ``Label.value``),
never ``with output:``, so updates from the worker thread render in JupyterLab, Notebook 7 and VS Code.
"""

from __future__ import annotations

import html
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets
from PIL import Image

from ..concurrency import CancelEvent
from ..images import ImageInputError, describe_source, load_images
from ..presets import Preset, resolve_preset
from ..settings import GenerationSettings
from .controls import SettingsControls
from .gallery import History, HistoryItem, OutputGrid, close_tree
from .inputs import UPLOAD_HINT, InputStrip, load_upload, uploaded_files
from .inspector import InspectorTab
from .runner import Runner, default_runner

#: Seconds between preview images (a few per second: the server drops output above ~1000 messages/s).
PREVIEW_INTERVAL = 0.25
#: Seconds between progress/status updates.
PROGRESS_INTERVAL = 1 / 20
#: The status while a cancel is on its way (replaced by the job's own last word, or by "Cancelled").
_CANCELLING = "Cancelling…"
#: Settings the panel sets itself instead of through a generated control.
_OWN_SETTINGS = ("weights",)


@dataclass(eq=False)
class _Job:
    """One press of Generate: what to run, frozen at the moment of the press."""

    images: list[Image.Image]
    weights: list[float]
    negatives: list[Image.Image]
    settings: GenerationSettings
    structure_image: Image.Image | None = None  # the Structure section's own image; None: the first input
    cancel: CancelEvent = field(default_factory=CancelEvent)
    future: Future | None = None
    last_step: Any = None  # the last StepInfo seen


class _Throttle:
    """``ready()`` is True at most once per ``interval`` seconds (the first call always)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True


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
        from ..preview import PREVIEW_KINDS

        if preview not in PREVIEW_KINDS:
            raise ValueError(f"preview={preview!r} is not one of {', '.join(PREVIEW_KINDS)}.")
        self._preset = None if pipeline is not None else resolve_preset(model)  # unknown names fail here, at once
        self._pipeline = pipeline
        self._runner = runner or default_runner()
        self._preview_kind, self._taesd = preview, taesd
        self._preview_interval = preview_interval
        self._decoder: tuple[Any, Any] | None = None  # (pipeline, decoder)
        self._lock = threading.RLock()
        self._pending: list[_Job] = []  # the running job first, then at most one waiting
        self.result = None
        self.previews_shown = 0  # preview frames sent in the last run (for tests and the curious)

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
        preset = self._preset or getattr(pipeline, "preset", None)
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
        self.inspector = InspectorTab()
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

    # -- public API ----------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """The text of the status line (progress, results, errors)."""
        return self._status_text

    @property
    def pipeline(self) -> Any:
        """The :class:`~imageprompt_widgets.ImagePromptPipeline` in use; ``None`` before the first load."""
        return self._pipeline

    def __repr__(self) -> str:
        """One line where a widget cannot render (a plain console, or re-displayed after ``close()``)."""
        if self.comm is None:
            return "ImagePromptWidget(closed: create a new one with ImagePromptWidget() to continue)"
        return f"ImagePromptWidget(status={self.status!r})"

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._pending)

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
            job = self._new_job()
        except ValueError as err:
            self._report(err)
            future: Future = Future()
            future.set_exception(err)
            return future
        with self._lock:
            waiting = self._pending[1:]
            for old in waiting:
                self._drop(old)
            queued = bool(self._pending)
            self._pending.append(job)
            self.cancel_button.disabled = False
        if queued:
            replaced = " (replacing the one that was waiting)" if waiting else ""
            self._say(f"Queued{replaced}: starts when the current run ends.")
        job.future = self._runner.submit(lambda: self._run(job))
        return job.future

    def cancel(self) -> None:
        """Stop the running generation after its current step, and drop a waiting one."""
        with self._lock:
            jobs = list(self._pending)
            if jobs:  # said before any job is stopped, so a job's own last word comes after it
                self._say(_CANCELLING)
        for job in jobs:
            self._drop(job)
        self._settle_cancel()

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
        if hasattr(self, "_runner"):  # ipywidgets also closes half-built widgets whose __init__ raised
            self.cancel()
            self._runner.shutdown()
        for child in self.children:
            close_tree(child)
        if isinstance(self.layout, widgets.Widget):
            self.layout.close()
        super().close()

    # -- running -------------------------------------------------------------------------------

    def _new_job(self) -> _Job:
        images, weights = self.inputs.images, self.inputs.weights
        if not images:
            raise ImageInputError("Add an image first: upload one, or call w.set_images('path/to/image').")
        settings = self.controls.settings(weights=tuple(weights))
        structure_image = self.structure_image if settings.structure != "none" else None
        return _Job(images, weights, self.negatives.images, settings, structure_image)

    def _drop(self, job: _Job) -> None:
        job.cancel.set()  # a running job stops after its current step and removes itself
        never_runs = job.future is not None and job.future.cancel()  # True only for a job still waiting
        with self._lock:
            if never_runs and job in self._pending:
                self._pending.remove(job)
            self.cancel_button.disabled = not self._pending

    def _run(self, job: _Job) -> Any:
        try:
            if job.cancel.is_set():
                self._say("Cancelled before it started.")
                return None
            self.grid.begin(job.settings.num_images)
            self.progress.value, self.progress.max = 0, job.settings.steps
            self.previews_shown = 0
            pipe = self._load_pipeline()
            decoder = self._preview_decoder(pipe)
            if not self._wait_for(pipe, job):
                self._say("Cancelled before it started.")
                return None
            try:
                negative = {"negative_image": job.negatives} if job.negatives else {}
                result = pipe.generate(job.images, job.settings, on_step=self._step_reporter(job, decoder),
                                       cancel=job.cancel, structure_image=job.structure_image, **negative)
            finally:
                pipe.lock.release()
            self._show(job, result, pipe)
            return result
        except KeyboardInterrupt:  # the kernel's stop button, when running inline (Colab)
            self._say("Stopped with the kernel's stop button; nothing from earlier runs is lost.")
            return None
        except Exception as err:
            self._report(err)
            raise
        finally:
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
                self.cancel_button.disabled = not self._pending
            self._settle_cancel()

    def _settle_cancel(self) -> None:
        """Once nothing is pending, "Cancelling…" must not stay (jobs dropped from the queue never report)."""
        with self._lock:
            if not self._pending and self._status_text == _CANCELLING:
                self._say("Cancelled; nothing from earlier runs is lost.")

    def _load_pipeline(self) -> Any:
        if self._pipeline is None:
            from ..pipeline import ImagePromptPipeline

            preset = self._preset
            size = f" ({preset.download_size})" if preset.download_size else ""
            self._say(f"Loading model {preset.name!r}{size}; the first time takes a while…")
            self._pipeline = ImagePromptPipeline.from_preset(preset, on_status=self._say)
        return self._pipeline

    def _preview_decoder(self, pipe: Any) -> Any:
        if self._decoder is None or self._decoder[0] is not pipe:
            from ..preview import decoder_for

            self._decoder = (pipe, decoder_for(pipe, self._preview_kind, self._taesd))
        return self._decoder[1]

    def _wait_for(self, pipe: Any, job: _Job) -> bool:
        """Take the pipeline's lock (another widget may be using it); False if cancelled meanwhile."""
        return pipe.lock.acquire(
            job.cancel, on_wait=lambda: self._say("Waiting for another run on the same model to finish…")
        )

    def _step_reporter(self, job: _Job, decoder: Any) -> Any:
        from ..preview import preview_jpegs

        progress, previews = _Throttle(PROGRESS_INTERVAL), _Throttle(self._preview_interval)
        hint = "" if self._runner.background else " — stop with the kernel's stop button"

        def on_step(info: Any) -> None:
            job.last_step = info
            if progress.ready() or info.step == info.total:
                self.progress.max = info.total
                self.progress.value = info.step
                self._say(f"Step {info.step}/{info.total} · {info.steps_per_second:.1f} it/s{hint}")
            if previews.ready() and not job.cancel.is_set():
                self.grid.show_previews(preview_jpegs(info.x0(), decoder))
                self.previews_shown += 1

        return on_step

    def _show(self, job: _Job, result: Any, pipe: Any) -> None:
        step = job.last_step
        if result.cancelled:
            where = f" after step {step.step} of {step.total}" if step is not None else ""
            self._say(f"Cancelled{where}; nothing from earlier runs is lost.")
            return
        self.grid.show_final(result.images)
        if "control_image" in result.trace.extras:  # exactly what the ControlNet saw
            self._show_edges(result.trace.extras["control_image"][0, 0], "the edge map of this run")
        self.history.add_run(result.images, result.recipe, job.images, job.weights, job.negatives)
        self.result = result
        speed = f", {step.steps_per_second:.1f} it/s" if step is not None else ""
        done = f"Done: {_count(len(result.images), 'image')} in {result.seconds:.1f} s{speed}, seed {result.settings.seed}."
        prompt = self.controls.controls.get("prompt")
        caption = result.recipe.get("caption")
        if caption and prompt is not None and not prompt.value.strip():
            prompt.value = caption  # the caption route: show BLIP's words where the user can edit them
            done += " BLIP's caption is in the prompt field: edit it and Generate again."
        self._say(done)
        try:
            self.inspector.show(result, pipe)
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
        native = getattr(self._pipeline, "native_size", 512)
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
