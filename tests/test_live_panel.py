"""The panel's live toggle, LoRA label and model-aware controls, driven as the browser drives them.

No sleeps: a burst of changes is made while the test thread holds the pipeline's run lock, so the run it
interrupts is provably still waiting; every wait is bounded only to catch a deadlock.
"""

from __future__ import annotations

import pytest
from helpers import WAIT

from imageprompt_widgets import ImagePromptWidget
from imageprompt_widgets.engine.controller import Finished
from imageprompt_widgets.loading.offline import sample_image
from imageprompt_widgets.presets import PRESETS


@pytest.fixture
def widget():
    panel = ImagePromptWidget("tiny", steps=2)
    panel.set_images([sample_image(1)])
    yield panel
    panel.close()


def finished_runs(panel: ImagePromptWidget) -> list:
    seen: list = []
    panel.controller.subscribe(lambda event: seen.append(event) if isinstance(event, Finished) else None)
    return seen


def test_live_moves_to_the_live_twin_runs_at_once_and_goes_back_when_ticked_off(widget):
    assert widget.model == "tiny" and not widget.live.value
    widget.live.set_state({"value": True})  # as the browser ticks it
    assert widget.model == "tiny-live"
    assert "switched to 'tiny-live'" in widget.status or widget.busy
    assert widget.controller.join(WAIT)
    result = widget.result
    assert result is not None and result.recipe["model"]["preset"] == "tiny-live"
    live_defaults = dict(PRESETS["tiny-live"].defaults)
    assert result.settings.scheduler == live_defaults["scheduler"] == "lcm"
    assert result.settings.steps == live_defaults["steps"]
    widget.live.set_state({"value": False})
    assert widget.model == "tiny"
    assert widget.controls["scheduler"].value == "pndm"  # the twin's own settings are undone
    assert widget.status == "Live is off: back to 'tiny'."


@pytest.mark.slow
def test_every_change_re_runs_while_live_and_nothing_runs_when_it_is_off(widget):
    widget.controls["seed"].set_state({"value": 5})
    assert not widget.busy and widget.result is None  # not live: a change only changes the control
    widget.live.value = True
    assert widget.controller.join(WAIT)
    widget.controls["seed"].set_state({"value": 6})
    assert widget.controller.join(WAIT)
    assert widget.result.settings.seed == 6
    widget.inputs.items[0].weight.set_state({"value": 0.5})  # an input's weight slider, released
    assert widget.controller.join(WAIT)
    assert widget.result.settings.weights == (0.5,)
    widget.set_images([sample_image(2), sample_image(3)])  # images added or replaced
    assert widget.controller.join(WAIT)
    assert len(widget.result.recipe["inputs"]) == 2
    assert widget.live.runs_started == 4


@pytest.mark.slow
def test_a_burst_of_changes_cancels_the_running_run_and_runs_only_the_newest(widget):
    widget.live.value = True
    assert widget.controller.join(WAIT)
    pipe = widget.controller.pipeline
    runs = finished_runs(widget)
    before = len(widget.history.items)
    assert pipe.lock.acquire()  # every run now waits for the lock: the burst arrives while one is "running"
    try:
        for seed in (11, 12, 13):
            widget.controls["seed"].set_state({"value": seed})
    finally:
        pipe.lock.release()
    assert widget.controller.join(WAIT)
    assert [event.result.settings.seed for event in runs] == [13]  # 11 cancelled, 12 replaced while waiting
    assert len(widget.history.items) == before + 1
    assert widget.result.settings.seed == 13


def test_a_model_without_a_live_twin_stays_and_says_so():
    panel = ImagePromptWidget("tiny-ip-adapter", steps=2)
    try:
        panel.live.value = True  # no images yet: nothing runs
        assert panel.model == "tiny-ip-adapter" and not panel.busy
        assert panel.status == "Live: every change re-runs (tip: sd15 or tiny have a fast 4-step live twin)."
        panel.live.value = False
        assert panel.status == "Live is off: press Generate to run."
    finally:
        panel.close()


@pytest.mark.slow
def test_the_loras_of_the_loaded_model_are_listed_under_the_picker():
    panel = ImagePromptWidget("tiny", steps=2, loras=[("tiny-lora", 0.5)])
    try:
        assert panel.lora_label.layout.display == "none"  # nothing loaded yet
        panel.set_images([sample_image(1)])
        assert panel.generate().result(WAIT) is not None
        assert panel.controller.join(WAIT)
        assert panel.lora_label.layout.display is None
        assert "LoRA: tiny-lora 0.5" in panel.lora_label.value
        assert panel.result.recipe["model"]["loras"][0]["weight"] == 0.5
    finally:
        if panel.pipeline is not None:
            panel.pipeline.unload_loras()  # the cached tiny pipeline is shared with other tests
        panel.close()


def test_the_negative_prompt_is_hidden_for_a_model_without_sds_text_encoder():
    panel = ImagePromptWidget("tiny", steps=2)
    try:
        assert "negative_prompt" in panel.controls.shown
        panel.set_model("tiny-variations")  # the image-variations UNet reads no text
        assert "negative_prompt" not in panel.controls.shown
        assert panel.controls["negative_prompt"].layout.display == "none"
        panel.set_model("tiny")
        assert "negative_prompt" in panel.controls.shown
    finally:
        panel.close()


@pytest.mark.slow
def test_negative_text_is_put_aside_for_a_model_without_text_and_comes_back():
    """tiny-variations starts from a zeros negative, which refuses negative text: switching must not fail, and
    what the user typed is not lost."""
    panel = ImagePromptWidget("tiny", steps=2)
    try:
        panel.set_images([sample_image(1)])
        panel.controls["negative_prompt"].set_state({"value": "blurry"})
        panel.set_model("tiny-variations")
        assert panel.model == "tiny-variations" and panel.controls["negative"].value == "zeros"
        assert panel.controls["negative_prompt"].value == ""
        assert panel.generate().result(WAIT).settings.negative_prompt == ""
        assert panel.controller.join(WAIT)
        panel.set_model("tiny")
        assert panel.controls["negative_prompt"].value == "blurry"
        assert panel.controls["negative"].value == "empty_prompt"
    finally:
        panel.close()
