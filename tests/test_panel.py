"""The panel a teacher puts in front of a class (issue 13), driven as the browser drives it (``set_state`` with
the wire format, ``.click()``): controls per method, the model picker, download progress, no empty picture,
marked previews, upload counters, captions, latents, trace export, recipes, refused values.

Runs under ipywidgets 8 and, in CI's Colab-pinned environment, ipywidgets 7.7.1.
"""

from __future__ import annotations

import json
import threading

import ipywidgets
import pytest
import torch
from test_widget import (
    FAST,
    WAIT,
    SteeredPipeline,
    assert_same_pixels,
    browser_upload,
    browser_upload_to,
    labelled,
    png_bytes,
    solo,
    upload_count,
)

from imageprompt_widgets import ImagePromptPipeline, ImagePromptWidget
from imageprompt_widgets.downloads import DownloadProgress
from imageprompt_widgets.methods import methods_for, settings_read
from imageprompt_widgets.offline import sample_image
from imageprompt_widgets.presets import PRESETS
from imageprompt_widgets.results import Trace, recipe_from_png
from imageprompt_widgets.settings import MODES, STRUCTURES, SettingsError, SettingSpec, setting_specs
from imageprompt_widgets.widget import InlineRunner, ThreadRunner, controls
from imageprompt_widgets.widget.inspector import NO_LATENTS_TEXT
from imageprompt_widgets.widget.recipe import RecipeError


def shown_images(root: ipywidgets.Widget) -> list[ipywidgets.Image]:
    """Every ``Image`` widget the page would render: not inside anything with ``display: none``."""
    found, stack = [], [root]
    while stack:
        widget = stack.pop()
        if getattr(getattr(widget, "layout", None), "display", None) == "none":
            continue
        if isinstance(widget, ipywidgets.Image):
            found.append(widget)
        stack.extend(getattr(widget, "children", ()))
    return found


def assert_no_empty_image(root: ipywidgets.Widget) -> None:
    """The browser shows its broken-image icon for an ``Image`` without bytes: none may be shown."""
    empty = [image for image in shown_images(root) if not bytes(image.value)]
    assert not empty, f"{len(empty)} empty Image widget(s) shown"


def choose(dropdown: ipywidgets.Dropdown, value) -> None:
    """Pick an option as the browser does: it sends the option's index."""
    values = [option[1] if isinstance(option, tuple) else option for option in dropdown.options]
    dropdown.set_state({"index": values.index(value)})


def option_values(dropdown: ipywidgets.Dropdown) -> list:
    return [option[1] if isinstance(option, tuple) else option for option in dropdown.options]


@pytest.fixture
def panel(tiny_pipe, image):
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), preview_interval=0, **FAST)
    widget.set_images(image)
    yield widget
    widget.close()


# -- controls per method and structure ----------------------------------------------------------------


def test_only_the_controls_the_method_and_structure_read_are_shown():
    widget = ImagePromptWidget(model="tiny-caption", runner=InlineRunner())  # offers every method but ip_adapter
    names = set(widget.controls.controls)
    for mode in methods_for(PRESETS["tiny-caption"]):
        choose(widget.controls["mode"], mode)
        for structure in STRUCTURES:
            choose(widget.controls["structure"], structure)
            read = settings_read(mode, structure)
            hidden = {name for name in names if widget.controls[name].layout.display == "none"}
            assert hidden == names - read, (mode, structure)  # changed at once, from the registry
    choose(widget.controls["mode"], "repeat")
    choose(widget.controls["structure"], "none")
    for name in ("prompt", "image_weight", "canny_low", "strength", "adapter_start"):
        assert widget.controls[name].layout.display == "none"
    assert widget.controls.sections["structure"].layout.display != "none"  # the structure dropdown itself
    choose(widget.controls["mode"], "caption")  # caption reads no weights: the tiles' sliders go too
    assert all(item.weight.layout.display == "none" for item in widget.inputs.items)
    widget.close()


def test_every_setting_is_read_by_some_method_and_structure():
    """A setting no method reads would never be shown: register it in methods/ (reads or SHARED_SETTINGS)."""
    read = set().union(*(settings_read(mode, structure) for mode in MODES for structure in STRUCTURES))
    assert {spec.name for spec in setting_specs()} <= read


def test_a_new_setting_lands_in_its_group_and_a_new_kind_plugs_in(monkeypatch):
    """What the other helpers' settings need: a spec with a section (or none) and, for a new kind, a factory."""
    loras = SettingSpec(name="loras", kind="loras", default=(), label="LoRAs", help="LoRA weights", section="lora")
    scheduler = SettingSpec(name="steps_extra", kind="choice", default="a", label="extra", choices=("a", "b"))
    monkeypatch.setattr(controls, "setting_specs", lambda: [*setting_specs(), loras, scheduler])
    monkeypatch.setattr(controls, "settings_read", lambda mode, structure: settings_read(mode, structure) | {"loras"})

    @controls.control_factory("loras")
    def lora_list(spec):
        return ipywidgets.Text(value="")  # stands for a list widget with a `value` trait

    try:
        built = controls.SettingsControls(exclude=("weights",))
        assert built.controls["loras"] in built.groups["lora"].children
        assert built.sections["lora"] in built.children and built.controls["loras"].description == "LoRAs"
        assert controls.help_of(built.controls["loras"]) == "LoRA weights"
        assert built.controls["steps_extra"] in built.groups["method"].children  # read by no method: hidden
        assert built.controls["steps_extra"].layout.display == "none"
        live = ipywidgets.ToggleButton(description="live")
        built.add_to("generation", live)
        assert live in built.groups["generation"].children
    finally:
        del controls.CONTROL_FACTORIES["loras"]


def test_help_texts_are_on_the_trait_the_installed_ipywidgets_syncs():
    widget = ImagePromptWidget(model="tiny")
    synced = "tooltip" if int(ipywidgets.__version__.split(".")[0]) >= 8 else "description_tooltip"
    for spec in setting_specs():
        if spec.name in widget.controls.controls:
            control = widget.controls[spec.name]
            assert synced in control.keys and getattr(control, synced) == spec.help
    assert controls.help_of(widget.upload) and controls.help_of(widget.model_picker)
    widget.close()


# -- values out of range: a sentence, never a silent clamp ---------------------------------------------


def test_a_number_from_the_browser_outside_its_range_is_refused_with_a_sentence(panel):
    steps = panel.controls["steps"]
    steps.set_state({"value": 999})  # a crafted message: ipywidgets would clamp it to 150 without a word
    assert steps.value == FAST["steps"]
    assert panel.status == f"steps=999 is outside its range 1 to 150; it stays at {FAST['steps']}."
    panel.inputs.items[0].weight.set_state({"value": 50.0})
    assert panel.inputs.weights == [1.0] and "weight=50 is outside its range -10 to 10" in panel.status
    steps.set_state({"value": 3})
    assert steps.value == 3  # values in range pass


def test_apply_refuses_unknown_choices_and_out_of_range_values_and_changes_nothing(panel):
    height = panel.controls["height"]
    options = height.options
    before = panel.controls.values()
    with pytest.raises(SettingsError, match=r"^height=72 is not one of the panel's choices \(native, 64, 128"):
        panel.controls.apply({"seed": 5, "height": 72})  # a valid setting no size choice can show
    with pytest.raises(SettingsError, match="outside its range"):
        panel.controls.apply({"seed": 5, "steps": 500})
    with pytest.raises(SettingsError, match="mode='dance' is not one of"):
        panel.controls.apply({"seed": 5, "mode": "dance"})
    with pytest.raises(SettingsError, match="Unknown setting lora_scale"):
        panel.controls.apply({"seed": 5, "lora_scale": 1})
    assert height.options == options  # nothing added
    assert panel.controls.values() == before  # all or nothing
    panel.controls.apply({"seed": 5, "height": 128})
    assert panel.controls["seed"].value == 5 and height.value == 128


# -- model picker ---------------------------------------------------------------------------------


def test_the_model_picker_lists_every_preset_with_its_size_and_state():
    widget = ImagePromptWidget(model="tiny")
    picker = labelled(widget, "model", ipywidgets.Dropdown)
    assert picker is widget.model_picker and picker.value == "tiny"
    assert option_values(picker) == list(PRESETS)
    labels = {value: label for label, value in picker.options}
    assert labels["tiny"] == "tiny · offline · built"  # tiny_pipe's session fixture or an earlier test built it
    assert labels["sd14"].startswith("sd14 · about 7.2 GB · ")  # 5.5 GB + 1.7 GB
    assert labels["ip-adapter"].startswith("ip-adapter · about 8.0 GB · ")
    widget.close()


def test_choosing_a_method_the_model_lacks_moves_to_its_twin_and_says_so(image):
    widget = ImagePromptWidget(model="tiny", runner=InlineRunner(), **FAST)
    widget.set_images(image)
    mode = widget.controls["mode"]
    assert option_values(mode) == list(MODES)
    assert {v: label for label, v in mode.options}["ip_adapter"] == "ip_adapter (model tiny-ip-adapter)"
    choose(mode, "caption")
    assert widget.model == "tiny-caption" and widget.model_picker.value == "tiny-caption"
    assert widget.status == "caption needs a captioner (BLIP), which 'tiny' lacks: switched to model 'tiny-caption' " \
                            "(offline, built)."
    assert widget.controller.preset is PRESETS["tiny-caption"] and mode.value == "caption"
    result = widget.generate().result(WAIT)  # no failure after loading
    assert result.recipe["model"]["preset"] == "tiny-caption" and widget.status.startswith("Done")
    widget.close()


def test_a_hub_model_moves_to_the_hub_preset_without_loading_anything():
    widget = ImagePromptWidget(model="sd14", runner=InlineRunner())
    choose(widget.controls["mode"], "ip_adapter")
    assert widget.model == "ip-adapter" and widget.pipeline is None
    assert widget.status.startswith("ip_adapter needs an IP-Adapter, which 'sd14' lacks: switched to model "
                                    "'ip-adapter' (about 8.0 GB, ")
    choose(widget.controls["mode"], "repeat")  # back: a preset with the same Stable Diffusion (1.5)
    assert widget.model == "sd15"
    choose(widget.model_picker, "variations")  # the preset's own starting settings come with it
    assert (widget.controls["mode"].value, widget.controls["negative"].value) == ("single", "zeros")
    widget.controls["mode"].value = "tokens"  # the user's own choice stays …
    choose(widget.model_picker, "sd15")  # … the preset's own go when another model is chosen
    assert (widget.controls["mode"].value, widget.controls["negative"].value) == ("tokens", "empty_prompt")
    widget.close()


def test_switching_model_while_running_cancels_the_run_and_marks_its_previews(tiny_pipe, image):
    steered = SteeredPipeline(tiny_pipe, pause_at=2)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), preview_interval=0, steps=8)
    widget.set_images(image)
    first = widget.generate()
    assert steered.paused.wait(WAIT)
    old = widget.controller
    choose(widget.model_picker, "tiny-caption")
    assert widget.controller is not old and widget.controller.preset is PRESETS["tiny-caption"]
    assert widget.status.endswith("The running generation was cancelled; its previews stay, marked.")
    steered.resume.set()
    assert first.result(WAIT).cancelled
    assert old.join(WAIT)
    caption = widget.grid.cells[0].caption.value
    assert "cancelled at step 2/9: a preview, not a finished image" in caption
    assert widget.grid.filled == 1 and widget.cancel_button.disabled
    widget.controls["steps"].value = 2
    assert widget.generate().result(WAIT).recipe["model"]["preset"] == "tiny-caption"
    widget.close()


# -- loading and download progress -----------------------------------------------------------------


def test_download_progress_fills_the_bar_and_cancel_stops_the_download(monkeypatch, image):
    reported, cancelled = threading.Event(), threading.Event()
    proceed = threading.Event()

    def downloading(cls, preset, on_status=None, on_progress=None, **options):
        on_progress(DownloadProgress(done=2 * 10**9, total=8 * 10**9, seconds=40.0))
        reported.set()
        assert proceed.wait(WAIT)
        try:
            on_progress(DownloadProgress(done=3 * 10**9, total=8 * 10**9, seconds=60.0))
        except BaseException:
            cancelled.set()
            raise
        raise AssertionError("the cancel should have stopped the download")

    monkeypatch.setattr(ImagePromptPipeline, "from_preset", classmethod(downloading))
    widget = ImagePromptWidget(model="sd14", runner=ThreadRunner(), **FAST)
    widget.set_images(image)
    future = widget.generate()
    assert reported.wait(WAIT)
    assert (widget.progress.value, widget.progress.max) == (2 * 10**9, 8 * 10**9)
    assert widget.status == "Downloading 'sd14': 2.0 GB of 8.0 GB, 50.0 MB/s, about 2 min left"
    assert "Downloading the model…" in widget.grid.cells[0].placeholder.value
    assert_no_empty_image(widget)
    labelled(widget, "Cancel", ipywidgets.Button).click()
    proceed.set()
    assert future.result(WAIT) is None and cancelled.is_set()
    assert widget.controller.join(WAIT)
    assert widget.status == "Cancelled before it started." and not widget.busy
    assert "Cancelled before the first step." in widget.grid.cells[0].placeholder.value
    assert_no_empty_image(widget)
    widget.close()


def test_the_tiny_loading_line_reads_plainly(image):
    widget = ImagePromptWidget(model="tiny", runner=InlineRunner(), **FAST)
    said: list[str] = []
    widget.status_line.observe(lambda change: said.append(widget.status), names="value")
    widget.set_images(image)
    widget.generate().result(WAIT)
    assert "Loading model 'tiny' (built on this machine, random weights)…" in said
    assert not any("((" in line or "))" in line for line in said)
    widget.close()


# -- no empty picture, marked previews ---------------------------------------------------------------


def test_no_empty_image_is_shown_in_any_state(tiny_pipe, image):
    steered = SteeredPipeline(tiny_pipe, pause_at=1)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), preview_interval=3600, steps=4)
    assert_no_empty_image(widget)  # fresh
    widget.set_images(image)
    future = widget.generate()
    assert steered.paused.wait(WAIT)
    assert_no_empty_image(widget)  # running
    widget.cancel()
    steered.resume.set()
    future.result(WAIT)
    assert widget.controller.join(WAIT)
    assert_no_empty_image(widget)  # cancelled
    steered.pause_at = None
    steered.fail_at, steered.error = 1, RuntimeError("boom")
    widget.controls["num_images"].value = 2
    assert isinstance(widget.generate().exception(WAIT), RuntimeError)
    assert widget.controller.join(WAIT)
    assert "failed at step 1/5" in widget.grid.cells[0].caption.value
    assert widget.grid.cells[1].placeholder.layout.display != "none" or widget.grid.cells[1].filled
    assert_no_empty_image(widget)  # failed
    widget.generate().result(WAIT)
    assert widget.controller.join(WAIT)
    assert_no_empty_image(widget)  # finished, the inspector filled (no latents: no filmstrip)
    assert widget.inspector.filmstrip_table.value.startswith("This run kept no latents")
    widget.history.select(widget.history.items[0])
    assert_no_empty_image(widget)
    widget.close()


def test_a_cancelled_runs_previews_stay_marked(tiny_pipe, image):
    steered = SteeredPipeline(tiny_pipe, pause_at=3)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), preview_interval=0, steps=10, num_images=2)
    widget.set_images(image)
    future = widget.generate()
    assert steered.paused.wait(WAIT)
    labelled(widget, "Cancel", ipywidgets.Button).click()
    steered.resume.set()
    assert future.result(WAIT).cancelled and widget.controller.join(WAIT)
    assert widget.grid.filled == 2
    for cell in widget.grid.cells:
        assert "cancelled at step 3/11: a preview, not a finished image" in cell.caption.value
        assert cell.caption.layout.display != "none"
    widget.close()


# -- inputs: counters and captions -------------------------------------------------------------------


def test_upload_buttons_count_the_images_that_are_in(panel, tmp_path):
    assert upload_count(panel.upload) == 1  # the fixture's set_images
    browser_upload(panel, [("a.png", png_bytes(sample_image(1))), ("b.png", png_bytes(sample_image(2)))])
    assert upload_count(panel.upload) == 3
    panel.inputs.items[0].tile.children[-1].click()  # "remove"
    assert upload_count(panel.upload) == 2
    browser_upload(panel, [("c.png", png_bytes(sample_image(3)))])  # the browser adds to what it shows
    assert upload_count(panel.upload) == 3 and panel.inputs.names == ["a.png", "b.png", "c.png"]
    browser_upload_to(panel.negative_upload, [("n.png", png_bytes(sample_image(4)))])
    assert upload_count(panel.negative_upload) == 1
    panel.set_negative_images([])
    assert upload_count(panel.negative_upload) == 0
    assert panel.generate().result(WAIT).images  # the count entries never became inputs


def test_captions_are_alike_for_every_source(tiny_pipe, tmp_path):
    path = tmp_path / "sunset.png"
    sample_image(0).save(path)
    from_path = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner())
    from_path.set_images(str(path))
    uploaded = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner())
    browser_upload(uploaded, [("sunset.png", path.read_bytes())])
    assert from_path.inputs.names == uploaded.inputs.names == ["sunset.png"]
    assert "<small>sunset.png</small>" in from_path.inputs.items[0].tile.children[1].value
    from_path.close()
    uploaded.close()


# -- latents, trace export, recipes --------------------------------------------------------------------


def test_the_latents_checkbox_feeds_the_denoising_filmstrip(panel):
    box = labelled(panel, "keep latents (Denoising view)", ipywidgets.Checkbox)
    assert "latents" in box.description and not box.value
    panel.generate().result(WAIT)
    assert panel.result.trace.latents is None
    assert panel.inspector.filmstrip_table.value.startswith("This run kept no latents")
    assert "keep latents" in NO_LATENTS_TEXT and "trace_latents" not in NO_LATENTS_TEXT
    box.set_state({"value": True})
    panel.generate().result(WAIT)
    assert panel.result.trace.latents is not None
    assert bytes(panel.inspector.filmstrip_image.value)[:4] == b"\x89PNG"
    assert panel.inspector.filmstrip_image.layout.display != "none"


def test_export_a_history_items_trace(panel, tmp_path):
    panel.history.save_dir = tmp_path
    panel.keep_latents.value = True
    result = panel.generate().result(WAIT)
    panel.history.select(panel.history.items[0])
    labelled(panel, "Export trace", ipywidgets.Button).click()
    (path,) = tmp_path.glob("*.safetensors")
    assert path.name == f"imageprompt-seed{result.settings.seed}-0.safetensors"
    assert panel.status.startswith(f"Exported the run's trace to {path} ")
    trace, recipe = Trace.load(path)
    for name, tensor in result.trace.tensors().items():
        assert torch.equal(trace.tensors()[name], tensor), name
    assert recipe == {**json.loads(json.dumps(result.recipe)), "index": 0}


def test_load_recipe_puts_a_saved_pngs_settings_into_the_controls(panel, tiny_pipe, image, tmp_path):
    panel.history.save_dir = tmp_path
    panel.controls["seed"].value = 7
    panel.controls["scale"].value = 1.5
    first = panel.generate().result(WAIT)
    panel.history.select(panel.history.items[0])
    labelled(panel, "Save PNG", ipywidgets.Button).click()
    (saved,) = tmp_path.glob("*.png")
    panel.controls["seed"].value = 99
    panel.controls["scale"].value = 0.5
    recipe = panel.load_recipe(saved)
    assert (panel.controls["seed"].value, panel.controls["scale"].value) == (7, 1.5)
    assert panel.status == ("Loaded the recipe of imageprompt-seed7-0.png: repeat, seed 7, model 'tiny'. "
                            "To make it again, add the same 1 input image and press Generate.")
    assert recipe == recipe_from_png(saved)
    assert_same_pixels(panel.generate().result(WAIT).images[0], first.images[0])
    # The "Load recipe" button takes the PNG from the browser.
    panel.controls["seed"].value = 99
    browser_upload_to(labelled(panel, "Load recipe", ipywidgets.FileUpload), [("again.png", saved.read_bytes())])
    assert panel.controls["seed"].value == 7 and panel.status.startswith("Loaded the recipe of again.png")


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"steps": 999}, SettingsError, "steps=999 is outside its range 1 to 150."),
        ({"mode": "dance"}, SettingsError, "mode='dance' is not one of"),
        ({"height": 72}, SettingsError, "height=72 is not one of the panel's choices"),
        ({"weights": [99.0]}, SettingsError, "weights=99.0 is outside its range"),
        ({"lora_scale": 1.0}, SettingsError, "Unknown setting lora_scale"),
    ],
)
def test_a_recipe_with_a_bad_value_raises_says_so_and_changes_nothing(panel, tmp_path, change, error, message):
    from PIL.PngImagePlugin import PngInfo

    recipe = panel.generate().result(WAIT).recipe
    recipe["settings"].update(change)
    info = PngInfo()
    info.add_text("imageprompt", json.dumps(recipe))
    path = tmp_path / "edited.png"
    sample_image(0).save(path, pnginfo=info)
    panel.controls["seed"].value = 42
    before = panel.controls.values()
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        panel.load_recipe(path)
    assert issubclass(error, ValueError) and panel.status.startswith(message)
    assert panel.controls.values() == before
    assert panel.generate().result(WAIT).settings.seed == 42  # still usable


def test_a_file_without_a_recipe_is_a_sentence(panel, tmp_path):
    plain = tmp_path / "plain.png"
    sample_image(0).save(plain)
    with pytest.raises(RecipeError, match=r"^'plain.png' carries no imageprompt recipe"):
        panel.load_recipe(plain)
    assert panel.status.startswith("'plain.png' carries no imageprompt recipe")
    with pytest.raises(RecipeError, match="is not a PNG with a recipe"):
        panel.load_recipe(b"not an image at all")
    with pytest.raises(RecipeError, match="does not exist"):
        panel.load_recipe(tmp_path / "missing.png")
    assert issubclass(RecipeError, ValueError)


def test_rerun_switches_back_to_the_items_model(panel, image):
    panel.generate().result(WAIT)
    item = panel.history.items[0]
    choose(panel.controls["mode"], "caption")
    assert panel.model == "tiny-caption"
    result = panel.rerun(item).result(WAIT)
    assert panel.model == "tiny" and result.recipe["model"]["preset"] == "tiny"
    assert_same_pixels(result.images[0], solo(panel.pipeline, image, weights=(1.0,), **FAST).images[0])


def test_the_panel_and_its_parts_stay_alive_after_every_error(panel, tmp_path):
    with pytest.raises(ValueError):
        panel.set_model("sd99")
    assert panel.status.startswith("Unknown model 'sd99'")
    with pytest.raises(RecipeError):
        panel.load_recipe(tmp_path / "missing.png")
    panel.controls["steps"].set_state({"value": -4})
    assert panel.inputs.names and panel.generate().result(WAIT).images
