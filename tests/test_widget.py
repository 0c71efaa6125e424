"""The panel driven the way the browser drives it (``set_state`` with the wire format, ``Button.click()``),
with assertions on what a user sees: tiles, previews, the status line, the history.

Runs under ipywidgets 8 and, in CI's Colab-pinned environment, ipywidgets 7.7.1.
"""

from __future__ import annotations

import html
import io
import json
import re
import sys
import threading
import types

import ipywidgets
import numpy as np
import pytest
import torch
from helpers import WAIT, HeldPipeline, assert_same_pixels, png_bytes, solo
from PIL import Image

from imageprompt_widgets import GenerationSettings, ImagePromptPipeline, ImagePromptWidget
from imageprompt_widgets.encoding import fingerprint
from imageprompt_widgets.engine.results import Trace, recipe_from_png
from imageprompt_widgets.engine.runners import default_runner
from imageprompt_widgets.images import ImageInputError
from imageprompt_widgets.loading.downloads import DownloadProgress
from imageprompt_widgets.loading.offline import sample_image
from imageprompt_widgets.methods import methods_for, preset_capabilities, settings_read
from imageprompt_widgets.presets import PRESETS
from imageprompt_widgets.settings import (
    MAX_CONTROL_UNITS,
    MICRO_CONDITIONING,
    MODES,
    STRUCTURES,
    UNIT_SETTINGS,
    ControlUnit,
    SettingsError,
    SettingSpec,
    setting_specs,
    unit_specs,
    units_text,
)
from imageprompt_widgets.widget import InlineRunner, ThreadRunner, controls
from imageprompt_widgets.widget.controls import group_of, help_of
from imageprompt_widgets.widget.inputs import load_upload, uploaded_files
from imageprompt_widgets.widget.inspector import NO_LATENTS_TEXT
from imageprompt_widgets.widget.recipe import RecipeError

IPYWIDGETS_8 = int(ipywidgets.__version__.split(".")[0]) >= 8
FAST = {"steps": 2, "guidance_scale": 7.5}


def open_section(widget, title: str) -> None:
    """Open the Inspector tab and one of its sections, as a user's clicks do (sections draw when opened)."""
    widget.tabs.selected_index = 1
    widget.inspector.sections.selected_index = widget.inspector.shown_sections.index(title)


def browser_upload(widget: ImagePromptWidget, files: list[tuple[str, bytes]], declared: int | None = None) -> None:
    browser_upload_to(widget.upload, files, declared)


def browser_upload_to(upload: ipywidgets.FileUpload, files: list[tuple[str, bytes]], declared: int | None = None) -> None:
    """What the front end sends when files are picked, in the installed ipywidgets' wire format."""
    if IPYWIDGETS_8:
        value = [
            {"name": name, "type": "image/png", "size": declared or len(content), "content": memoryview(content),
             "last_modified": 1_700_000_000_000}
            for name, content in files
        ]
        upload.set_state({"value": value})
    else:  # ipywidgets 7.x: metadata and data lists plus a counter that makes the kernel rebuild .value
        metadata = [{"name": name, "type": "image/png", "size": declared or len(content), "lastModified": 1_700_000_000_000}
                    for name, content in files]
        upload.set_state(
            {"metadata": metadata, "data": [memoryview(c) for _, c in files], "_counter": upload._counter + len(files)}
        )


def upload_count(upload: ipywidgets.FileUpload) -> int:
    """The number the browser shows on the upload button: ``len(value)`` in ipywidgets 8, ``_counter`` in 7.x."""
    return upload._counter if not IPYWIDGETS_8 else len(upload.value)


def labelled(root: ipywidgets.Widget, description: str, kind: type = ipywidgets.Widget) -> ipywidgets.Widget:
    """The one widget in the panel with this label, found by walking its children like a user scanning it."""
    found, stack = [], [root]
    while stack:
        widget = stack.pop()
        if isinstance(widget, kind) and getattr(widget, "description", None) == description:
            found.append(widget)
        stack.extend(getattr(widget, "children", ()))
    assert len(found) == 1, f"expected one {kind.__name__} labelled {description!r}, found {len(found)}"
    return found[0]


@pytest.fixture
def panel(tiny_pipe, image):
    """A panel on the tiny pipeline that runs inline (deterministic), with one input image."""
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), preview_interval=0, **FAST)
    widget.set_images(image)
    yield widget
    widget.close()


# -- construction ---------------------------------------------------------------------------------


def test_panel_builds_fast_with_plain_labels_and_loads_no_model(monkeypatch):
    """Fast because it loads nothing: building the panel never reaches the model loader (its time is in
    benchmarks/cache.py)."""
    from imageprompt_widgets.engine import pipeline as pipeline_module
    from imageprompt_widgets.loading.cache import MODEL_CACHE

    monkeypatch.setattr(pipeline_module, "load_components", lambda *a, **k: pytest.fail("the panel loaded a model"))
    cached = len(MODEL_CACHE)
    widget = ImagePromptWidget(model="tiny")
    assert widget.pipeline is None and len(MODEL_CACHE) == cached
    assert isinstance(widget, ipywidgets.VBox)
    labelled(widget, "Upload", ipywidgets.FileUpload)
    labelled(widget, "Generate", ipywidgets.Button)
    labelled(widget, "Cancel", ipywidgets.Button)
    labelled(widget, "steps", ipywidgets.IntSlider)
    labelled(widget, "seed")
    assert widget.status == "Add an image and press Generate, or choose the method “words only” and type a prompt."
    # Worker threads may only set traits: an Output widget written from a thread renders nowhere.
    stack = [child for child in widget.children if child is not widget.tabs] + [widget.history]
    while stack:
        part = stack.pop()
        assert not isinstance(part, ipywidgets.Output)
        stack.extend(getattr(part, "children", ()))
    widget.close()


def test_labels_of_the_method_and_generation_controls_fit_their_label_column():
    """A label longer than the 100 px label column is cut in the browser ("image in poo…" for revision's strength
    in JupyterLab): in the always-open groups, labels beside a control keep to 14 characters (what fits there:
    "image strength", "several images" are shown whole); two settings never share one label."""
    specs = setting_specs()
    beside = [spec for spec in specs if group_of(spec) in ("method", "generation") and spec.kind != "bool"]
    assert {spec.name for spec in beside} >= {"revision_strength", "noise_augmentation", "scale", "steps"}
    assert [spec.label for spec in beside if len(spec.label) > 14] == []
    labels = [spec.label for spec in specs]
    assert len(labels) == len(set(labels))


def test_controls_are_generated_from_the_settings_specs():
    widget = ImagePromptWidget(model="tiny")
    for spec in setting_specs():
        if spec.name == "weights":  # set per image on the input tiles
            assert "weights" not in widget.controls.controls
            continue
        group = widget.controls.groups[group_of(spec)]
        control = labelled(group, spec.label)  # in the group its spec (or the registry) names
        shown = ", ".join(f"{value:g}" for value in spec.default) if spec.kind == "floats" else spec.default
        shown = controls.NATIVE if spec.kind == "size" and shown is None else shown  # "native" is shown, not a blank
        assert control is widget.controls[spec.name] and control.value == shown
        if spec.kind in ("int", "float"):
            assert (control.min, control.max) == (spec.min, spec.max)
        helped = control.add_button if spec.kind == "units" else control  # the units' help: on their add button
        assert help_of(helped).startswith(spec.help) and spec.help  # on the synced trait of 7.7 and of 8
        if spec.kind != "units":  # the setting's own name, where the label says it in other words
            assert help_of(helped) == controls.technical_help(spec)
    assert widget.controls.settings() == GenerationSettings()
    assert labelled(widget.controls.groups["advanced"], "make square") is widget.controls["crop"]  # folded away
    assert labelled(widget.controls.groups["method"], "method") is widget.controls["mode"]
    assert labelled(widget.controls.groups["generation"], "steps") is widget.controls["steps"]
    widget.close()


def test_unknown_model_or_setting_fails_at_once():
    with pytest.raises(ValueError, match="Unknown model 'sd99'"):
        ImagePromptWidget(model="sd99")
    with pytest.raises(ValueError, match="Unknown setting stepz"):
        ImagePromptWidget(model="tiny", stepz=3)


def test_dice_rolls_a_seed_in_range():
    widget = ImagePromptWidget(model="tiny")
    seen = set()
    for _ in range(5):
        widget.controls.dice.click()
        seen.add(widget.controls["seed"].value)
    assert len(seen) > 1 and all(0 <= seed <= 2**32 - 1 for seed in seen)
    widget.close()


def test_default_runner_is_inline_on_colab(monkeypatch):
    assert isinstance(default_runner(), ThreadRunner)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert isinstance(default_runner(), InlineRunner)


# -- inputs ---------------------------------------------------------------------------------------


def test_upload_values_of_both_ipywidgets_versions_read_the_same():
    content = png_bytes(sample_image(0))
    v8 = ({"name": "a.png", "type": "image/png", "size": len(content), "content": memoryview(content),
           "last_modified": None},)
    v7 = {"a.png": {"metadata": {"name": "a.png", "type": "image/png", "size": len(content)}, "content": content}}
    assert uploaded_files(v8) == uploaded_files(v7)
    assert uploaded_files(v8)[0].content == content
    assert uploaded_files(()) == uploaded_files({}) == []


def test_upload_like_the_browser_then_generate(tiny_pipe):
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), preview_interval=0, **FAST)
    first, second = sample_image(0), sample_image(1)
    browser_upload(widget, [("cat.png", png_bytes(first)), ("dog.png", png_bytes(second))])
    assert widget.status.startswith("Added 2 images")
    assert len(widget.inputs.items) == 2 and [item.name for item in widget.inputs.items] == ["cat.png", "dog.png"]
    assert upload_count(widget.upload) == 2  # "Upload (2)": the images that are in
    assert all(not file.content for file in uploaded_files(widget.upload.value))  # the bytes are not kept twice
    widget.inputs.items[1].weight.value = 0.5
    widget.controls["num_images"].value = 2
    labelled(widget, "Generate", ipywidgets.Button).click()
    assert widget.status.startswith("Done: 2 images"), widget.status
    assert widget.grid.filled == 2 and all(tile.format == "png" for tile in widget.grid.tiles)
    expected = solo(tiny_pipe, [first, second], weights=(1.0, 0.5), num_images=2, **FAST)
    assert widget.result.settings.weights == (1.0, 0.5)
    for got, want in zip(widget.result.images, expected.images):
        assert_same_pixels(got, want)
    assert len(widget.history) == 2
    widget.close()


def test_bad_upload_is_named_and_good_files_still_arrive(panel):
    browser_upload(panel, [("notes.txt", b"hello, not an image"), ("ok.png", png_bytes(sample_image(2)))])
    assert "notes.txt" in panel.status and panel.status.startswith("Added 1 image.")
    assert [item.name for item in panel.inputs.items][-1] == "ok.png"
    assert panel.details.layout.display != "none"  # the full reasons are one click away
    assert panel.generate().result(WAIT).images  # still usable


def test_upload_that_arrived_empty_says_what_to_do_instead(panel):
    before = len(panel.inputs.items)
    browser_upload(panel, [("huge.jpg", b"")], declared=3 * 2**20)
    assert "'huge.jpg' (3.0 MB) arrived empty" in panel.status
    assert "w.set_images('huge.jpg')" in panel.status
    assert len(panel.inputs.items) == before


def test_cut_off_or_empty_upload_is_refused_with_what_to_do():
    file = uploaded_files([{"name": "x.png", "size": 1000, "content": b"\x89PNG", "last_modified": None}])[0]
    with pytest.raises(ImageInputError, match=r"arrived cut off \(4 of 1,000 bytes\)"):
        load_upload(file)
    undeclared = uploaded_files({"y.png": {"metadata": {"name": "y.png"}, "content": b""}})[0]
    with pytest.raises(ImageInputError, match=r"^'y.png' arrived empty: .* w.set_images\('y.png'\) instead"):
        load_upload(undeclared)


@pytest.mark.slow
def test_negative_images_reach_the_engine_and_rerun_keeps_them(panel, tiny_pipe, image, other_image):
    browser_upload_to(panel.negative_upload, [("avoid.png", png_bytes(other_image))])
    assert [item.name for item in panel.negatives.items] == ["avoid.png"]
    assert all(getattr(part, "description", "") != "weight" for part in panel.negatives.items[0].tile.children)
    result = panel.generate().result(WAIT)
    expected = tiny_pipe.generate(image, GenerationSettings.from_kwargs(weights=(1.0,), **FAST), negative_image=[other_image])
    assert_same_pixels(result.images[0], expected.images[0])
    plain = solo(tiny_pipe, image, weights=(1.0,), **FAST)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))  # it made a difference
    panel.set_negative_images([])
    panel.history.select(panel.history.items[0])
    labelled(panel, "Re-run", ipywidgets.Button).click()
    assert len(panel.negatives.items) == 1
    assert_same_pixels(panel.result.images[0], expected.images[0])


def test_set_images_takes_paths_arrays_and_pil(tiny_pipe, tmp_path):
    path = tmp_path / "photo.png"
    sample_image(3).save(path)
    array = np.asarray(sample_image(4))
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner())
    widget.set_images([str(path), array, sample_image(5)], weights=[1.0, 0.25, 0.5])
    assert widget.status == "3 input images ready; press Generate."
    assert widget.inputs.names == ["photo.png", "numpy array of shape (80, 96, 3)", "PIL image (RGB, 96x80)"]
    assert widget.inputs.weights == [1.0, 0.25, 0.5]
    assert_same_pixels(widget.inputs.images[1], Image.fromarray(array))
    widget.inputs.items[0].tile.children[-1].click()  # its "remove" button
    assert len(widget.inputs.items) == 2 and widget.inputs.weights == [0.25, 0.5]
    with pytest.raises(ImageInputError):
        widget.set_images(str(tmp_path / "missing.png"))
    assert "missing.png" in widget.status and len(widget.inputs.items) == 2  # a failed set keeps the inputs
    widget.close()


# -- running: previews, cancel, queue, two widgets ---------------------------------------------------


def test_generate_returns_at_once_previews_arrive_and_cancel_stops_within_a_step(tiny_pipe, image):
    steered = HeldPipeline(tiny_pipe, hold_at=3)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), preview_interval=0, steps=20, num_images=2)
    widget.set_images(image)
    frames: list[bytes] = []
    future = widget.generate()
    assert not future.done()  # the kernel is free at once: the run is held at step 3 until released below
    assert steered.held.wait(WAIT)
    for tile in widget.grid.tiles:
        frames.append(tile.value)
    assert widget.grid.filled == 2 and all(frame[:2] == b"\xff\xd8" for frame in frames)  # JPEG previews
    assert widget.status.startswith("Step 3/")
    assert widget.progress.value == 3
    labelled(widget, "Cancel", ipywidgets.Button).click()  # handled at once: the kernel is not blocked
    steered.release.set()
    result = future.result(WAIT)
    assert result.cancelled and steered.steps == [1, 2, 3]  # stopped right after the step it was in
    assert widget.status.startswith("Cancelled after step 3 of ")
    assert widget.result is None and len(widget.history) == 0 and not widget.busy
    assert widget.cancel_button.disabled
    widget.close()


def test_previews_are_throttled(tiny_pipe, image):
    steered = HeldPipeline(tiny_pipe)
    widget = ImagePromptWidget(pipeline=steered, runner=InlineRunner(), preview_interval=3600, steps=3)
    widget.set_images(image)
    widget.generate().result(WAIT)
    assert widget.previews_shown == 1 and len(steered.steps) >= 3  # the first step only, then the final image
    widget.close()


@pytest.mark.slow
def test_second_generate_waits_and_a_third_replaces_it(tiny_pipe, image):
    steered = HeldPipeline(tiny_pipe, hold_at=1)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), **FAST)
    widget.set_images(image)
    widget.controls["seed"].value = 1
    first = widget.generate()
    assert steered.held.wait(WAIT)
    widget.controls["seed"].value = 2
    second = widget.generate()
    assert widget.status == "Queued: starts when the current run ends."
    widget.controls["seed"].value = 3
    third = widget.generate()
    assert widget.status == "Queued (replacing the one that was waiting): starts when the current run ends."
    assert second.cancelled()
    steered.hold_at = None
    steered.release.set()
    assert first.result(WAIT).settings.seed == 1  # each run keeps the settings of its press
    assert third.result(WAIT).settings.seed == 3
    assert steered.max_active == 1  # never two runs on the shared pipeline at once
    assert [item.seed for item in widget.history.items] == [3, 1]
    widget.close()


@pytest.mark.slow
def test_two_widgets_share_the_pipeline_and_match_solo_runs(tiny_pipe, image, other_image):
    steered = HeldPipeline(tiny_pipe)
    a = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), seed=11, **FAST)
    b = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), seed=12, **FAST)
    a.set_images(image)
    b.set_images(other_image)
    futures = [a.generate(), b.generate()]
    results = [future.result(WAIT) for future in futures]
    assert steered.max_active == 1
    for result, img, seed in zip(results, [image, other_image], [11, 12]):
        assert_same_pixels(result.images[0], solo(tiny_pipe, img, seed=seed, weights=(1.0,), **FAST).images[0])
    a.close()
    b.close()


def test_weights_load_on_first_generate_with_status(image):
    from imageprompt_widgets import ImagePromptPipeline

    widget = ImagePromptWidget(model="tiny", runner=InlineRunner(), **FAST)
    said: list[str] = []  # what the status line showed, in order, as text
    widget.status_line.observe(lambda change: said.append(html.unescape(re.sub("<[^>]+>", "", change["new"]))),
                               names="value")
    widget.set_images(image)
    assert widget.pipeline is None
    widget.generate().result(WAIT)
    assert widget.pipeline is ImagePromptPipeline.from_preset("tiny")
    assert said[1].startswith("Loading model 'tiny'"), said
    assert any(line.startswith("Step ") for line in said) and said[-1].startswith("Done: 1 image")
    widget.close()


# -- errors ---------------------------------------------------------------------------------------


def test_generate_without_images_says_what_to_do(tiny_pipe):
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner())
    future = widget.generate()
    assert isinstance(future.exception(), ImageInputError)
    assert widget.status == ("Add an image first (upload one, or w.set_images('path/to/image')), or draw from words "
                             "alone: the method “words only” (text), or blend with image share 0, and a prompt.")
    widget.close()


def test_invalid_settings_are_a_status_sentence(panel):
    panel.controls["adapter_start"].value = 0.8
    panel.controls["adapter_end"].value = 0.2
    assert isinstance(panel.generate().exception(), ValueError)
    assert panel.status == "adapter_start=0.8 must be less than adapter_end=0.2."


def test_missing_weights_offline_name_the_model_and_keep_the_panel_usable(image):
    widget = ImagePromptWidget(model="sd14", runner=InlineRunner(), **FAST)
    widget.set_images(image)
    future = widget.generate()
    if future.exception() is None:
        pytest.skip("SD 1.4 happens to be in this machine's Hugging Face cache")
    assert "CompVis/stable-diffusion-v1-4" in widget.status
    assert widget.status.count(". ") <= 1 and "Traceback" not in widget.status  # one sentence; details below
    assert "Traceback" in widget.details_text.value and widget.details.layout.display != "none"
    assert widget.pipeline is None and not widget.busy and widget.cancel_button.disabled


@pytest.mark.parametrize(
    "error, sentence",
    [
        (RuntimeError("boom in the UNet"), "Generation failed (RuntimeError: boom in the UNet); details below"),
        (MemoryError(), "Out of memory"),
    ],
)
@pytest.mark.slow
def test_a_failed_step_keeps_what_was_generated(tiny_pipe, image, error, sentence):
    if isinstance(error, MemoryError):
        error = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB")
    steered = HeldPipeline(tiny_pipe)
    widget = ImagePromptWidget(pipeline=steered, runner=InlineRunner(), **FAST)
    widget.set_images(image)
    good = widget.generate().result(WAIT)
    steered.fail_at, steered.error = 2, error
    failed = widget.generate()
    assert failed.exception() is error
    assert widget.status.startswith(sentence), widget.status
    assert widget.result is good and len(widget.history) == 1  # nothing already generated is lost
    assert not widget.busy
    again = widget.generate().result(WAIT)  # and the panel still works
    assert_same_pixels(again.images[0], good.images[0])
    widget.close()


@pytest.mark.slow
def test_kernel_stop_button_inline_leaves_the_widget_usable(tiny_pipe, image):
    steered = HeldPipeline(tiny_pipe, fail_at=2, error=KeyboardInterrupt())
    widget = ImagePromptWidget(pipeline=steered, runner=InlineRunner(), **FAST)
    widget.set_images(image)
    assert widget.generate().result(WAIT) is None
    assert widget.status.startswith("Stopped with the kernel's stop button")
    assert not widget.busy and not tiny_pipe.lock.locked()
    result = widget.generate().result(WAIT)
    assert_same_pixels(result.images[0], solo(tiny_pipe, image, weights=(1.0,), **FAST).images[0])
    widget.close()


# -- history --------------------------------------------------------------------------------------


def live_widgets() -> int:
    """How many widgets the kernel keeps alive (each holds its value, images included, until closed)."""
    from ipywidgets.widgets import widget

    return len(getattr(widget, "_instances", None) or ipywidgets.Widget.widgets)


@pytest.mark.slow
def test_history_is_bounded_in_count_and_memory(tiny_pipe, image):
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), history_size=3, steps=1, num_images=2)
    widget.set_images(image)
    for seed in range(3):
        widget.controls["seed"].value = seed
        widget.generate().result(WAIT)
        if seed == 1:
            alive = live_widgets()  # the history is full from here on
    assert live_widgets() == alive  # evicted tiles and old output tiles are closed, not leaked
    assert len(widget.history) == 3 and len(widget.history.strip.children) == 3
    # Newest run first, each run in batch order.
    assert [(item.seed, item.index) for item in widget.history.items] == [(2, 0), (2, 1), (1, 0)]
    one_item = widget.history.items[0].nbytes
    tight = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), history_bytes=one_item + 1, steps=1)
    tight.set_images(image)
    for _ in range(3):
        tight.generate().result(WAIT)
    assert len(tight.history) == 1 and tight.history.nbytes <= one_item + 1
    before = live_widgets()
    widget.close()
    assert live_widgets() < before - 50  # closing the panel closes its parts
    tight.close()


@pytest.mark.slow
def test_history_open_save_use_and_rerun(panel, tiny_pipe, tmp_path):
    panel.history.save_dir = tmp_path
    panel.controls["seed"].value = 7
    panel.controls["num_images"].value = 2
    first = panel.generate().result(WAIT)
    panel.controls["seed"].value = 8
    panel.controls["num_images"].value = 1
    panel.generate().result(WAIT)
    item = panel.history.items[1]  # the first run's first image: newest run first, then batch order
    assert (item.seed, item.index) == (7, 0)
    assert [(item.seed, item.index) for item in panel.history.items] == [(8, 0), (7, 0), (7, 1)]
    panel.history.strip.children[1].children[1].click()  # its "open" button
    assert panel.history.selected is item and panel.history.detail.layout.display != "none"
    assert panel.history.large.value[:4] == b"\x89PNG"
    labelled(panel, "Save PNG", ipywidgets.Button).click()
    saved = sorted(tmp_path.glob("*.png"))
    assert [path.name for path in saved] == ["imageprompt-seed7-0.png"]
    assert panel.status == f"Saved {saved[0]}."
    recipe = recipe_from_png(saved[0])
    assert recipe["settings"]["seed"] == 7 and recipe["index"] == 0
    assert_same_pixels(Image.open(saved[0]), first.images[0])
    labelled(panel, "Re-run", ipywidgets.Button).click()
    assert panel.controls["seed"].value == 7 and panel.controls["num_images"].value == 2
    assert_same_pixels(panel.result.images[0], first.images[0])  # the recipe reproduces the picture
    labelled(panel, "Use as input", ipywidgets.Button).click()
    assert len(panel.inputs.items) == 1
    assert_same_pixels(panel.inputs.images[0], first.images[0])


def test_the_panel_starts_from_the_presets_own_defaults():
    """The variations model was trained with a zero unconditional: its panel must not start at empty_prompt."""
    panel = ImagePromptWidget(model="tiny-variations", runner=InlineRunner())
    assert panel.controls.controls["negative"].value == "zeros"
    assert panel.controls.controls["mode"].value == "single"
    chosen = ImagePromptWidget(model="tiny-variations", runner=InlineRunner(), steps=3)
    assert chosen.controls.controls["steps"].value == 3 and chosen.controls.controls["negative"].value == "zeros"
    assert ImagePromptWidget(model="tiny", runner=InlineRunner()).controls.controls["negative"].value == "empty_prompt"


@pytest.mark.slow
def test_a_caption_run_puts_blips_caption_in_the_prompt_field_to_edit():
    panel = ImagePromptWidget(model="tiny-caption", runner=InlineRunner(), steps=2)
    panel.set_images([sample_image(0)])
    first = panel.generate().result(timeout=WAIT)
    prompt = panel.controls.controls["prompt"]
    assert first.recipe["caption"] and prompt.value == first.recipe["caption"]
    assert "edit it and Generate again" in panel.status
    again = panel.generate().result(timeout=WAIT)  # the caption, now as the typed prompt: the same picture
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))
    prompt.value = "a red square"
    edited = panel.generate().result(timeout=WAIT)
    assert edited.recipe["caption"] == "a red square"
    assert not np.array_equal(np.asarray(edited.images[0]), np.asarray(first.images[0]))


# -- honest progress ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_bar_total_is_set_before_the_first_step_and_never_changes(tiny_pipe, image):
    steered = HeldPipeline(tiny_pipe)
    widget = ImagePromptWidget(pipeline=steered, runner=InlineRunner(), steps=3, guidance_scale=1.0)
    widget.set_images(image)
    bar: list[tuple[int, int]] = []  # (value, max) after every change the browser would see
    widget.progress.observe(lambda change: bar.append((widget.progress.value, widget.progress.max)),
                            names=["value", "max"])
    said: list[str] = []
    widget.status_line.observe(lambda change: said.append(widget.status), names="value")
    widget.generate().result(WAIT)
    assert steered.steps == [1, 2, 3, 4]  # PNDM: one warm-up step more than the 3 asked
    first_step = bar.index((1, 4))
    assert bar[first_step - 1] == (0, 4)  # the total is in place before the first step …
    assert {total for _, total in bar[first_step - 1:]} == {4}  # … and stays for the whole run
    assert bar[-1] == (4, 4)
    why = "(the PNDM scheduler adds 1 warm-up step to the 3 asked for.)"
    assert said[0] == f"Starting: 4 steps {why}"
    assert any(line.startswith("Step 4/4") and line.endswith(why) for line in said)
    said.clear()
    widget.generate().result(WAIT)  # said once: the next run just counts
    assert said[0] == "Starting: 4 steps" and not any(why in line for line in said)
    widget.close()


# -- issue 13: a panel a teacher can put in front of a class --------------------------------------------
# Controls per method, the model picker, download progress, no empty picture, marked previews, upload
# counters, captions, latents, trace export, recipes, refused values.


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


# -- controls per method and structure ----------------------------------------------------------------


def test_only_the_controls_the_method_and_structure_read_are_shown():
    widget = ImagePromptWidget(model="tiny-caption", runner=InlineRunner())  # offers every method but ip_adapter
    names = set(widget.controls.controls)
    for mode in methods_for(PRESETS["tiny-caption"]):
        choose(widget.controls["mode"], mode)
        for structure in STRUCTURES:
            choose(widget.controls["structure"], structure)
            read = settings_read(mode, structure, preset_capabilities(PRESETS["tiny-caption"]))  # not SDXL
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
    monkeypatch.setattr(controls, "settings_read", lambda mode, structure, capabilities=None: settings_read(mode, structure, capabilities) | {"loras"})

    @controls.control_factory("loras")
    def lora_list(spec):
        return ipywidgets.Text(value="")  # stands for a list widget with a `value` trait

    try:
        built = controls.SettingsControls(exclude=("weights",))
        assert built.controls["loras"] in built.groups["lora"].children
        assert built.sections["lora"] in built.children and built.controls["loras"].description == "LoRAs"
        assert controls.help_of(built.controls["loras"]) == "LoRA weights (setting: loras)"
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
    checked = {"units": [], "plain": []}
    for spec in setting_specs():
        if spec.name in widget.controls.controls:
            control = widget.controls[spec.name]
            if spec.kind == "units":  # rows of controls: the help is on the add button (a Button syncs tooltip in 7.7)
                assert "tooltip" in control.add_button.keys and control.add_button.tooltip == spec.help
                checked["units"].append(spec.name)
                continue
            assert synced in control.keys and getattr(control, synced) == controls.technical_help(spec)
            checked["plain"].append(spec.name)
    assert {"steps", "seed", "guidance_scale"} <= set(checked["plain"]) and checked["units"], checked
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
    with pytest.raises(SettingsError, match=r"^height=72 is not one of the panel's choices \(native \(64\), 64, 128"):
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
    assert sorted(option_values(picker)) == sorted(PRESETS)  # grouped: real, toy world, random weights
    labels = {value: label for label, value in picker.options}
    assert labels["tiny"] == "tiny · random weights, noise · built"  # tiny_pipe built it
    assert labels["toy-ip-adapter"] == "toy-ip-adapter · toy world · shipped"  # fits the closed dropdown
    assert labels["sd14"].startswith("sd14 · about 7.2 GB · ")  # 5.5 GB + 1.7 GB
    assert labels["ip-adapter"].startswith("ip-adapter · about 8.0 GB · ")
    widget.close()


def test_the_panel_switches_between_sd1_and_sdxl_without_a_restart(image):
    """tiny → tiny-sdxl (revision, its own sliders and defaults) → tiny again, in one panel: each run is its model's,
    the status line says what changed, and the last run is the first one's pixels (nothing of SDXL stays behind)."""
    specs = {spec.name: spec for spec in setting_specs()}
    widget = ImagePromptWidget(model="tiny", runner=InlineRunner(), preview_interval=0, **FAST)
    widget.set_images(image)
    labels = {value: label for label, value in widget.model_picker.options}
    assert labels["sdxl"].startswith("sdxl · about 25.7 GB · ")  # 14 GB + 1.7 GB + 10 GB
    assert labels["sdxl-live"].startswith("sdxl-live · about 26.1 GB · ")
    assert labels["tiny-sdxl"].startswith("tiny-sdxl · random weights, noise · ")
    mode = widget.controls["mode"]
    assert {value: label for label, value in mode.options}["revision"] == (
        "image in SDXL's pooled slot (revision) → model tiny-sdxl")  # offered on SD 1.x only as a switch to SDXL

    first = widget.generate().result(WAIT)
    assert first.recipe["model"]["preset"] == "tiny" and first.trace.pooled_prompt_embeds is None
    assert widget.status.startswith("Done: 1 image")
    assert widget.controls["height"].options[0] == ("native (64)", 0)  # the loaded model's own side

    from imageprompt_widgets.loading.availability import availability

    state = availability(PRESETS["tiny-sdxl"]).status  # "built" after another test built it, else "builds in seconds"
    choose(widget.model_picker, "tiny-sdxl")
    assert widget.status == f"Model 'tiny-sdxl' chosen (offline, {state})."
    assert {value: label for label, value in mode.options}["revision"] == "image in SDXL's pooled slot (revision)"
    choose(mode, "revision")
    assert widget.model == "tiny-sdxl"
    for name, label in (("revision_strength", "pooled image"), ("noise_augmentation", "noise on image")):
        slider = labelled(widget, label, ipywidgets.FloatSlider)
        assert slider is widget.controls[name] and slider.layout.display != "none"
        assert (slider.min, slider.max, slider.step, slider.value) == (
            specs[name].min, specs[name].max, specs[name].step, specs[name].default)
    widget.controls["revision_strength"].value = 0.8
    second = widget.generate().result(WAIT)
    assert second.recipe["model"]["preset"] == "tiny-sdxl" and widget.status.startswith("Done: 1 image")
    assert (second.settings.mode, second.settings.revision_strength) == ("revision", 0.8)
    assert (second.settings.scheduler, second.settings.guidance_scale) == ("euler", 5.0)  # the preset's own
    sdxl = widget.pipeline
    assert second.trace.pooled_prompt_embeds.shape == (1, sdxl.sd.text_encoder_2.config.projection_dim)
    assert second.images[0].size == (sdxl.native_size, sdxl.native_size)
    assert widget.controls["height"].options[0] == (f"native ({sdxl.native_size})", 0)
    assert_same_pixels(second.images, sdxl.generate(image, second.settings).images)

    choose(widget.model_picker, "tiny")
    assert widget.status == ("Model 'tiny' chosen (offline, built). revision does not run on 'tiny': the method is "
                             "now repeat.")
    assert widget.controls["revision_strength"].layout.display == "none"
    third = widget.generate().result(WAIT)
    assert third.recipe["model"]["preset"] == "tiny"
    # the user's revision slider keeps its 0.8 (repeat does not read it); everything else is the first run's
    assert third.settings.revision_strength == 0.8
    assert GenerationSettings.from_kwargs(**{**third.settings.to_dict(), "revision_strength": 1.0}) == first.settings
    assert_same_pixels(third.images, first.images)
    assert [item.recipe["model"]["preset"] for item in widget.history.items] == ["tiny", "tiny-sdxl", "tiny"][::-1]
    widget.close()


def test_sdxl_micro_conditioning_boxes_say_they_take_pixel_pairs(image):
    """On SDXL the three micro-conditioning boxes say, while empty, which pair of whole pixels they take and what
    empty means (not a scale list's "e.g. 1, 0.5"); what is typed there reaches the run."""
    assert set(controls.PIXEL_PAIR_PLACEHOLDERS) == set(MICRO_CONDITIONING)
    widget = ImagePromptWidget(model="tiny-sdxl", runner=InlineRunner(), preview_interval=0, **FAST)
    widget.set_images(image)
    for name, pair in (("original_size", "height, width"), ("crops_coords_top_left", "top, left"),
                       ("target_size", "height, width")):
        box = widget.controls[name]
        assert box.layout.display != "none" and box.value == ""
        assert box.placeholder.startswith(f"{pair} in px (empty: "), box.placeholder
    assert widget.controls["adapter_scales"].placeholder == "e.g. 1, 0.5"  # a list of scales keeps its example
    widget.controls["original_size"].value = "32, 48"
    widget.controls["crops_coords_top_left"].value = "0, 8"
    result = widget.generate().result(WAIT)
    assert widget.status.startswith("Done: 1 image")
    assert (result.settings.original_size, result.settings.crops_coords_top_left, result.settings.target_size) == (
        (32, 48), (0, 8), ())
    widget.close()


@pytest.mark.slow
def test_choosing_a_method_the_model_lacks_moves_to_its_twin_and_says_so(image):
    widget = ImagePromptWidget(model="tiny", runner=InlineRunner(), **FAST)
    widget.set_images(image)
    mode = widget.controls["mode"]
    assert option_values(mode) == list(MODES)
    assert {v: label for label, v in mode.options}["ip_adapter"] == "image beside words (ip_adapter) → model toy-ip-adapter"
    choose(mode, "caption")  # a preset on this machine that captions: the trained toy world before a random twin
    assert widget.model == "toy" and widget.model_picker.value == "toy"
    assert widget.status == "caption needs a captioner (BLIP), which 'tiny' lacks: switched to model 'toy' " \
                            "(shipped with the package)."
    assert widget.controller.preset is PRESETS["toy"] and mode.value == "caption"
    result = widget.generate().result(WAIT)  # no failure after loading
    assert result.recipe["model"]["preset"] == "toy" and widget.status.startswith("Done")
    widget.close()


def test_a_hub_model_moves_to_the_hub_preset_without_loading_anything():
    widget = ImagePromptWidget(model="sd14", runner=InlineRunner())
    choose(widget.controls["mode"], "ip_adapter")
    assert widget.model == "sd14"  # not downloaded: the panel asks first (tests/test_panel_words.py)
    widget.offer.download_button.click()
    assert widget.model == "ip-adapter" and widget.pipeline is None
    assert widget.status.startswith("ip_adapter needs an IP-Adapter, which 'sd14' lacks: switched to model "
                                    "'ip-adapter' (about 8.0 GB, ")
    choose(widget.controls["mode"], "repeat")  # back: a preset with the same Stable Diffusion (1.5), asked first
    widget.offer.download_button.click()
    assert widget.model == "sd15"
    choose(widget.model_picker, "variations")  # the preset's own starting settings come with it
    assert (widget.controls["mode"].value, widget.controls["negative"].value) == ("single", "zeros")
    widget.controls["mode"].value = "tokens"  # the user's own choice stays …
    choose(widget.model_picker, "sd15")  # … the preset's own go when another model is chosen
    assert (widget.controls["mode"].value, widget.controls["negative"].value) == ("tokens", "empty_prompt")
    widget.close()


@pytest.mark.slow
def test_switching_model_while_running_cancels_the_run_and_marks_its_previews(tiny_pipe, image):
    steered = HeldPipeline(tiny_pipe, hold_at=2)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), preview_interval=0, steps=8)
    widget.set_images(image)
    first = widget.generate()
    assert steered.held.wait(WAIT)
    old = widget.controller
    choose(widget.model_picker, "tiny-caption")
    assert widget.controller is not old and widget.controller.preset is PRESETS["tiny-caption"]
    assert widget.status.endswith("The running generation was cancelled; its previews stay, marked.")
    steered.release.set()
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_no_empty_image_is_shown_in_any_state(tiny_pipe, image):
    steered = HeldPipeline(tiny_pipe, hold_at=1)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), preview_interval=3600, steps=4)
    assert_no_empty_image(widget)  # fresh
    widget.set_images(image)
    future = widget.generate()
    assert steered.held.wait(WAIT)
    assert_no_empty_image(widget)  # running
    widget.cancel()
    steered.release.set()
    future.result(WAIT)
    assert widget.controller.join(WAIT)
    assert_no_empty_image(widget)  # cancelled
    steered.hold_at = None
    steered.fail_at, steered.error = 1, RuntimeError("boom")
    widget.controls["num_images"].value = 2
    assert isinstance(widget.generate().exception(WAIT), RuntimeError)
    assert widget.controller.join(WAIT)
    assert "failed at step 1/5" in widget.grid.cells[0].caption.value
    assert widget.grid.cells[1].placeholder.layout.display != "none" or widget.grid.cells[1].filled
    assert_no_empty_image(widget)  # failed
    widget.generate().result(WAIT)
    assert widget.controller.join(WAIT)
    assert_no_empty_image(widget)  # finished
    open_section(widget, "Denoising")  # the inspector draws what is opened (no latents: no filmstrip)
    assert_no_empty_image(widget)
    assert widget.inspector.filmstrip_table.value.startswith("This run kept no latents")
    widget.history.select(widget.history.items[0])
    assert_no_empty_image(widget)
    widget.close()


def test_a_cancelled_runs_previews_stay_marked(tiny_pipe, image):
    steered = HeldPipeline(tiny_pipe, hold_at=3)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), preview_interval=0, steps=10, num_images=2)
    widget.set_images(image)
    future = widget.generate()
    assert steered.held.wait(WAIT)
    labelled(widget, "Cancel", ipywidgets.Button).click()
    steered.release.set()
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


@pytest.mark.slow
def test_the_latents_checkbox_feeds_the_denoising_filmstrip(panel):
    box = labelled(panel, "keep latents (Denoising view)", ipywidgets.Checkbox)
    assert "latents" in box.description and not box.value
    open_section(panel, "Denoising")  # open while runs finish: each run draws it
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
@pytest.mark.slow
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


@pytest.mark.slow
def test_rerun_switches_back_to_the_items_model(panel, image):
    panel.generate().result(WAIT)
    item = panel.history.items[0]
    choose(panel.controls["mode"], "caption")
    assert panel.model == "toy"  # a preset on this machine that captions: the trained toy world first
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


# -- several ControlNet units, their maps, several IP-Adapters (issue 18) -------------------------------


def unit_rows(widget: ImagePromptWidget) -> list:
    return widget.controls["control_units"].rows


def shown_map(tile) -> np.ndarray:
    """What a map tile shows the user: its PNG, decoded (the grey box hidden)."""
    assert tile.filled and tile.placeholder.layout.display == "none"
    return np.asarray(Image.open(io.BytesIO(bytes(tile.image.value))))


def test_controlnet_units_are_rows_added_and_removed_with_each_kinds_own_controls(panel):
    editor = panel.controls["control_units"]
    choose(panel.controls["structure"], "none")
    assert editor.layout.display == "none"  # structure none reads no units
    choose(panel.controls["structure"], "edges")
    assert editor.layout.display != "none" and editor.value == "" and not unit_rows(panel)
    labelled(editor, "add a ControlNet", ipywidgets.Button).click()
    (row,) = unit_rows(panel)
    assert row.kind == "depth"  # the kind not used yet: the structure's own reads edges
    assert editor.value == units_text([ControlUnit(kind="depth")])  # every field at the unit specs' defaults
    assert "ControlNet 2 · depth" in row.title.value
    depth_shown = {name for name, control in row.controls.items() if control.layout.display != "none"}
    assert depth_shown == set(UNIT_SETTINGS["depth"])  # no Canny thresholds for a depth map
    spec = {spec.name: spec for spec in unit_specs()}
    for name, control in row.controls.items():  # every range from the unit's specs
        if spec[name].kind in ("int", "float"):
            assert (control.min, control.max, control.step) == (spec[name].min, spec[name].max, spec[name].step)
    choose(row.controls["kind"], "edges")
    assert {name for name, control in row.controls.items() if control.layout.display != "none"} == \
        set(UNIT_SETTINGS["edges"])
    assert "ControlNet 2 · Canny edges" in row.title.value
    row.controls["scale"].set_state({"value": 0.5})
    row.controls["canny_low"].set_state({"value": 40})
    assert panel.controls.settings().units()[1] == ControlUnit(kind="edges", scale=0.5, canny_low=40)
    row.controls["scale"].set_state({"value": 2.5})  # outside the unit spec's range: refused with a sentence
    assert row.controls["scale"].value == 0.5 and panel.status.startswith("control scale=2.5 is outside its range")

    add = labelled(editor, "add a ControlNet", ipywidgets.Button)
    add.click()
    add.click()
    assert [row.kind for row in unit_rows(panel)] == ["edges", "depth", "depth"]  # each new one: the kind used least
    assert len(unit_rows(panel)) + 1 == MAX_CONTROL_UNITS and add.disabled  # four ControlNets in all
    assert editor.add() is None and f"of at most {MAX_CONTROL_UNITS} ControlNets" in editor.count_note.value
    second = unit_rows(panel)[1]
    labelled(unit_rows(panel)[0], "remove ControlNet", ipywidgets.Button).click()  # the others move up
    assert unit_rows(panel)[0] is second and "ControlNet 2 ·" in second.title.value and not add.disabled
    assert second.upload.description == "Structure 2"
    assert len(panel.controls.settings().units()) == 3

    choose(panel.controls["structure"], "img2img")  # no ControlNet: the rows wait, hidden, and count for nothing
    assert editor.value == "" and len(unit_rows(panel)) == 2 and editor.layout.display == "none"
    assert panel.controls.settings().units() == ()
    choose(panel.controls["structure"], "depth")
    assert [unit.kind for unit in panel.controls.settings().units()] == ["depth", "depth", "depth"]


def test_a_unit_that_does_not_fit_is_named_at_once_and_refused_by_generate(panel):
    choose(panel.controls["structure"], "edges")
    row = panel.controls["control_units"].add()
    row.controls["end"].set_state({"value": 0.3})
    row.controls["start"].set_state({"value": 0.7})
    assert panel.status == "ControlNet 2 · depth: start=0.7 must be less than end=0.3."
    future = panel.generate()
    assert isinstance(future.exception(WAIT), SettingsError)
    assert panel.status == "control_units[0]: start=0.7 must be less than end=0.3."
    assert panel.controls["control_units"].value  # nothing was thrown away


@pytest.mark.slow
def test_units_round_trip_through_load_recipe_and_rerun(panel, tiny_pipe, image, tmp_path):
    choose(panel.controls["structure"], "depth")
    panel.controls["control_scale"].value = 0.8
    editor = panel.controls["control_units"]
    first = editor.add()
    first.controls["scale"].set_state({"value": 0.6})
    first.controls["start"].set_state({"value": 0.25})
    second = editor.add(ControlUnit(kind="depth", end=0.5))
    assert second is not None
    result = panel.generate().result(WAIT)
    used = result.recipe["settings"]["control_units"]
    assert [u.to_dict() for u in result.settings.units()[1:]] == [
        ControlUnit(kind="edges", scale=0.6, start=0.25).to_dict(), ControlUnit(kind="depth", end=0.5).to_dict()]
    expected = solo(tiny_pipe, image, weights=(1.0,), structure="depth", control_scale=0.8, control_units=used,
                    **FAST)
    assert_same_pixels(result.images[0], expected.images[0])  # the rows reached the engine

    panel.history.save_dir = tmp_path
    panel.history.select(panel.history.items[0])
    labelled(panel, "Save PNG", ipywidgets.Button).click()
    (saved,) = tmp_path.glob("*.png")
    fresh = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), preview_interval=0)
    try:
        fresh.set_images(image)
        fresh.load_recipe(saved)
        assert fresh.controls["control_units"].value == used  # exactly the setting's text
        assert [row.kind for row in unit_rows(fresh)] == ["edges", "depth"]
        assert unit_rows(fresh)[0].controls["start"].value == 0.25
        again = fresh.generate().result(WAIT)
        assert again.recipe["settings"] == result.recipe["settings"]
        assert_same_pixels(again.images[0], result.images[0])
    finally:
        fresh.close()
    # A history re-run after the rows were changed puts the item's units back.
    editor.remove(unit_rows(panel)[0])
    choose(panel.controls["structure"], "none")
    rerun = panel.rerun(panel.history.items[-1]).result(WAIT)
    assert rerun.recipe["settings"] == result.recipe["settings"] and len(unit_rows(panel)) == 2
    assert_same_pixels(rerun.images[0], result.images[0])


def test_every_units_map_is_previewed_and_depth_is_computed_through_the_controller(tiny_pipe, image, other_image):
    from imageprompt_widgets.engine.controller import Finished
    from imageprompt_widgets.widget.panel import MAPS_TASK

    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), preview_interval=0, **FAST)
    tasks = []
    widget.controller.subscribe(lambda event: isinstance(event, Finished) and tasks.append(event.job.kind))
    try:
        widget.set_images(image)
        widget.controls["canny_low"].value = 30
        choose(widget.controls["structure"], "depth")
        row = widget.controls["control_units"].add()  # an edges unit with a picture of its own
        browser_upload_to(row.upload, [("other.png", png_bytes(other_image))])
        assert row.picture.names == ["other.png"] and upload_count(row.upload) == 1
        assert tasks.count(MAPS_TASK) >= 1  # the depth map came through the controller (a task, not a run)
        assert widget.status == "1 input image ready; press Generate."  # the task said nothing there

        expected = tiny_pipe.structure_maps(settings=widget.controls.settings(), structure_image=[image, other_image])
        depth, edges = widget.maps.tiles
        assert "ControlNet 1 · depth" in depth.caption.value and "ControlNet 2 · Canny edges" in edges.caption.value
        np.testing.assert_array_equal(shown_map(depth), np.asarray(expected[0].image))
        np.testing.assert_array_equal(shown_map(edges), np.asarray(expected[1].image))
        assert expected[1].unit.canny_low == 100  # the row's own thresholds, not the structure's (30)

        computed = tasks.count(MAPS_TASK)
        row.controls["canny_high"].value = 150  # only the edges change: the depth map is kept, not recomputed
        assert tasks.count(MAPS_TASK) == computed and depth.filled
        result = widget.generate().result(WAIT)
        assert result.recipe["structure_input"] == [fingerprint(image)[:16], fingerprint(other_image)[:16]]
        assert "in this run" in widget.maps.note.value
        for index, tile in enumerate(widget.maps.tiles):  # the run's traced maps, the same pixels as the preview
            traced = result.trace.extras["control_image" if index == 0 else f"control_image_{index}"][0, 0]
            np.testing.assert_array_equal(shown_map(tile), (traced * 255).round().byte().numpy())
        assert "ControlNet 1 · depth" in widget.maps.tiles[0].caption.value  # a depth run's map is no "edge map"
        assert_no_empty_image(widget)
    finally:
        widget.close()


@pytest.mark.slow
def test_a_depth_map_waits_in_a_grey_box_for_the_model_and_for_a_running_generation(tiny_pipe, image):
    unloaded = ImagePromptWidget(model="tiny", runner=InlineRunner())
    unloaded.set_images(image)
    choose(unloaded.controls["structure"], "depth")
    (tile,) = unloaded.maps.tiles
    assert not tile.filled and "appears once the model has loaded" in tile.placeholder.value
    assert unloaded.pipeline is None  # a preview never loads the model by itself
    assert_no_empty_image(unloaded)
    unloaded.close()

    steered = HeldPipeline(tiny_pipe, hold_at=1)
    widget = ImagePromptWidget(pipeline=steered, runner=ThreadRunner(), preview_interval=3600, steps=3)
    try:
        widget.set_images(image)
        future = widget.generate()
        assert steered.held.wait(WAIT)
        choose(widget.controls["structure"], "depth")  # while the run holds the pipeline
        (tile,) = widget.maps.tiles
        assert not tile.filled and "when the current run ends" in tile.placeholder.value
        assert_no_empty_image(widget)
        steered.release.set()
        future.result(WAIT)
        assert widget.controller.join(WAIT)  # the run, then the maps' task it left waiting
        expected = tiny_pipe.structure_maps(images=[image], settings=widget.controls.settings())[0].image
        np.testing.assert_array_equal(shown_map(widget.maps.tiles[0]), np.asarray(expected))
    finally:
        widget.close()


@pytest.mark.slow
def test_several_ip_adapters_get_a_strip_and_a_scale_each_and_reach_the_engine(image, other_image):
    widget = ImagePromptWidget(model="tiny-ip-adapter-plus-and-face", runner=InlineRunner(), **FAST)
    try:
        slots = widget.adapter_slots
        assert widget.controls["mode"].value == "ip_adapter" and slots.layout.display != "none"
        assert ["tiny-ip-adapter-plus" in slots.slots[0].title.value,
                "tiny-ip-adapter-plus-face" in slots.slots[1].title.value] == [True, True]
        spec = next(spec for spec in setting_specs() if spec.name == "adapter_scales")
        scale = slots.slots[1].scale
        assert (scale.min, scale.max, scale.step) == (spec.min, spec.max, spec.step)
        widget.controls["scale"].value = 0.8  # adapter_scales empty: each adapter uses scale, the sliders show it
        assert [slot.scale.value for slot in slots.slots] == [0.8, 0.8]
        widget.set_images(image)
        browser_upload_to(slots.slots[0].upload, [("face.png", png_bytes(other_image))])
        assert slots.slots[0].strip.names == ["face.png"] and upload_count(slots.slots[0].upload) == 1
        scale.set_state({"value": 0.3})  # as the browser moves it
        assert widget.controls["adapter_scales"].value == "0.8, 0.3"
        result = widget.generate().result(WAIT)
        direct = widget.pipeline.generate(image, GenerationSettings.from_kwargs(**{**FAST, "mode": "ip_adapter",
                                          "scale": 0.8, "adapter_scales": (0.8, 0.3)}),
                                          adapter_images=[[other_image], [image]])
        assert_same_pixels(result.images[0], direct.images[0])  # the strips reached the engine as adapter_images
        assert result.recipe["adapter_inputs"] == [[fingerprint(other_image)[:16]], [fingerprint(image)[:16]]]
        widget.controls["adapter_scales"].value = "1.5, 0.25"  # a recipe sets the setting: the sliders follow
        assert [slot.scale.value for slot in slots.slots] == [1.5, 0.25]
        choose(widget.controls["mode"], "caption")  # another method (and model): no adapters' strips
        assert slots.layout.display == "none" and widget.model == "toy"  # the trained toy world captions offline
        assert widget.controls["adapter_scales"].value == ""  # two scales would not fit a model without adapters
    finally:
        widget.close()
    single = ImagePromptWidget(model="tiny-ip-adapter-plus", runner=InlineRunner(), **FAST)
    assert single.adapter_slots.layout.display == "none" and not single.adapter_slots.slots  # as it was
    assert single.adapter_slots.adapter_images([image]) is None
    single.close()


def test_adapter_block_scales_field_says_what_is_wrong_and_switches_to_custom():
    widget = ImagePromptWidget(model="tiny-ip-adapter-plus", runner=InlineRunner(), **FAST)
    try:
        field = widget.controls["adapter_block_scales"]
        blocks = widget.controls["adapter_blocks"]
        assert field.placeholder.startswith("e.g. {") and field.layout.display != "none"
        field.set_state({"value": "{'up': 1}"})  # not JSON
        assert widget.status.startswith("adapter_block_scales is not JSON") and blocks.value == "all"
        field.set_state({"value": '{"up": {"block_1": [0, 1, 0]}}'})
        assert blocks.value == "custom" and widget.status.startswith("adapter blocks is now custom")
        assert widget.controls.settings().block_scales() == {"up": {"block_1": [0, 1, 0]}}
        choose(blocks, "style")  # a named choice beside a dictionary: the engine's sentence, at once
        assert widget.status.startswith("adapter_block_scales replaces adapter_blocks='style'")
        choose(blocks, "custom")
        field.set_state({"value": ""})
        assert blocks.value == "all"
    finally:
        widget.close()


@pytest.mark.slow
def test_the_inspector_shows_each_adapters_tokens_for_ip_adapter_runs(image, other_image):
    from imageprompt_widgets.views.adapter_tokens import adapter_tokens_view

    widget = ImagePromptWidget(model="tiny-ip-adapter-plus-and-face", runner=InlineRunner(), **FAST)
    try:
        widget.set_images(image)
        widget.adapter_slots.slots[1].set_images([other_image])
        result = widget.generate().result(WAIT)
        open_section(widget, "Adapter tokens")
        inspector = widget.inspector
        assert "Adapter tokens" not in inspector.errors
        assert [picture.value[:4] for picture in inspector.adapter_images] == [b"\x89PNG"] * 2
        for adapter in range(2):
            view = inspector.views[f"Adapter tokens {adapter}"]
            expected = adapter_tokens_view(widget.pipeline.adapter_tokens(result, adapter=adapter))
            torch.testing.assert_close(view.tokens, expected.tokens, rtol=0, atol=0)
            torch.testing.assert_close(view.attention_maps, expected.attention_maps, rtol=0, atol=0)
        assert "tiny-ip-adapter-plus-face: 16 tokens" in inspector.adapter_text.value
        assert_no_empty_image(widget)
    finally:
        widget.close()
    plain = ImagePromptWidget(model="tiny", runner=InlineRunner(), **FAST)
    plain.set_images(image)
    plain.generate().result(WAIT)
    assert "Adapter tokens" not in plain.inspector.shown_sections and not plain.inspector.adapter_images  # hidden
    plain.close()


def test_a_method_an_sdxl_model_lacks_moves_to_an_sdxl_preset():
    """From SDXL, ip_adapter moves to SDXL's adapter (its twin offline), not to the SD 1.x toy world's."""
    widget = ImagePromptWidget(model="tiny-sdxl", runner=InlineRunner(), **FAST)
    labels = {value: label for label, value in widget.controls["mode"].options}
    assert labels["ip_adapter"] == "image beside words (ip_adapter) → model tiny-sdxl-ip-adapter"
    assert labels["caption"].endswith("→ model toy")  # no SDXL preset captions: the nearest one that does
    choose(widget.model_picker, "sdxl")
    labels = {value: label for label, value in widget.controls["mode"].options}
    assert labels["ip_adapter"] == "image beside words (ip_adapter) → asks to download sdxl-ip-adapter"
    widget.close()
