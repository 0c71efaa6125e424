"""ImagePromptWidget: the panel users ``display()``. A face over the engine's
:class:`~imageprompt_widgets.engine.controller.Controller`: it reads its controls into settings, hands them to
the controller, and renders what the controller reports (status, progress, previews, results, errors).

Only traits are set while a run is in progress (``Image.value``, ``IntProgress.value``, ``HTML.value``),
never ``with output:``, so updates from the worker thread render in JupyterLab, Notebook 7 and VS Code.
"""

from __future__ import annotations

import contextlib
import html
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import ipywidgets as widgets

from ..engine.controller import (
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
    preset_availability,
)
from ..engine.runners import Runner
from ..images import ImageInputError, load_images
from ..methods import (
    METHODS,
    methods_for,
    preset_capabilities,
    presets_providing,
)
from ..presets import DEFAULT_PRESET, PRESETS, Preset, runs_toy_weights
from ..settings import MODES, GenerationSettings, SettingsError, choice_label
from . import units as _units  # noqa: F401 - registers the control of the control_units setting
from .adapters import AdapterSlots
from .banner import panel_banner
from .controls import SettingsControls, set_help
from .gallery import History, HistoryItem, OutputGrid, close_tree
from .inputs import UPLOAD_HINT, InputStrip, caption_of, load_upload, show_count, uploaded_files
from .inspector import InspectorTab
from .live import LiveToggle
from .offer import DownloadOffer
from .picker import ModelPicker
from .recipe import read_recipe
from .status import count, error_sentence
from .structure import MAPS_TASK, StructureSection

#: Settings the panel sets itself instead of through a generated control.
_OWN_SETTINGS = ("weights",)
_LOST_NOTHING = "nothing from earlier runs is lost."
#: What a preset must have for a method, in words (methods.CAPABILITIES).
_CAPABILITY_WORDS = {
    "image_tokens": "an image encoder that fits its UNet",
    "text": "a text encoder",
    "ip_adapter": "an IP-Adapter",
    "captioner": "a captioner (BLIP)",
    "projector": "a trained projector (projector=...)",
}
#: The first status line, and what Generate says with nothing to draw from.
START = "Add an image and press Generate, or choose the method \u201cwords only\u201d and type a prompt."
NO_INPUT = ("Add an image first (upload one, or w.set_images('path/to/image')), or draw from words alone: the "
            "method \u201cwords only\u201d (text), or blend with image share 0, and a prompt.")
LATENTS_LABEL = "keep latents (Denoising view)"
ATTENTION_LABEL = "trace attention (Attention view)"
#: What the adapter block scales field shows while empty (the shape of diffusers' set_ip_adapter_scale dictionary).
BLOCK_SCALES_EXAMPLE = 'e.g. {"up": {"block_1": [0, 1, 0]}}'


class ImagePromptWidget(widgets.VBox):
    """Use an image as the prompt of Stable Diffusion, in a notebook.

    ``model`` is a preset name (``"sd14"``, ``"sd15"``, ``"tiny"``) or a model folder; ``pipeline`` an
    already loaded :class:`~imageprompt_widgets.ImagePromptPipeline` instead. Weights load on the first
    Generate, never on display. Keyword settings (``steps=20``) set the controls' starting values.

    ``runner`` decides where generation runs (a worker thread; inline on Colab); ``preview`` is
    ``"auto"``, ``"linear"`` or ``"taesd"`` (with ``taesd=`` a local AutoencoderTiny folder). ``loras`` are
    ``(source, weight)`` pairs loaded into the model when it loads (shown under the model picker).

    The model picker re-targets the panel: a new controller for the chosen preset (weights load on the next
    Generate). A run still going on the old model is cancelled; its previews stay, marked. Choosing a
    method the model cannot run switches to a preset that can (its offline twin for an offline model) and
    says so in the status line.
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
        loras: Sequence[tuple[str, float]] = (),
        **settings: Any,
    ) -> None:
        # Unknown model names and preview kinds fail here, at once; no weights load before the first Generate.
        self._controller_options = {"preview": preview, "taesd": taesd, "preview_interval": preview_interval,
                                    "loras": tuple(loras)}
        self.controller = Controller(model, pipeline=pipeline, runner=runner, **self._controller_options)
        GenerationSettings.from_kwargs(**settings)  # an unknown setting fails before anything is built
        self.result = None
        self.previews_shown = 0  # preview frames shown in the last run (for tests and the curious)
        self._explained: set[str] = set()  # why a run's step total differs from steps: said once per panel
        self._step_note = ""
        self._kept_negative_text = ""  # typed for a text model, put aside while a model without text is chosen
        self._grid_job: Job | None = None  # the job whose tiles the grid shows
        self._switching = False  # the panel itself is changing model or mode: observers stand still
        self._retired: list[Callable[[], None]] = []  # unsubscribers of replaced controllers still finishing

        self._build_inputs()
        self._build_controls()
        self._build_method()
        preset = self.controller.preset
        self._apply_starting_settings(preset, settings)
        self._build_generation_options()
        self._build_structure()
        self._build_run()
        self._build_outputs(history_size, history_bytes, save_dir)
        self.adapter_slots.set_adapters(preset.ip_adapters if preset is not None else ())
        self._follow_adapters()
        self.structure.follow()
        self._follow_weights()
        self._show_upload_count(self.upload, [])
        self._show_upload_count(self.negative_upload, [])

        self.banner = widgets.HTML()  # the toy world's or random weights' banner, as the notebooks show it
        self._show_banner(preset)
        super().__init__(children=[self.banner, self._lay_out()])
        self._unsubscribe = self.controller.subscribe(self._on_event)
        self.controls.set_capabilities(preset_capabilities(preset) if preset is not None else None)
        self._show_native_size()
        self.structure.built()


    # -- building the panel (each section once, in the order it is shown) -------------------------

    def _build_inputs(self) -> None:
        """Images: inputs, negatives, a recipe to load."""
        self.upload = widgets.FileUpload(accept="image/*", multiple=True, description="Upload")
        self.negative_upload = widgets.FileUpload(accept="image/*", multiple=True, description="Negative")
        self.recipe_upload = widgets.FileUpload(accept=".png,image/png", multiple=False, description="Load recipe")
        set_help(self.upload, "the images that become the prompt (several are combined)")
        set_help(self.negative_upload, "optional: images that guidance pushes away from")
        set_help(self.recipe_upload, "a PNG saved by this panel: its settings go into the controls")
        self.inputs = InputStrip()
        self.negatives = InputStrip(weighted=False, empty_text="No negative image (optional).")
        for upload, strip in ((self.upload, self.inputs), (self.negative_upload, self.negatives)):
            upload.observe(lambda change, upload=upload, strip=strip: self._on_upload(change, upload, strip),
                           names="value")
            upload.observe(self._on_upload_error, names="error")
            strip.on_change = lambda upload=upload, strip=strip: self._on_strip_change(upload, strip)
            strip.on_refused = lambda sentence: self._say(sentence, error=True)
        self.recipe_upload.observe(self._on_recipe_upload, names="value")
        self._mirroring = False

    def _build_controls(self) -> None:
        """Every setting's control, from the settings' own ranges; the images go first."""
        self.controls = SettingsControls(exclude=_OWN_SETTINGS)
        self.controls.on_refused = lambda sentence: self._say(sentence, error=True)
        self.controls.add_to(
            "images",
            widgets.HBox([self.upload, self.negative_upload, self.recipe_upload],
                         layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HTML(UPLOAD_HINT), self.inputs, self.negatives,
        )
        # Several IP-Adapters: a strip of images and a scale for each (hidden with one adapter).
        self.adapter_slots = AdapterSlots(self.controls["adapter_scales"], self.controls["scale"],
                                          self.controls.specs["adapter_scales"])
        self.adapter_slots.on_refused = lambda sentence: self._say(sentence, error=True)
        self.controls.add_to("images", self.adapter_slots)

    def _build_method(self) -> None:
        """The model picker (with its LoRAs) above the method's controls, and what follows a method change."""
        self.model_picker = ModelPicker(self.controller.preset, layout=widgets.Layout(width="96%"))
        self.lora_label = widgets.HTML(layout=widgets.Layout(margin="0 0 0 104px", display="none"))
        self.controls.add_to("method", self.model_picker, self.lora_label, first=True)
        self.model_picker.observe(self._on_model_picked, names="value")
        self.controls["mode"].observe(self._on_mode_chosen, names="value")
        self.controls["mode"].observe(lambda _: self._follow_weights(), names="value")
        self.controls["mode"].observe(lambda _: self._follow_adapters(), names="value")
        block_scales = self.controls["adapter_block_scales"]
        block_scales.placeholder = BLOCK_SCALES_EXAMPLE
        block_scales.observe(lambda _: self._on_block_scales(), names="value")
        self.controls["adapter_blocks"].observe(lambda _: self._check_adapter_blocks(), names="value")

    def _apply_starting_settings(self, preset: Preset | None, settings: dict[str, Any]) -> None:
        """The preset's starting settings (variations: a zero negative), then the caller's."""
        starting = {**dict(preset.defaults if preset else ()), **settings}  # e.g. variations: zero negative
        if starting:
            with self._quietly():
                self.controls.apply(GenerationSettings.from_kwargs(**starting), ignore=_OWN_SETTINGS)
        self._relabel_modes()

    def _build_generation_options(self) -> None:
        """Generation: keep the latents for the Denoising filmstrip, trace attention."""
        self.keep_latents = widgets.Checkbox(value=False, description=LATENTS_LABEL, indent=True,
                                            style={"description_width": "100px"},
                                            layout=widgets.Layout(width="auto"))
        set_help(self.keep_latents, "trace the latents of every step so the Inspector's Denoising tab can "
                                    "show the filmstrip (a little more memory per run)")
        self.trace_attention = widgets.Checkbox(value=False, description=ATTENTION_LABEL, indent=True,
                                                style={"description_width": "100px"},
                                                layout=widgets.Layout(width="auto"))
        set_help(self.trace_attention, "record where each prompt token acts in the picture (the Inspector's "
                                       "Attention view); off, nothing is hooked and nothing costs")
        self.controls.add_to("generation", self.keep_latents, self.trace_attention)

    def _build_structure(self) -> None:
        """The Structure section (widget/structure.py); its parts stay reachable on the panel."""
        self.structure = StructureSection(
            self.controls, self.inputs, controller=lambda: self.controller, model=lambda: self.model,
            say=self._say, report=self._report, show_upload_count=self._show_upload_count,
            mirroring=lambda: self._mirroring,
        )
        self.structure_upload, self.structure_extras = self.structure.upload, self.structure.extras
        self.unit_editor, self.maps = self.structure.unit_editor, self.structure.maps

    def _build_run(self) -> None:
        """Generate, Cancel, the live toggle, the progress bar and the status line."""
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        for button in (self.generate_button, self.cancel_button):
            button.layout.flex = "0 0 auto"  # the live toggle beside them never squeezes their words
        self.generate_button.on_click(lambda _: self.generate())
        self.live = LiveToggle(rerun=self._live_rerun, switch_model=self.set_model, model=lambda: self.model,
                               say=self._say, ready=lambda: bool(self.inputs.items) and not self._switching)
        self.live.watch(*self.controls.controls.values())
        self.inputs.on_weight = self.live.changed
        self.cancel_button.on_click(lambda _: self.cancel())
        self.big_view = widgets.ToggleButton(value=False, description="big view", icon="expand",
                                             layout=widgets.Layout(width="auto", flex="0 0 auto"))
        set_help(self.big_view, "show each picture as wide as this column (for a projector); again: side by side")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="100%"))
        self._status_text = ""
        self.status_line = widgets.HTML()  # not a Label: a Label cuts a long sentence off with an ellipsis
        self.offer = DownloadOffer()  # "download that model, or stay?": a mode change never downloads by itself
        self.details_text = widgets.HTML()
        self.details = widgets.Accordion(children=[self.details_text], selected_index=None,
                                         layout=widgets.Layout(display="none"))
        self.details.set_title(0, "details")
        self._say(START)

    def _build_outputs(self, history_size: int, history_bytes: int, save_dir: str) -> None:
        """The output grid, and History and the Inspector in tabs below it."""
        self.grid = OutputGrid()
        self.big_view.observe(lambda change: self.grid.set_big(change["new"]), names="value")
        self.history = History(
            max_items=history_size, max_bytes=history_bytes, save_dir=save_dir,
            on_use=self._use_as_input, on_rerun=self.rerun, on_saved=lambda path: self._say(f"Saved {path}."),
            on_exported=lambda path: self._say(f"Exported the run's trace to {path} (safetensors; "
                                               "Trace.load reads it back)."),
        )
        self.inspector = InspectorTab(controller=self.controller)
        self.tabs = widgets.Tab(children=[self.history, self.inspector])
        self.tabs.set_title(0, "History")
        self.tabs.set_title(1, "Inspector")
        # The Inspector draws only while its tab is on screen (and then only the section that is open).
        self.inspector.set_visible(self.tabs.selected_index == 1)
        self.tabs.observe(lambda change: self.inspector.set_visible(change["new"] == 1), names="selected_index")

    def _lay_out(self) -> widgets.HBox:
        """Controls on the left; run, status, grid and history on the right, side by side where the notebook
        is wide enough (both columns may shrink to their minimum, then the right one wraps below)."""
        left = widgets.VBox([self.controls], layout=widgets.Layout(flex="1 1 360px", min_width="340px",
                                                                   max_width="470px", margin="0 16px 0 0"))
        right = widgets.VBox(
            [widgets.HBox([self.generate_button, self.cancel_button, self.live, self.big_view],
                          layout=widgets.Layout(flex_flow="row wrap")), self.progress, self.status_line,
             self.offer, self.details, self.grid, self.tabs],
            layout=widgets.Layout(flex="1 1 420px", min_width="320px"),
        )
        self.columns = widgets.HBox([left, right], layout=widgets.Layout(flex_flow="row wrap", width="100%"))
        return self.columns

    # -- public API ----------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """The text of the status line (progress, results, errors)."""
        return self._status_text

    @property
    def pipeline(self) -> Any:
        """The :class:`~imageprompt_widgets.ImagePromptPipeline` in use; ``None`` before the first load."""
        return self.controller.pipeline

    @property
    def model(self) -> str | None:
        """The name of the chosen preset (or model folder)."""
        preset = self.controller.preset
        return preset.name if preset is not None else None

    def set_model(self, model: str) -> None:
        """Choose a preset, as the model picker does (weights load on the next Generate)."""
        if model not in self.model_picker.presets:
            error = ValueError(f"Unknown model {model!r}: pick one of {', '.join(self.model_picker.presets)}.")
            self._report(error)
            raise error
        self.model_picker.value = model

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
        self._say(f"{count(len(self.inputs.items), 'input image')} ready; press Generate.")

    def set_structure_image(self, image: Any, unit: int = 1) -> None:
        """The picture whose layout a structure run keeps (``None``: the first input image). ``unit`` is the
        ControlNet it is for, numbered as in the Structure section: 1 the structure's own (and img2img's), 2… the
        added ones (``None`` there: they read the structure image again)."""
        self.structure.set_image(image, unit)

    def set_negative_images(self, images: Any) -> None:
        """Images whose embeddings become the negative conditioning (``[]`` to remove them)."""
        self._replace(self.negatives, images)
        self._say(f"{count(len(self.negatives.items), 'negative image')} set.")

    def _replace(self, strip: InputStrip, images: Any, weights: list[float] | None = None) -> None:
        """Load every image first, so a bad one leaves the strip as it was (and is named in the status)."""
        try:
            loaded = load_images(images) if not isinstance(images, (list, tuple)) or images else []
        except ImageInputError as err:
            self._report(err)
            raise
        sources = images if isinstance(images, (list, tuple)) and len(images) == len(loaded) else [images] * len(loaded)
        with self.structure.held():
            strip.clear()
            strip.add(loaded, [caption_of(source) for source in sources], weights)

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
            settings = self.controls.settings(weights=tuple(self.inputs.weights))
            if self.offer.asking:
                raise SettingsError(f"{self.controller.preset.name!r} cannot run {settings.mode}: answer the question "
                                    "above (download the model that can, or stay).")
            if not images and not settings.text_only:
                raise ImageInputError(NO_INPUT)
            if not images and not settings.prompt.strip():
                raise SettingsError("Type a prompt first: a words-only run draws what it names.")
            adapter_images = self.adapter_slots.adapter_images(images) if settings.mode == "ip_adapter" else None
            job = self.controller.submit(images, settings, negative_image=self.negatives.images or None,
                                         structure_image=self.structure.run_images(settings, images),
                                         adapter_images=adapter_images, trace_latents=self.keep_latents.value,
                                         trace_attention=self.trace_attention.value)
        except ValueError as err:
            self._report(err)
            future: Future = Future()
            future.set_exception(err)
            return future
        return job.future

    def cancel(self) -> None:
        """Stop the running generation after its current step, and drop a waiting one."""
        self.controller.cancel()

    def _live_rerun(self) -> None:
        """Live mode: the newest settings run next; a running run stops after its step (a waiting one is
        replaced by the controller). Changes the panel makes itself (a model switch, a recipe) start nothing
        (``ready`` says so)."""
        if self.controller.busy:
            self.controller.cancel()
        self.generate()

    def _show_loras(self) -> None:
        """The LoRAs in the loaded model, read-only under the picker (hidden when there are none)."""
        line = self.controller.loras_line()
        if line is None:
            self.lora_label.layout.display = "none"
            return
        self.lora_label.value = f"<small>{html.escape(line)}</small>"
        self.lora_label.layout.display = None

    def rerun(self, item: HistoryItem) -> Future:
        """Run a history item's recipe again: its model, inputs, weights and settings."""
        with self.structure.held():
            self._apply_recipe(item.recipe)
            self.inputs.clear()
            self.inputs.add(item.inputs, [f"input {i + 1}" for i in range(len(item.inputs))], item.weights)
        self.negatives.clear()
        self.negatives.add(item.negatives, [f"negative {i + 1}" for i in range(len(item.negatives))])
        return self.generate()

    def load_recipe(self, source: Any, name: str | None = None) -> dict[str, Any]:
        """Put the recipe of a PNG this package saved (a path, bytes or file object) into the controls, like
        "PNG info" elsewhere: its model, method and every setting. The input images are not in the PNG.

        Anything wrong — no recipe, a value outside a control's range, an unknown setting or choice —
        raises a ``ValueError`` subclass (``RecipeError``, ``SettingsError``), says it in the status line and
        leaves every control as it was. Returns the recipe.
        """
        try:
            recipe = read_recipe(source, name)
            self._check_recipe(recipe)
        except ValueError as err:
            self._report(err)
            raise
        self._apply_recipe(recipe)
        settings = recipe["settings"]
        label = name or (caption_of(source) if isinstance(source, (str, os.PathLike)) else "the PNG")
        inputs_count = len(recipe.get("inputs") or ())
        inputs = f"add the same {count(inputs_count, 'input image')} and " if inputs_count else ""
        self._say(f"Loaded the recipe of {label}: {settings.get('mode', 'repeat')}, seed {settings.get('seed', 0)}, "
                  f"model {self.model!r}. To make it again, {inputs}press Generate.")
        return recipe

    def _check_recipe(self, recipe: dict[str, Any]) -> None:
        """Raise if the recipe cannot be put into the controls (nothing is changed)."""
        self.controls.check(recipe["settings"], ignore=_OWN_SETTINGS)
        weights = recipe["settings"].get("weights") or ()
        GenerationSettings.from_kwargs(weights=weights)  # the per-image weights' own range

    def _apply_recipe(self, recipe: dict[str, Any]) -> None:
        """Switch to the recipe's model where it names a preset of the picker, then set every control."""
        settings = recipe.get("settings", {})
        model = (recipe.get("model") or {}).get("preset")
        with self.structure.held():
            if model in self.model_picker.presets and model != self.model:
                self.model_picker.value = model
            with self._quietly():
                self.controls.apply(settings, ignore=_OWN_SETTINGS)
        self._on_mode_chosen()  # a recipe from a model that is no preset here: a method this one lacks switches
        weights = list(settings.get("weights") or ())
        if weights and len(weights) == len(self.inputs.items):
            for item, weight in zip(self.inputs.items, weights):
                item.weight.value = weight

    def close(self) -> None:
        """Stop work and close every part (the kernel keeps widgets alive until they are closed)."""
        if hasattr(self, "_unsubscribe"):  # ipywidgets also closes half-built widgets whose __init__ raised
            self.controller.close()
            self._unsubscribe()
            for unsubscribe in self._retired:
                unsubscribe()
        for child in self.children:
            close_tree(child)
        if isinstance(self.layout, widgets.Widget):
            self.layout.close()
        super().close()

    # -- model and method ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _quietly(self) -> Iterator[None]:
        """The panel sets the model or the mode itself: the observers that react to a user's choice wait."""
        before, self._switching = self._switching, True
        try:
            yield
        finally:
            self._switching = before

    def _on_model_picked(self, change: Any) -> None:
        if self.model_picker.relabelling or self._switching or change["new"] == self.model:
            return
        self._switch_model(self.model_picker.preset(change["new"]))

    def _switch_model(self, preset: Preset, why: str = "") -> None:
        """Re-target the panel: a new controller for ``preset`` on the same runner. A run of the old one is
        cancelled; the old controller is listened to until its last job has ended (its tiles get marked)."""
        self.offer.withdraw()
        old = self.controller
        running = old.busy
        if running:
            old.cancel()
            self._retire(old)
        self._unsubscribe()
        self.controller = Controller(preset, runner=old.runner, **self._controller_options)
        self._unsubscribe = self.controller.subscribe(self._on_event)
        self.inspector.controller = self.controller
        self.inspector.clear()  # its replays would run on the new model
        self.cancel_button.disabled = not running
        self.structure.forget_maps()  # another model, maybe another depth estimator
        self.adapter_slots.set_adapters(preset.ip_adapters)
        mode = self.controls["mode"].value
        with self._quietly(), self.structure.held():
            if self.model_picker.value != preset.name:
                self.model_picker.value = preset.name
            self._apply_preset_defaults(old.preset, preset)
            self.structure.refresh()  # another model's size and depth estimator
        # A method only the old model ran (revision is SDXL's) became the new one's first: say so, not silently.
        moved = (f" {mode} does not run on {preset.name!r}: the method is now {self.controls['mode'].value}."
                 if mode not in methods_for(preset) and self.controls["mode"].value != mode else "")
        self._relabel_modes()
        self._follow_adapters()
        self._show_banner(preset)
        self.controls.set_capabilities(preset_capabilities(preset))
        self._show_native_size()
        self._show_loras()
        found = preset_availability(preset)
        where = ", ".join(part for part in ("offline" if preset.offline_builder else found.download, found.status) if part)
        cost = " The next Generate downloads it, with progress here." if not found.ready else ""
        stopped = " The running generation was cancelled; its previews stay, marked." if running else ""
        chosen = f"switched to model {preset.name!r}" if why else f"Model {preset.name!r} chosen"
        self._say(f"{why}{chosen} ({where}).{moved}{cost}{stopped}")

    def _show_native_size(self) -> None:
        """The size controls' "native" option names the chosen model's side: the loaded model's own, else the
        known one of a real preset (1024 for SDXL, 512 for SD 1.x); a twin's or a folder's is known once loaded."""
        preset, pipeline = self.controller.preset, self.controller.pipeline
        native = getattr(pipeline, "native_size", None) if pipeline is not None else None
        if native is None and preset is not None and preset.name in PRESETS and not preset.offline_builder \
                and not runs_toy_weights(preset):
            native = 1024 if preset.is_sdxl else 512
        with self._quietly():
            self.controls.set_native_size(native)

    def _show_banner(self, preset: Preset | None) -> None:
        """Above the panel, for a model whose pictures are not real Stable Diffusion's: what they are."""
        banner = panel_banner(preset) if preset is not None else None
        self.banner.value = banner._repr_html_() if banner is not None else ""
        self.banner.layout.display = None if banner is not None else "none"

    def _retire(self, old: Controller) -> None:
        """Keep rendering the end of ``old``'s jobs (marks on the tiles, a result that still arrives)."""
        holder: list[Callable[[], None]] = []

        def on_event(event: Event) -> None:
            if isinstance(event, (Cancelled, Failed)):
                self._stop_grid(event)
            elif isinstance(event, Finished) and event.job.kind == "generate":
                self._show(event.job, event.result)
            if isinstance(event, (Finished, Cancelled, Failed)) and event.idle and holder:
                unsubscribe = holder.pop()
                unsubscribe()
                if unsubscribe in self._retired:
                    self._retired.remove(unsubscribe)
                self.cancel_button.disabled = not self.controller.busy

        holder.append(old.subscribe(on_event))
        self._retired.append(holder[0])

    def _apply_preset_defaults(self, old: Preset | None, new: Preset) -> None:
        """The new preset's own starting settings (variations: one token, zero negative); the old one's
        are undone where the user left them as they were; a method the new model lacks becomes its first."""
        library = GenerationSettings()
        changes = {name: getattr(library, name) for name, value in (old.defaults if old else ())
                   if name in self.controls.controls and self.controls[name].value == value}
        changes.update(dict(new.defaults))
        # A model without SD's text encoder reads no negative text (and its zeros negative refuses one): the text
        # is kept aside and comes back with the next model that reads it.
        negative_text = self.controls["negative_prompt"]
        if "text" not in preset_capabilities(new) and negative_text.value.strip():
            self._kept_negative_text = negative_text.value
            changes["negative_prompt"] = ""
        elif "text" in preset_capabilities(new) and self._kept_negative_text and not negative_text.value.strip():
            changes["negative_prompt"], self._kept_negative_text = self._kept_negative_text, ""
        offered = methods_for(new)
        if changes.get("mode", self.controls["mode"].value) not in offered and offered:
            changes["mode"] = offered[0]
        self.controls.apply(changes, ignore=_OWN_SETTINGS)

    def _on_mode_chosen(self, change: Any = None) -> None:
        """A method the model cannot run: move to a preset on this machine that can, and say so; where only a
        download can run it, ask (one line, a download button and a stay button): a mode change never starts a
        download on its own."""
        preset = self.controller.preset
        mode = self.controls["mode"].value
        if self._switching:
            return
        self.offer.withdraw()
        if preset is None or mode in methods_for(preset):
            return
        target = self._preset_for(mode, preset)
        if target is None:
            return
        lacking = sorted(METHODS[mode].needs - preset_capabilities(preset))
        words = " and ".join(_CAPABILITY_WORDS.get(need, need) for need in lacking)
        why = f"{mode} needs {words}, which {preset.name!r} lacks: "
        found = preset_availability(self.model_picker.presets[target])
        if found.ready:
            self._switch_model(self.model_picker.presets[target], why=why)
            return
        stay = change["old"] if isinstance(change, dict) and change.get("old") in methods_for(preset) \
            else methods_for(preset)[0]
        size = found.download or "a download"
        self._say(f"{why}{target!r} can, and downloads {size} first. Download it, or stay on {preset.name!r}?")
        self.offer.ask(download=f"Download {target} ({size})", stay=f"Stay on {preset.name}",
                       on_download=lambda: self._switch_model(self.model_picker.presets[target], why=why),
                       on_stay=lambda: self._stay(stay, preset.name))

    def _stay(self, mode: str, model: str) -> None:
        """The stay button: the method goes back to one the model runs; nothing is downloaded."""
        with self._quietly():
            self.controls["mode"].value = mode
        self._follow_weights()
        self._follow_adapters()
        self._say(f"Stayed on model {model!r} with {mode}; nothing is downloaded.")

    def _preset_for(self, mode: str, current: Preset) -> str | None:
        """The preset to move to for ``mode``: one of the same family (SD 1.x or SDXL) where there is one. From a
        real model: a real preset, one already on this machine first, then one with the same Stable Diffusion, the
        default. From the toy world or a random-weight model: one that needs no download, the toy world's (trained)
        before the random twins."""
        presets = self.model_picker.presets
        found = {name: preset_availability(preset) for name, preset in presets.items()}

        def toy(name: str) -> bool:  # the toy world's trained weights ship inside the package
            return found[name].state == "shipped"

        real = current.name not in presets or not (presets[current.name].offline_builder or toy(current.name))
        candidates = [name for name in presets_providing(mode)
                      if name in presets and (not presets[name].offline_builder and not toy(name)) == real]
        if not candidates:
            return METHODS[mode].twin

        def other_family(name: str) -> bool:  # from SDXL an SDXL preset (its adapter twin), from SD 1.x an SD 1.x one
            return presets[name].family != current.family

        if real:
            return min(candidates, key=lambda name: (other_family(name), not found[name].ready,
                                                     presets[name].sd_model != current.sd_model, name != DEFAULT_PRESET))
        return min(candidates, key=lambda name: (other_family(name), not found[name].ready, not toy(name),
                                                 name != METHODS[mode].twin))

    def _relabel_modes(self) -> None:
        """Every method in the mode dropdown, in plain words; one this model cannot run names the model it moves
        to (or that it asks to download)."""
        preset = self.controller.preset
        offered = methods_for(preset) if preset is not None else list(MODES)
        control = self.controls["mode"]
        options = []
        for mode in MODES:
            label = choice_label("mode", mode)
            if mode not in offered:
                target = self._preset_for(mode, preset)
                ready = preset_availability(self.model_picker.presets[target]).ready if target else True
                label += f" → model {target}" if ready else f" → asks to download {target}"
            options.append((label, mode))
        with self._quietly():
            value = control.value
            control.options = options
            control.value = value

    def _follow_adapters(self) -> None:
        self.adapter_slots.show_for(self.controls["mode"].value == "ip_adapter")

    def _on_block_scales(self) -> None:
        """Per-block scales typed: a sentence at once when they do not parse; a dictionary means
        ``adapter_blocks="custom"`` (as the engine reads one), and clearing it goes back to ``all``."""
        if self._switching:
            return  # a recipe or preset sets both fields itself
        text = self.controls["adapter_block_scales"].value
        blocks = self.controls["adapter_blocks"]
        try:
            GenerationSettings(adapter_block_scales=text) if text.strip() else None
        except SettingsError as err:
            self._say(str(err), error=True)
            return
        with self._quietly():
            if text.strip() and blocks.value != "custom":
                blocks.value = "custom"
                self._say("adapter blocks is now custom: the per-block scales choose the blocks.")
            elif not text.strip() and blocks.value == "custom":
                blocks.value = "all"
                self._say("adapter blocks is back to all: no per-block scales.")

    def _check_adapter_blocks(self) -> None:
        """A named block choice beside per-block scales, or custom without them: the engine's sentence, at once."""
        if self._switching:
            return
        try:
            GenerationSettings(adapter_blocks=self.controls["adapter_blocks"].value,
                               adapter_block_scales=self.controls["adapter_block_scales"].value)
        except SettingsError as err:
            self._say(str(err), error=True)

    def _follow_weights(self) -> None:
        self.inputs.show_weights("weights" in self.controls.settings_read())

    # -- what the controller reports -------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """Render one controller event (on the thread the job runs on: only traits are set)."""
        job = getattr(event, "job", None)
        if job is not None and job.kind == MAPS_TASK and not isinstance(event, (Queued, Loading, Waiting)):
            pass  # the Structure section's maps show themselves (_compute_maps); the status line stays
        elif isinstance(event, BusyChanged):
            self.cancel_button.disabled = not event.busy
        elif isinstance(event, Cancelling):
            self._say("Cancelling…")
        elif isinstance(event, SubscriberFailed):
            self._details(f"Showing {type(event.event).__name__} failed: {event.error}", event.details)
        elif isinstance(event, Queued):
            replaced = " (replacing the one that was waiting)" if event.replaced is not None else ""
            self._say(f"Queued{replaced}: starts when the current run ends.")
        elif isinstance(event, Loading):
            self._on_loading(event)
        elif isinstance(event, Waiting):
            self._say("Waiting for another run on the same model to finish…")
        elif isinstance(event, Started):
            self._on_started(event)
        elif isinstance(event, Step):
            self.progress.value = event.step
            self._say(self._step_text(event), hover=f"{event.steps_per_second:.1f} UNet steps per second (it/s)")
        elif isinstance(event, Preview):
            if event.job is self._grid_job:
                self.grid.show_previews(list(event.jpegs))
                self.previews_shown += 1
        elif isinstance(event, Finished):
            if event.job.kind == "generate":
                self.progress.bar_style = "success"
                self._show(event.job, event.result)
            else:
                self._say(f"{event.job.kind} done in {event.job.seconds:.1f} s.")
        elif isinstance(event, Cancelled):
            self._on_cancelled(event)
        elif isinstance(event, Failed):
            self.progress.bar_style = "danger"
            self._stop_grid(event)
            self._report(event.error)
        if isinstance(event, (Finished, Cancelled, Failed)) and event.idle:
            self.structure.controller_idle()

    def _begin_grid(self, job: Job, text: str) -> None:
        if job.kind != "generate":
            return
        if job is not self._grid_job:
            self._grid_job = job
            self.grid.begin(job.settings.num_images, text)
            self.previews_shown = 0
        else:
            self.grid.say(text)

    def _on_loading(self, event: Loading) -> None:
        self._say(event.message)
        download = event.download
        self._begin_grid(event.job, "Downloading the model…" if download is not None else "Loading the model…")
        if download is not None and download.total:  # bytes (JavaScript counts exactly up to 2**53)
            self.progress.bar_style = "info"
            self.progress.value = 0
            self.progress.max = download.total
            self.progress.value = min(download.done, download.total)

    def _on_started(self, event: Started) -> None:
        job = event.job
        self.progress.bar_style = ""
        self.progress.value = 0  # first, so the new max never clamps an old value
        self.progress.max = max(event.total_steps, 1)  # fixed for the whole run: it is what runs
        self._step_note = ""
        if event.reason and event.reason not in self._explained:
            self._explained.add(event.reason)
            self._step_note = f" ({event.reason})"
        if job.kind == "generate":
            self._begin_grid(job, "Waiting for the first step…")
            self._say(f"Starting: {event.total_steps} steps{self._step_note}")
            self.model_picker.refresh()  # the model is on this machine now
            self._show_loras()
        else:
            self._say(f"{job.kind}: starting ({event.total_steps} steps)")

    def _step_text(self, event: Step) -> str:
        if event.job.kind != "generate":
            return f"{event.job.kind}: step {event.step}/{event.total}"
        hint = "" if self.controller.background else " — stop with the kernel's stop button"
        return f"Step {event.step}/{event.total}{hint}{self._step_note}"

    def _on_cancelled(self, event: Cancelled) -> None:
        self._stop_grid(event)
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
        self.progress.bar_style = "warning"

    def _stop_grid(self, event: Cancelled | Failed) -> None:
        """The grid's run ended without images: its previews stay, marked; empty tiles say why."""
        if event.job is not self._grid_job:
            return
        job = event.job
        where = f" at step {job.step}/{job.total}" if job.step and job.total else ""
        if isinstance(event, Failed):
            self.grid.stop(f"failed{where}: a preview, not a finished image", "No image: the run failed.")
        else:
            self.grid.stop(f"cancelled{where}: a preview, not a finished image",
                           "Cancelled before the first step.")

    def _show(self, job: Job, result: Any) -> None:
        if job is self._grid_job:
            self.grid.show_final(result.images)
        self.structure.show_run_maps(result)
        self.history.add_run(result.images, result.recipe, job.images, list(job.settings.weights), job.negatives,
                             result.trace)
        self.result = result
        self._show_native_size()  # the model has loaded: its own native size is known now
        speed = f"{job.steps_per_second:.1f} UNet steps per second (it/s)" if job.step else ""
        hover = "; ".join(part for part in (speed, result.describe_timings()) if part)
        done = f"Done: {count(len(result.images), 'image')} in {result.seconds:.1f} s, seed {result.settings.seed}."
        prompt = self.controls.controls.get("prompt")
        caption = result.recipe.get("caption")
        if caption and prompt is not None and not prompt.value.strip():
            prompt.value = caption  # the caption route: show BLIP's words where the user can edit them
            done += " BLIP's caption is in the prompt field: edit it and Generate again."
        self._say(done, hover=hover)
        try:
            labels = self.inputs.names if len(self.inputs.items) == len(job.images) else None
            self.inspector.show(result, self.controller.pipeline, inputs=job.images, adapter_images=job.adapter_images,
                                labels=labels, defer=self.live.value)  # a live run draws nothing on its thread
        except Exception as err:  # noqa: BLE001 - a broken view must not hide the images
            self._details(f"The inspector failed: {type(err).__name__}: {err}", traceback.format_exc())

    # -- inputs --------------------------------------------------------------------------------

    def _show_upload_count(self, upload: widgets.FileUpload, names: list[str]) -> None:
        """The upload button's counter shows how many images are in (not how many the last pick had)."""
        self._mirroring = True
        try:
            show_count(upload, names)
        finally:
            self._mirroring = False

    def _on_upload(self, change: dict[str, Any], upload: widgets.FileUpload, strip: InputStrip) -> None:
        if self._mirroring:
            return
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
        added = f"Added {count(len(images), 'image')}. " if images else ""
        if problems:
            more = f" (and {len(problems) - 1} more problem(s), below)" if len(problems) > 1 else ""
            self._say(f"{added}{problems[0]}{more}", error=True)
            self._details("\n".join(problems))
        else:
            self._say(f"{added}Press Generate.")

    def _on_strip_change(self, upload: widgets.FileUpload, strip: InputStrip) -> None:
        """Images added to or removed from a strip: the button counts them; the inputs' first one is the
        structure's default picture."""
        self._show_upload_count(upload, strip.names)
        if strip is self.inputs:
            self.structure.refresh()
        self.live.changed()

    def _on_upload_error(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self._say(f"The upload failed in the browser ({change['new']}); try w.set_images('path/to/file').",
                      error=True)

    def _on_recipe_upload(self, change: dict[str, Any]) -> None:
        if self._mirroring:
            return
        files = uploaded_files(change["new"])
        if not files:
            return
        file = files[-1]
        try:
            self.load_recipe(file.content, name=file.name)
        except ValueError:
            self._show_upload_count(self.recipe_upload, [])  # load_recipe said why
        else:
            self._show_upload_count(self.recipe_upload, [file.name])

    def _use_as_input(self, item: HistoryItem) -> None:
        with self.structure.held():
            self.inputs.clear()
            self.inputs.add([item.image], [f"seed {item.seed} #{item.index}"])
        self._say(f"Using seed {item.seed} #{item.index} as the input; press Generate.")

    # -- status --------------------------------------------------------------------------------

    def _say(self, text: str, error: bool = False, hover: str = "") -> None:
        """The status line in plain words; ``hover`` holds the technical detail (speed, stage timings)."""
        self._status_text = text
        color = "#b00020" if error else "inherit"
        title = f" title='{html.escape(hover, quote=True)}'" if hover else ""
        self.status_line.value = f"<div style='color:{color};line-height:1.3'{title}>{html.escape(text)}</div>"
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
