"""The panel's Structure section: the structure image, the ControlNet units and a preview of every unit's map.

Maps are what the next run would feed its ControlNets: Canny edges at once, here; depth maps need the
estimator, so they are a controller task (off the kernel thread), once the model has loaded. Refreshes are
counted (a late depth map for old settings is dropped), held while the panel changes many controls at once,
and wanted again when the controller was busy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as widgets
from PIL import Image

from ..engine.controller import Controller, Event, Failed, Finished, TaskContext
from ..images import ImageInputError, load_images
from ..settings import CONTROLNET_STRUCTURES, GenerationSettings, SettingsError
from .controls import SettingsControls, set_help
from .inputs import InputStrip, caption_of, load_upload, uploaded_files
from .maps import MapPreviews, map_caption, traced_map
from .status import count, error_sentence

#: The label of the controller task that computes the Structure section's depth maps (quiet in the status line).
MAPS_TASK = "structure maps"
#: Settings that change a ControlNet unit's map (the others change only how strongly or when it steers).
MAP_SETTINGS = ("structure", "canny_low", "canny_high", "control_units", "height", "width")
#: Depth maps kept for the previews (keyed by model, picture and size): a slider that moves recomputes nothing.
MAPS_KEPT = 8


class StructureSection:
    """The structure image upload, the unit editor (the ``control_units`` control) and the map previews, placed
    in the controls' Structure group; the panel hands it what it reads of the panel as callables."""

    def __init__(
        self,
        controls: SettingsControls,
        inputs: InputStrip,
        *,
        controller: Callable[[], Controller],
        model: Callable[[], str | None],
        say: Callable[..., None],
        report: Callable[[BaseException], None],
        show_upload_count: Callable[[widgets.FileUpload, list[str]], None],
        mirroring: Callable[[], bool],
    ) -> None:
        self.controls, self.inputs = controls, inputs
        self._controller, self._model = controller, model
        self._say, self._report, self._show_upload_count, self._mirroring = say, report, show_upload_count, mirroring
        self._version = 0
        self._hold = 1  # until the panel is built
        self._wanted = False
        self._pending = False
        self._cache: dict[tuple, Image.Image] = {}

        # An optional structure image (the structure's own unit, and img2img's start), more ControlNet units (the
        # control_units rows, each with an optional picture of its own), and every unit's map.
        self.image: Image.Image | None = None
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="Structure")
        set_help(self.upload, "the picture whose layout is kept (default: the first input image)")
        self.upload.observe(self._on_upload, names="value")
        self.extras = widgets.VBox([self.upload])
        controls.add_to("structure", self.extras, before="control_units")
        self.unit_editor = controls["control_units"]
        self.unit_editor.on_refused = lambda sentence: say(sentence, error=True)
        self.unit_editor.on_pictures = self.refresh
        self.maps = MapPreviews()
        controls.add_to("structure", self.maps)
        controls["structure"].observe(lambda _: self.follow(), names="value")
        for name in MAP_SETTINGS[1:]:
            controls[name].observe(lambda _: self.refresh(), names="value")

    def built(self) -> None:
        """The panel is complete: maps may refresh from now on."""
        self._hold = 0
        self.refresh()

    def set_image(self, image: Any, unit: int = 1) -> None:
        """See :meth:`ImagePromptWidget.set_structure_image`."""
        rows = self.unit_editor.rows
        try:
            if not 1 <= unit <= len(rows) + 1:
                raise SettingsError(f"There is no ControlNet {unit}: the Structure section has "
                                    f"{count(len(rows) + 1, 'ControlNet')} (add one with 'add a ControlNet').")
            picture = None if image is None else load_images(image)[0]
        except ValueError as err:
            self._report(err)
            raise
        if unit > 1:
            rows[unit - 2].set_picture(picture, caption_of(image) if image is not None else "")
            return
        self.image = picture
        self._show_upload_count(self.upload, [] if image is None else [caption_of(image)])
        self.refresh()

    def _on_upload(self, change: dict[str, Any]) -> None:
        if self._mirroring():
            return
        files = uploaded_files(change["new"])
        if not files:
            return
        try:
            self.set_image(load_upload(files[0]))
            self._show_upload_count(self.upload, [files[0].name])
            self._say(f"Structure image {files[0].name} set; the Structure section uses it.")
        except ImageInputError:
            self._show_upload_count(self.upload, [])  # set_image said why

    def follow(self) -> None:
        """The structure setting changed: show its extras, activate the units it reads, refresh the maps."""
        structure = self.controls["structure"].value
        self.extras.layout.display = "none" if structure == "none" else None
        with self.held():
            if structure in CONTROLNET_STRUCTURES:
                self.unit_editor.primary_kind = structure
            self.unit_editor.set_active(structure in CONTROLNET_STRUCTURES)  # other structures read no units
            self.refresh()

    def run_images(self, settings: GenerationSettings, images: list[Image.Image]) -> Any:
        """A run's ``structure_image``: none; the structure image (``None``: the engine takes the first input); or,
        where an added ControlNet has a picture of its own, one per unit (the others read the structure image)."""
        if settings.structure == "none":
            return None
        own = self.unit_editor.unit_images() if settings.control_units.strip() else []
        if not any(own):
            return self.image
        first = self.image if self.image is not None else images[0]
        return [first, *(picture if picture is not None else first for picture in own)]

    def _unit_pictures(self) -> list[Image.Image] | None:
        """The picture each ControlNet unit reads (``None`` before there is an input or structure image)."""
        first = self.image if self.image is not None else next(iter(self.inputs.images), None)
        if first is None:
            return None
        return [first, *(picture if picture is not None else first for picture in self.unit_editor.unit_images())]

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Change many controls at once: the maps refresh once, after."""
        self._hold += 1
        try:
            yield
        finally:
            self._hold -= 1
            if not self._hold and self._wanted:
                self.refresh()

    def forget_maps(self) -> None:
        """Another model (maybe another depth estimator): no kept map is valid."""
        self._cache.clear()

    def controller_idle(self) -> None:
        """The controller finished its jobs: maps wanted while it was busy are computed now."""
        if self._pending:
            self._pending = False
            self.refresh()

    def refresh(self) -> None:
        """Preview every ControlNet unit's map as the next run would feed it; a grey box says what each waits for
        until it is there."""
        if self._hold:
            self._wanted = True
            return
        self._wanted = False
        self._version += 1
        structure_name = self.controls["structure"].value
        if structure_name not in CONTROLNET_STRUCTURES:
            self.maps.hide()
            return
        pictures = self._unit_pictures()
        if pictures is None:
            self.maps.begin(0, "Add an input image (or a Structure image) to see what each ControlNet reads.")
            return
        try:
            values = self.controls.values()  # sizes read as the settings take them ("native": None)
            settings = GenerationSettings.from_kwargs(**{name: values[name] for name in MAP_SETTINGS})
        except SettingsError as err:
            self.maps.begin(0, f"No maps: {err}")
            return
        from ..encoding import fingerprint
        from ..structure import plan as structure

        units = settings.units()
        pipeline = self._controller().pipeline
        native = getattr(pipeline, "native_size", 512)  # the model's, once it has loaded
        size = structure.fit_size(pictures[0].size, settings.height, settings.width, native)
        exact = pipeline is not None or (settings.height and settings.width)
        at = f"at the next run's size, {size[0]}×{size[1]}" if exact else \
            f"at {size[0]}×{size[1]} (SD 1.x's size; the model's own once it has loaded)"
        tiles = self.maps.begin(len(units), f"What each ControlNet reads, {at}:")
        waiting = []
        for index, (unit, picture) in enumerate(zip(units, pictures)):
            caption = map_caption(index, unit.kind)
            if unit.kind == "edges":  # OpenCV, no model: at once
                try:
                    tiles[index].show(structure.control_map(unit, picture, size), caption)
                except ValueError as err:  # OpenCV missing: the sentence names the extra to install
                    tiles[index].wait("No map: the reason is above.", caption)
                    self.maps.say(str(err))
                continue
            key = (self._model(), unit.kind, fingerprint(picture), size)
            if key in self._cache:
                tiles[index].show(self._cache[key], caption)
            else:
                waiting.append(index)
        if waiting:
            self._compute(settings, pictures, size, waiting)

    def _compute(self, settings: GenerationSettings, pictures: list[Any], size: tuple[int, int],
                 waiting: list[int]) -> None:
        """The maps of the units in ``waiting`` (depth), through the controller: they need the estimator."""
        from ..encoding import fingerprint

        units = settings.units()
        tiles = self.maps.tiles
        controller = self._controller()

        def wait(text: str) -> None:
            for index in waiting:
                tiles[index].wait(text, map_caption(index, units[index].kind))

        if controller.pipeline is None:
            wait("The depth map appears once the model has loaded (press Generate).")
            return
        if controller.busy:
            self._pending = True
            wait("Computed when the current run ends…")
            return
        wait("Computing the depth map…")
        version = self._version

        def loading(message: str) -> None:  # the estimator's first load: said in the tiles that wait for it
            if version == self._version:
                wait(message)

        def compute(task: TaskContext) -> Any:
            return task.pipeline.structure_maps(settings=settings, structure_image=pictures, on_status=loading)

        def done(end: Event) -> None:
            if version != self._version:
                return  # the settings changed meanwhile: a newer refresh shows its own maps
            if isinstance(end, Finished):
                for found in end.result:
                    if found.index in waiting:
                        self._keep((self._model(), found.kind, fingerprint(pictures[found.index]), size), found.image)
                        tiles[found.index].show(found.image, map_caption(found.index, found.kind))
            elif isinstance(end, Failed):  # the sentence is too long for a tile
                wait("No map: the reason is above.")
                self.maps.say(error_sentence(end.error))
            else:
                wait("Cancelled: change a structure setting to compute it again.")

        controller.submit_task(compute, label=MAPS_TASK, on_end=done)

    def _keep(self, key: tuple, image: Image.Image) -> None:
        self._cache[key] = image
        while len(self._cache) > MAPS_KEPT:
            self._cache.pop(next(iter(self._cache)))

    def show_run_maps(self, result: Any) -> None:
        """After a run: every map it fed its ControlNets (the traced ``control_image*``), labelled by unit and kind."""
        from ..structure.plan import control_trace_name

        units = result.settings.units()
        if not units or self.controls["structure"].value not in CONTROLNET_STRUCTURES:
            return
        self._version += 1  # a depth map still being computed for the settings before is not shown now
        maps = [result.trace.extras.get(control_trace_name(index)) for index in range(len(units))]
        height, width = next((m.shape[-2:] for m in maps if m is not None), (0, 0))
        tiles = self.maps.begin(len(units), f"What each ControlNet read in this run ({width}×{height}):")
        for index, (unit, traced) in enumerate(zip(units, maps)):
            if traced is None:
                tiles[index].wait("Not in this run's trace.", map_caption(index, unit.kind))
            else:
                tiles[index].show(traced_map(traced), map_caption(index, unit.kind))
