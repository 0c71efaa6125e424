"""The widget's Inspector tab: it fills from a real tiny run, buttons act as a user's clicks."""

from __future__ import annotations

import html
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from imageprompt_widgets import views
from imageprompt_widgets.loading.offline import sample_image as make_image
from imageprompt_widgets.widget.inspector import (
    DIRECTION_GAP_TEXT,
    EMPTY_TEXT,
    NO_ATTENTION_TEXT,
    NO_LATENTS_TEXT,
    POOLED_PROMPT,
    POOLED_REFERENCES,
    SECTION_TITLES,
    InspectorTab,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def inputs():
    return [make_image(0), make_image(1)]


@pytest.fixture(scope="module")
def run(tiny_pipe, inputs):
    return tiny_pipe.generate(inputs, steps=2, seed=1, trace_latents=True)


def open_section(tab: InspectorTab, title: str) -> None:
    """Open one section, as a user's click on its title does (a section draws when opened)."""
    tab.sections.selected_index = tab.shown_sections.index(title)


def _png_size(value: bytes | memoryview) -> tuple[int, int]:
    value = bytes(value)  # ipywidgets 8 holds bytes as a memoryview
    assert value.startswith(PNG_MAGIC)
    return Image.open(io.BytesIO(value)).size


def test_tab_is_empty_until_a_run_is_shown():
    tab = InspectorTab()
    assert tab.placeholder.value == EMPTY_TEXT
    assert tab.sections.layout.display == "none"
    assert tab.interpolation_button.disabled
    assert [tab.sections.get_title(i) for i in range(len(SECTION_TITLES))] == list(SECTION_TITLES)


def test_every_section_fills_after_a_run(tiny_pipe, run, inputs):
    tab = InspectorTab()
    tab.show(run, tiny_pipe, inputs)
    for title in tab.shown_sections:  # opened one after the other, as a user would
        open_section(tab, title)
    assert tab.errors == {} and tab.pending == set()
    assert tab.sections.layout.display is None
    assert tab.placeholder.value.startswith(f"{len(run.trace.tensors())} tensors traced; the run took ")
    assert f"({run.unet_calls} UNet calls)" in tab.placeholder.value and "denoising" in tab.placeholder.value
    for line in run.trace.summary().splitlines():  # the one-liners, exactly
        assert html.escape(line) in tab.summary.value
    for image in (tab.clip_image, tab.scale_gap_image, tab.similarity_image, tab.token_image, tab.filmstrip_image):
        width, height = _png_size(image.value)
        assert width > 100 and height > 100
    assert bytes(tab.interpolation_image.value) == b""  # generated only on request
    # The numbers behind the pictures are the views of this very trace.
    assert torch.equal(tab.views["Scale gap"].image_norms, run.trace.prompt_embeds[0].norm(dim=-1))
    assert tab.scale_gap_text.value == html.escape(tab.views["Scale gap"].describe())
    assert tab.views["Similarity"].matrix.shape == (2, 2)
    torch.testing.assert_close(
        tab.views["Similarity"].matrix, views.cosine_similarity(run.trace.image_embeds), rtol=0, atol=0
    )
    assert tab.token_text.value == "77 prompt tokens x 32 dims, 1 distinct rows."
    assert tab.views["Denoising"].steps == run.trace.latent_steps
    assert "step" in tab.filmstrip_table.value and "preview decoder" in tab.filmstrip_table.value
    assert "beside the original" in tab.clip_text.value
    assert not tab.interpolation_button.disabled



def test_on_the_toy_world_the_tensors_section_says_what_the_judge_read(tiny_pipe, run, inputs, tmp_path):
    """Issue 24, item 6: on a toy preset the Tensors section adds the run's scoreboard row (the input as the user gave
    it, here a file path); on any other model it does not."""
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.toy import world
    from imageprompt_widgets.toy.judge import judge

    toy = ImagePromptPipeline.from_preset("toy")
    path = tmp_path / "red_circle.png"
    world.Scene("circle", "red", "blue", 10, 12, 30).draw().save(path)
    result = toy.generate(str(path), mode="caption", steps=3, seed=5)
    tab = InspectorTab()
    tab.show(result, toy, [str(path)])
    open_section(tab, "Tensors")
    assert tab.errors == {}
    text = html.unescape(re.sub("<[^>]+>", "", tab.summary.value))
    seen = judge(result.images[0])
    output = f"{seen.colour} {seen.shape} on {seen.background}" if seen.colour else f"nothing on {seen.background}"
    assert (f"The toy world's judge read the input as red circle on blue and the output as {output}: "
            in text)
    kept = [name for name, value in (("colour", "red"), ("shape", "circle"), ("background", "blue"))
            if getattr(seen, name) == value]
    assert text.rstrip().endswith(f"kept {', '.join(kept)}." if kept else "kept none of colour, shape and background.")
    assert text.startswith(result.trace.summary())

    tiny = InspectorTab()
    tiny.show(run, tiny_pipe, inputs)  # random twins: no world, no judge
    open_section(tiny, "Tensors")
    assert tiny.errors == {} and "Tensors" not in tiny.pending
    assert html.escape(run.trace.summary().splitlines()[0]) in tiny.summary.value and "judge" not in tiny.summary.value

@pytest.mark.slow
def test_compare_button_adds_the_typed_texts(tiny_pipe, run):
    tab = InspectorTab()
    tab.show(run, tiny_pipe)
    open_section(tab, "Similarity")
    before = _png_size(tab.similarity_image.value)
    tab.similarity_texts.value = "a cat; a red dog"
    tab.similarity_button.click()
    view = tab.views["Similarity"]
    assert view.col_labels == ["image 1", "image 2", "'a cat'", "'a red dog'"]
    assert _png_size(tab.similarity_image.value)[0] > before[0]
    assert "CLIP text tower with projection" in tab.similarity_note.value
    text = tiny_pipe.clip_text_tower().embed(["a cat", "a red dog"])
    torch.testing.assert_close(view.matrix[:, 2:], views.cosine_similarity(run.trace.image_embeds, text))


@pytest.mark.slow
def test_interpolate_button_generates_the_strip_with_the_runs_seed(tiny_pipe, run):
    tab = InspectorTab()
    tab.show(run, tiny_pipe)
    tab.interpolation_count.value = 2
    tab.interpolation_button.click()  # empty text: towards the second input image
    view = tab.views["Interpolation"]
    assert len(view.images) == 2
    assert _png_size(tab.interpolation_image.value)[0] >= 2 * 128
    assert tab.interpolation_note.value == "2 images, t = 0.00, 1.00, seed 1."
    # t = 0 is the first input image alone, with the run's own settings.
    alone = tiny_pipe.generate(make_image(0), steps=2, seed=1)
    assert np.array_equal(np.asarray(view.images[0]), np.asarray(alone.images[0]))


def test_sections_explain_what_is_missing_and_the_rest_still_fills(tiny_pipe, inputs):
    result = tiny_pipe.generate(inputs[0], steps=1, seed=0, guidance_scale=1.0)  # no traced latents, one image
    tab = InspectorTab()
    tab.show(result, tiny_pipe)
    tab.draw_all()
    assert tab.errors == {}  # no latents is no error: the tab says how to get them, from the panel
    assert tab.filmstrip_table.value == html.escape(NO_LATENTS_TEXT)
    assert "trace_latents" not in tab.filmstrip_table.value
    assert bytes(tab.filmstrip_image.value) == b"" and tab.filmstrip_image.layout.display == "none"
    assert tab.filmstrip_x0.layout.display == "none"
    assert bytes(tab.token_image.value).startswith(PNG_MAGIC)
    assert tab.clip_text.value.endswith("(normalisation undone).")
    tab.interpolation_button.click()
    assert tab.interpolation_note.value == "Type a text to interpolate towards (this run had one input image)."


def test_clear_empties_every_section(tiny_pipe, run):
    tab = InspectorTab()
    tab.show(run, tiny_pipe)
    tab.clear()
    assert tab.placeholder.value == EMPTY_TEXT
    assert tab.views == {} and tab.result is None
    assert all(bytes(image.value) == b"" for image in (tab.clip_image, tab.scale_gap_image, tab.similarity_image,
                                                 tab.token_image, tab.filmstrip_image))
    assert tab.summary.value == ""
    assert tab.interpolation_button.disabled
    tab.similarity_button.click()  # nothing to compare: no error, nothing shown
    assert bytes(tab.similarity_image.value) == b""


@pytest.mark.slow
def test_x0_checkbox_redraws_the_filmstrip_with_the_models_estimates(tiny_pipe, run):
    tab = InspectorTab()
    tab.show(run, tiny_pipe)
    open_section(tab, "Denoising")
    noisy = tab.views["Denoising"]
    assert not noisy.x0 and "noisy latents" in tab.filmstrip_table.value
    tab.filmstrip_x0.value = True  # as a user ticking the box
    estimated = tab.views["Denoising"]
    assert estimated.x0 and "clean estimate (x0)" in tab.filmstrip_table.value
    expected = tiny_pipe.replay_x0(run, [0])
    torch.testing.assert_close(estimated.frame_latents[:1], expected)
    assert bytes(tab.filmstrip_image.value) == estimated.to_png() != noisy.to_png()


@pytest.mark.slow
def test_input_file_names_label_the_similarity_and_the_crops(tiny_pipe, tmp_path):
    paths = []
    for seed, name in ((0, "harbour.png"), (1, "fruit bowl.png")):
        paths.append(tmp_path / name)
        make_image(seed).save(paths[-1])
    result = tiny_pipe.generate(paths, steps=1, seed=0, guidance_scale=1.0)
    tab = InspectorTab()
    tab.show(result, tiny_pipe, paths)
    tab.draw_all()
    assert tab.views["Similarity"].row_labels == ["harbour.png", "fruit bowl.png"]
    assert tab.views["What CLIP saw"].labels == ["harbour.png", "fruit bowl.png"]
    tab.similarity_texts.value = "a cat"
    tab.similarity_button.click()
    assert tab.views["Similarity"].col_labels == ["harbour.png", "fruit bowl.png", "'a cat'"]


# -- replays run through the panel's controller: off the kernel thread, with progress and cancel ---------------


@pytest.mark.slow
def test_interpolate_runs_off_the_kernel_thread_with_progress_in_the_status_and_cancel_works(tiny_pipe, inputs):
    import threading

    from imageprompt_widgets import ImagePromptWidget
    from imageprompt_widgets.engine.runners import ThreadRunner

    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=ThreadRunner(), steps=2, seed=1, guidance_scale=1.0)
    widget.set_images(inputs)
    widget.generate().result(120)
    tab = widget.inspector
    said: list[str] = []
    widget.status_line.observe(lambda change: said.append(widget.status), names="value")
    tab.interpolation_count.value = 2
    reached, go_on = threading.Event(), threading.Event()
    calls = []

    def hold_on_the_second_call(module, args):
        calls.append(threading.current_thread())
        if len(calls) == 2:
            reached.set()
            assert go_on.wait(120)

    handle = tiny_pipe.sd.unet.register_forward_pre_hook(hold_on_the_second_call)
    try:
        tab.interpolation_button.click()  # returns at once: the strip is generated by the worker
        assert reached.wait(120) and tab.interpolation_button.disabled
        assert threading.current_thread() not in calls
        assert said[-1] == "Interpolation: step 1/6"  # 2 images x (2 steps + PNDM's warm-up)
        widget.cancel_button.click()
        go_on.set()
        assert widget.controller.join(120)
    finally:
        handle.remove()
    assert len(calls) == 2  # the step it was in finished, the next never started
    assert widget.status == "Cancelled after step 2 of 6; nothing from earlier runs is lost."
    assert tab.interpolation_note.value == "Cancelled." and not tab.interpolation_button.disabled
    assert "Interpolation" not in tab.views

    said.clear()
    tab.interpolation_button.click()  # again, to the end
    assert widget.controller.join(120)
    assert said[-2:] == ["Interpolation: step 6/6", said[-1]] and said[-1].startswith("Interpolation done in ")
    assert tab.interpolation_note.value == "2 images, t = 0.00, 1.00, seed 1."
    alone = tiny_pipe.generate(inputs[0], steps=2, seed=1, guidance_scale=1.0)
    assert np.array_equal(np.asarray(tab.views["Interpolation"].images[0]), np.asarray(alone.images[0]))
    widget.close()


@pytest.mark.slow
def test_the_x0_filmstrip_is_a_controller_task(tiny_pipe, inputs):
    import threading

    from imageprompt_widgets import ImagePromptWidget
    from imageprompt_widgets.engine.runners import ThreadRunner

    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=ThreadRunner(), steps=2, seed=1)
    widget.set_images(inputs[:1])
    widget.controller.submit(inputs[:1], widget.controls.settings(weights=(1.0,)), trace_latents=True).future.result(120)
    assert widget.controller.join(120)
    tab = widget.inspector
    calls = []
    handle = tiny_pipe.sd.unet.register_forward_pre_hook(lambda *_: calls.append(threading.current_thread()))
    try:
        tab.filmstrip_x0.value = True  # as a user ticking the box
        assert widget.controller.join(120)
    finally:
        handle.remove()
    assert calls and threading.current_thread() not in calls  # the UNet ran on the worker
    assert tab.views["Denoising"].x0 and "clean estimate (x0)" in tab.filmstrip_table.value
    assert widget.status.startswith("x0 filmstrip done in ")
    expected = tiny_pipe.replay_x0(tab.result, [0])
    torch.testing.assert_close(tab.views["Denoising"].frame_latents[:1], expected)
    widget.close()


@pytest.mark.slow
def test_the_attention_section_lays_the_runs_maps_over_its_output(tiny_pipe, inputs):
    result = tiny_pipe.generate(inputs, steps=2, seed=1, trace_attention=True)
    tab = InspectorTab()
    tab.show(result, tiny_pipe, inputs)
    open_section(tab, "Attention")
    assert "Attention" not in tab.errors
    view = tab.views["Attention"]
    expected = views.attention_view(result, tiny_pipe)
    assert torch.equal(view.maps, expected.maps) and view.shares == expected.shares
    assert html.escape(views.attention_summary(view)) in tab.attention_text.value
    width, height = _png_size(tab.attention_image.value)
    assert width > 200 and height > 100


def test_on_the_toy_world_the_attention_section_says_how_well_its_maps_localise():
    """The view's notes reach the panel: on toy-fine that its word maps show where (with the measured mIoU), on toy
    that they do not and which base does."""
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.toy import world
    from imageprompt_widgets.views.attention import TOY_FINE_LOCALISATION_NOTE, TOY_LOCALISATION_NOTE

    caption = world.held_out_scenes()[0].caption
    for preset, said in (("toy-fine", TOY_FINE_LOCALISATION_NOTE), ("toy", TOY_LOCALISATION_NOTE)):
        pipe = ImagePromptPipeline.from_preset(preset)
        result = pipe.generate(mode="text", prompt=caption, steps=2, seed=0, trace_attention=True)
        tab = InspectorTab()
        tab.show(result, pipe)
        open_section(tab, "Attention")
        assert "Attention" not in tab.errors and html.escape(said) in tab.attention_text.value


def test_without_traced_attention_the_section_says_how_to_get_it(tiny_pipe, run):
    tab = InspectorTab()
    tab.show(run, tiny_pipe)
    open_section(tab, "Attention")
    assert tab.attention_text.value == html.escape(NO_ATTENTION_TEXT)
    assert bytes(tab.attention_image.value) == b"" and "Attention" not in tab.errors


@pytest.mark.slow
def test_the_direction_gap_is_computed_on_request_with_the_typed_prompts(tiny_pipe, run):
    tab = InspectorTab()
    tab.show(run, tiny_pipe)
    assert tab.direction_note.value == html.escape(DIRECTION_GAP_TEXT)
    assert bytes(tab.direction_image.value) == b""  # nothing computed before the button
    tab.direction_texts.value = "a red circle; a blue square"
    tab.direction_button.click()
    view = tab.views["Direction gap"]
    assert view.prompts == ["a red circle", "a blue square"]
    expected = views.direction_gap(run.trace, tiny_pipe, ["a red circle", "a blue square"])
    torch.testing.assert_close(view.image_vs_sd_tokens, expected.image_vs_sd_tokens)
    assert tab.direction_note.value == html.escape(view.describe())
    assert _png_size(tab.direction_image.value)[0] > 200
    tab.direction_texts.value = "only one"
    tab.direction_button.click()
    assert "at least 2" in tab.errors["Direction gap"]


# -- drawn only when looked at ---------------------------------------------------------------------


class FigureCounter:
    """Counts matplotlib figures saved as pictures (every view's ``to_png`` saves one)."""

    def __init__(self, monkeypatch) -> None:
        from matplotlib.figure import Figure

        self.count = 0
        original = Figure.savefig

        def counting(figure, *args, **kwargs):
            self.count += 1
            return original(figure, *args, **kwargs)

        monkeypatch.setattr(Figure, "savefig", counting)


def test_a_closed_tab_draws_nothing_and_opening_a_section_shows_that_run(tiny_pipe, run, inputs, monkeypatch):
    figures = FigureCounter(monkeypatch)
    tab = InspectorTab()
    tab.set_visible(False)  # the panel's History tab is in front
    tab.show(run, tiny_pipe, inputs)
    later = tiny_pipe.generate(inputs, steps=2, seed=9, scale=2.0)
    tab.show(later, tiny_pipe, inputs)  # runs finish while nobody looks
    for title in ("Scale gap", "Similarity", "Tokens"):
        open_section(tab, title)  # opening a section of a hidden tab: still nothing
    assert figures.count == 0 and bytes(tab.scale_gap_image.value) == b""
    tab.set_visible(True)  # the Inspector tab comes to the front: the open section draws, the others wait
    assert figures.count == 1 and tab.views.keys() == {"Tokens"}
    open_section(tab, "Scale gap")
    assert figures.count == 2
    torch.testing.assert_close(tab.views["Scale gap"].image_norms, later.trace.prompt_embeds[0].norm(dim=-1))
    open_section(tab, "Tokens")
    open_section(tab, "Scale gap")  # drawn once per run
    assert figures.count == 2


def test_a_live_run_draws_nothing_on_its_thread_and_the_button_draws_it(tiny_pipe, run, inputs, monkeypatch):
    from imageprompt_widgets.widget.inspector import DRAW_LABEL

    figures = FigureCounter(monkeypatch)
    tab = InspectorTab()
    open_section(tab, "Scale gap")
    tab.show(run, tiny_pipe, inputs, defer=True)  # the panel defers while live is on
    assert figures.count == 0 and tab.draw_button.layout.display is None
    assert tab.draw_button.description == DRAW_LABEL
    tab.draw_button.click()  # a click arrives on the kernel thread
    assert figures.count == 1 and tab.draw_button.layout.display == "none"
    torch.testing.assert_close(tab.views["Scale gap"].image_norms, run.trace.prompt_embeds[0].norm(dim=-1))


def test_the_panel_draws_its_inspector_only_while_its_tab_is_in_front(tiny_pipe, inputs, monkeypatch):
    from imageprompt_widgets import ImagePromptWidget
    from imageprompt_widgets.engine.runners import InlineRunner

    figures = FigureCounter(monkeypatch)
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), steps=2, seed=1)
    try:
        widget.set_images(inputs[:1])
        open_section(widget.inspector, "Scale gap")
        widget.generate().result(120)
        assert widget.tabs.selected_index == 0 and figures.count == 0  # History in front: the inspector drew nothing
        widget.tabs.selected_index = 1  # as a click on the Inspector tab
        assert figures.count == 1
        torch.testing.assert_close(widget.inspector.views["Scale gap"].image_norms,
                                   widget.result.trace.prompt_embeds[0].norm(dim=-1))
        widget.live.value = True  # live: every change re-runs, and the runs' threads draw nothing
        figures.count = 0
        widget.controls.controls["seed"].value = 2
        assert widget.controller.join(120) and widget.result.settings.seed == 2
        assert figures.count == 0 and widget.inspector.draw_button.layout.display is None
    finally:
        widget.close()


def test_the_pooled_slot_section_shows_on_sdxl_only_and_draws_when_opened(tiny_pipe, run, inputs, monkeypatch):
    from imageprompt_widgets import ImagePromptPipeline

    sdxl = ImagePromptPipeline.from_preset("tiny-sdxl")
    revision = sdxl.generate(inputs[0], mode="revision", prompt="a red boat", revision_strength=0.8, steps=2, seed=2)
    figures = FigureCounter(monkeypatch)
    tab = InspectorTab()
    tab.show(run, tiny_pipe, inputs)  # SD 1.x: no pooled slot, no section
    assert "Pooled slot" not in tab.shown_sections and "Direction gap" in tab.shown_sections
    tab.show(revision, sdxl, inputs[:1])
    # On SDXL the pooled slot takes the Direction gap's place (SD 1.x's question; views.direction_gap says so).
    assert "Pooled slot" in tab.shown_sections and "Direction gap" not in tab.shown_sections
    assert figures.count == 0 and "Pooled slot" not in tab.views  # Tensors is open: nothing drawn
    open_section(tab, "Pooled slot")
    assert figures.count == 1 and tab.errors == {}
    view = tab.views["Pooled slot"]
    assert view.labels == ["fed to the UNet", "negative fed to the UNet", "text 'a red boat'", "image (bigG)"]
    torch.testing.assert_close(view.vectors[0], revision.trace.pooled_prompt_embeds[0])
    assert html.escape(view.describe()) in tab.pooled_text.value
    assert html.escape(POOLED_PROMPT) in tab.pooled_text.value
    assert html.escape(POOLED_REFERENCES) not in tab.pooled_text.value
    assert _png_size(tab.pooled_image.value)[0] > 500
    open_section(tab, "Tensors")
    open_section(tab, "Pooled slot")  # drawn once per run
    assert figures.count == 1
    tab.clear()
    assert bytes(tab.pooled_image.value) == b"" and tab.pooled_text.value == ""


def test_the_pooled_slot_text_names_reference_texts_when_the_run_had_no_prompt(inputs, monkeypatch):
    """Revision without a prompt (the picture speaks through the pooled slot alone): the view compares with its
    reference texts, and the section says so rather than calling them the prompt's pooled embedding."""
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.views.norms import DEFAULT_PROMPTS

    sdxl = ImagePromptPipeline.from_preset("tiny-sdxl")
    revision = sdxl.generate(inputs[0], mode="revision", steps=2, seed=2)
    FigureCounter(monkeypatch)
    tab = InspectorTab()
    tab.show(revision, sdxl, inputs[:1])
    open_section(tab, "Pooled slot")
    assert tab.errors == {}
    assert tab.views["Pooled slot"].labels[2:-1] == [f"text {prompt!r}" for prompt in DEFAULT_PROMPTS]
    assert html.escape(POOLED_REFERENCES) in tab.pooled_text.value
    assert html.escape(POOLED_PROMPT) not in tab.pooled_text.value
