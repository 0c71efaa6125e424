"""Issue 25: a panel a class understands at a glance. Words only (no image), a mode change that never downloads
by itself, dropdowns that always show an option, plain words with the setting's name on hover, pictures at
teaching size, the toy world named wherever the panel advises going offline.

Driven as the browser drives the panel (``set_state`` with an option's index, ``.click()``)."""

from __future__ import annotations

import io

import ipywidgets
import numpy as np
import pytest
from helpers import WAIT
from PIL import Image

from imageprompt_widgets import ImagePromptWidget
from imageprompt_widgets.faults import ModelLoadError
from imageprompt_widgets.presets import PRESETS
from imageprompt_widgets.settings import CHOICE_WORDS, choice_label, setting_specs
from imageprompt_widgets.widget import InlineRunner
from imageprompt_widgets.widget.controls import NATIVE_SIZE, help_of
from imageprompt_widgets.widget.gallery import TILE_PX, enlarged, recipe_line
from imageprompt_widgets.widget.panel import NO_INPUT, START

FAST = {"steps": 2, "guidance_scale": 7.5}


def choose(dropdown: ipywidgets.Dropdown, value) -> None:
    """Pick an option as the browser does: it sends the option's index."""
    values = [option[1] if isinstance(option, tuple) else option for option in dropdown.options]
    dropdown.set_state({"index": values.index(value)})


def png_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(bytes(data))).convert("RGB")


# -- words only -------------------------------------------------------------------------------------


def test_a_prompt_alone_generates_in_the_words_only_mode(tiny_pipe):
    panel = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), **FAST)
    assert panel.status == START and not panel.inputs.items
    choose(panel.controls["mode"], "text")
    assert "prompt" in panel.controls.shown and "scale" not in panel.controls.shown  # no image controls
    panel.controls["prompt"].value = "a cat"
    result = panel.generate().result(WAIT)
    expected = tiny_pipe.generate(mode="text", prompt="a cat", seed=0, **FAST)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected.images[0]))
    assert panel.status.startswith("Done: 1 image") and panel.grid.filled == 1
    # The Inspector shows what applies to a run without an image: no section about the image.
    assert panel.inspector.shown_sections == ("Tensors", "Attention", "Denoising")
    assert "words-only run" in panel.inspector.placeholder.value
    panel.close()


def test_blend_at_image_share_zero_needs_no_image_and_otherwise_says_how_to_go_without(tiny_pipe):
    panel = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), **FAST)
    choose(panel.controls["mode"], "blend")
    panel.controls["prompt"].value = "a cat"
    future = panel.generate()  # image share 0.5: the image is missing
    with pytest.raises(ValueError):
        future.result(WAIT)
    assert panel.status == NO_INPUT
    panel.controls["image_weight"].value = 0.0
    result = panel.generate().result(WAIT)
    expected = tiny_pipe.generate(mode="text", prompt="a cat", seed=0, **FAST)  # exactly text-to-image
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected.images[0]))
    choose(panel.controls["mode"], "text")
    panel.controls["prompt"].value = ""
    with pytest.raises(ValueError):
        panel.generate().result(WAIT)
    assert panel.status == "Type a prompt first: a words-only run draws what it names."
    panel.close()


# -- a mode change never downloads on its own ------------------------------------------------------


def test_a_method_only_a_download_can_run_asks_first_and_stay_changes_nothing():
    panel = ImagePromptWidget(model="sd14", runner=InlineRunner())
    mode = panel.controls["mode"]
    assert {value: label for label, value in mode.options}["ip_adapter"].endswith("→ asks to download ip-adapter")
    choose(mode, "ip_adapter")
    assert panel.model == "sd14" and panel.pipeline is None  # nothing switched, nothing loaded
    assert panel.status == ("ip_adapter needs an IP-Adapter, which 'sd14' lacks: 'ip-adapter' can, and downloads "
                            "about 8.0 GB first. Download it, or stay on 'sd14'?")
    assert panel.offer.layout.display is None
    assert panel.offer.download_button.description == "Download ip-adapter (about 8.0 GB)"
    assert panel.offer.stay_button.description == "Stay on sd14"
    with pytest.raises(ValueError):
        panel.generate().result(WAIT)  # the question is open: Generate says so instead of running
    panel.offer.stay_button.click()
    assert (panel.model, mode.value, panel.offer.layout.display) == ("sd14", "repeat", "none")
    assert panel.status == "Stayed on model 'sd14' with repeat; nothing is downloaded."
    choose(mode, "ip_adapter")
    panel.offer.download_button.click()  # the user's own choice: the model is chosen, the next Generate downloads
    assert panel.model == "ip-adapter" and panel.pipeline is None and panel.offer.layout.display == "none"
    assert "The next Generate downloads it" in panel.status
    panel.close()


def test_from_the_toy_world_a_mode_change_moves_to_a_preset_on_this_machine():
    panel = ImagePromptWidget(model="toy", runner=InlineRunner())
    choose(panel.controls["mode"], "ip_adapter")
    assert panel.model == "toy-ip-adapter" and panel.offer.layout.display == "none"  # the toy world's, trained
    assert panel.status == ("ip_adapter needs an IP-Adapter, which 'toy' lacks: switched to model "
                            "'toy-ip-adapter' (shipped with the package).")
    panel.close()


def test_a_toy_twin_is_preferred_over_the_random_one():
    """A trained toy preset that can run the method (shipped in the package) wins over the random tiny twin."""
    panel = ImagePromptWidget(model="toy", runner=InlineRunner())
    assert panel._preset_for("ip_adapter", PRESETS["toy"]) == "toy-ip-adapter"
    assert panel._preset_for("ip_adapter", PRESETS["tiny"]) == "toy-ip-adapter"  # trained before random
    panel.close()


# -- every dropdown shows an option; plain words, the setting's name on hover --------------------------


def test_height_and_width_show_native_and_read_as_the_models_own_size():
    panel = ImagePromptWidget(model="tiny")
    for name in ("height", "width"):
        control = panel.controls[name]
        assert control.index == 0 and control.label == NATIVE_SIZE  # not an empty box (index None)
    assert panel.controls.settings().height is None and panel.controls.settings().width is None
    panel.controls.apply({"height": 128})
    assert panel.controls["height"].label == "128" and panel.controls.settings().height == 128
    panel.controls.apply({"height": None})
    assert panel.controls["height"].index == 0 and panel.controls.settings().height is None
    every = [widget for widget in panel.controls.controls.values() if isinstance(widget, ipywidgets.Dropdown)]
    assert every and all(dropdown.index is not None for dropdown in every + [panel.model_picker])
    panel.close()


def test_controls_speak_plain_words_and_name_the_setting_on_hover():
    panel = ImagePromptWidget(model="tiny")
    labels = {spec.name: spec.label for spec in setting_specs()}
    assert labels["mode"] == "method" and labels["scheduler"] == "sampler" and labels["norm_match"] != "match text norm"
    assert (labels["steps"], labels["seed"]) == ("steps", "seed")  # the contract's labels stay
    assert labels["scale"] != "weight" and labels["image_weight"] != "image weight"  # one word, one meaning
    for name, control in panel.controls.controls.items():
        if labels[name].replace(" ", "_") != name and not isinstance(control, ipywidgets.Box):  # Box: units' rows
            assert help_of(control).endswith(f"(setting: {name})"), name
    scheduler = {value: label for label, value in panel.controls["scheduler"].options}
    assert scheduler["dpmpp_2m_karras"] == "DPM++ Karras (dpmpp_2m_karras)"  # the words, then the name
    assert choice_label("mode", "text") == "words only, no image (text)"
    assert set(CHOICE_WORDS["mode"]) == set({v: k for k, v in panel.controls["mode"].options})
    panel.close()


# -- the picker: real, toy world, random weights ------------------------------------------------------


def test_the_picker_groups_real_toy_and_random_presets_and_random_ones_say_noise():
    panel = ImagePromptWidget(model="tiny")
    options = panel.model_picker.options
    names = [value for _, value in options]
    random = [name for name in names if PRESETS[name].offline_builder]
    assert names.index("toy") > max(names.index(name) for name in ("sd14", "sd15", "ip-adapter", "caption"))
    assert names.index("toy") < min(names.index(name) for name in random)
    labels = {value: label for label, value in options}
    for name in random:
        assert "random weights, noise" in labels[name], labels[name]
    assert "random" not in labels["toy"] and "noise" not in labels["toy"] and "toy world" in labels["toy"]
    panel.close()


def test_the_panel_shows_the_toy_worlds_banner_and_the_random_weights_banner():
    panel = ImagePromptWidget(model="toy")
    assert "The toy world" in panel.banner.value and panel.banner.layout.display is None
    choose(panel.model_picker, "tiny")
    assert "Random weights" in panel.banner.value and "noise" in panel.banner.value
    choose(panel.model_picker, "sd14")
    assert panel.banner.layout.display == "none"
    panel.close()


def test_offline_advice_names_the_toy_world_not_the_noise_model(monkeypatch):
    from imageprompt_widgets.faults import _no_network_sentence

    sentence = _no_network_sentence("CompVis/stable-diffusion-v1-4")
    assert "model='toy'" in sentence and "model='tiny'" not in sentence
    assert issubclass(ModelLoadError, Exception)


# -- pictures at teaching size ------------------------------------------------------------------------


def test_small_outputs_are_shown_enlarged_pixel_by_pixel_with_a_big_view(tiny_pipe, image):
    panel = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), **FAST)
    panel.set_images(image)
    result = panel.generate().result(WAIT)
    picture = result.images[0]
    assert max(picture.size) < TILE_PX  # the tiny model's 64 px
    shown = png_image(panel.grid.tiles[0].value)
    factor = -(-TILE_PX // max(picture.size))
    assert shown.size == (picture.width * factor, picture.height * factor)
    assert np.array_equal(np.asarray(shown)[::factor, ::factor], np.asarray(picture))  # each pixel a square
    panel.big_view.value = True
    assert panel.grid.tiles[0].layout.width == "100%" and png_image(panel.grid.tiles[0].value).width >= 512
    panel.big_view.value = False
    assert panel.grid.tiles[0].layout.width == f"{TILE_PX}px"
    assert enlarged(Image.new("RGB", (600, 300)), TILE_PX).size == (600, 300)  # never shrunk or blown up
    panel.close()


def test_history_says_model_method_steps_seed_and_folds_the_recipe(tiny_pipe, image):
    panel = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), **FAST)
    panel.set_images(image)
    panel.generate().result(WAIT)
    panel.controls["steps"].value = 3
    panel.generate().result(WAIT)
    tiles = panel.history.strip.children
    texts = [tile.children[2].value for tile in tiles]
    assert "tiny · repeat · 3 steps · seed 0" in texts[0] and "tiny · repeat · 2 steps · seed 0" in texts[1]
    assert recipe_line(panel.history.items[0].recipe) == "tiny · repeat · 3 steps · seed 0"
    tiles[0].children[1].click()  # "open"
    assert panel.history.recipe_fold.selected_index is None  # the recipe is folded away until opened
    assert '&quot;steps&quot;: 3' in panel.history.recipe_text.value  # the opened item's own recipe
    panel.close()


def test_adapter_tokens_show_only_for_a_run_that_fed_an_adapter(tiny_pipe, image):
    panel = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), **FAST)
    panel.set_images(image)
    panel.generate().result(WAIT)
    assert "Adapter tokens" not in panel.inspector.shown_sections
    assert "What CLIP saw" in panel.inspector.shown_sections
    panel.close()


def test_the_status_line_is_plain_words_with_the_speed_on_hover():
    """A class reads "Done: 1 image in 2.4 s, seed 0."; it/s and the stage timings are there on hover."""
    from imageprompt_widgets.engine.runners import InlineRunner
    from imageprompt_widgets.loading.offline import sample_image

    panel = ImagePromptWidget(model="tiny", runner=InlineRunner(), steps=2)
    panel.set_images([sample_image()])
    panel.generate().result()
    assert panel.status.startswith("Done: 1 image") and "it/s" not in panel.status
    line = panel.status_line.value
    assert "title='" in line and "UNet steps per second (it/s)" in line and "denoising" in line
    panel.close()
