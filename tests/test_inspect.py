"""The headless inspector views: every number checked against an independent computation."""

from __future__ import annotations

import dataclasses
import io
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_pixels_within
from PIL import Image

from imageprompt_widgets import views
from imageprompt_widgets.engine.results import Trace
from imageprompt_widgets.loading.offline import sample_image as make_image
from imageprompt_widgets.settings import SettingsError
from imageprompt_widgets.views.attention import EVERY_WORD_UP_TO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 3  # PNDM runs one extra step: 4 traced latents


@pytest.fixture(scope="module")
def inputs():
    return [make_image(0), make_image(1)]


@pytest.fixture(scope="module")
def run(tiny_pipe, inputs):
    """One small traced run shared by the views: two input images averaged, guidance on."""
    return tiny_pipe.generate(inputs, steps=STEPS, seed=3, trace_latents=True)


def _decoded(png: bytes) -> Image.Image:
    assert png.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


# -- summarize ----------------------------------------------------------------------------------


def test_summarize_exact_string_with_nan_and_inf():
    t = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [float("inf"), -float("inf")]])
    # finite values 1, 2, 3: mean 2, sample std 1, norm sqrt(14) = 3.742
    assert views.summarize(t) == (
        "tensor[3, 2] float32 cpu min=1 max=3 mean=2 std=1 norm=3.742 nan=1 inf=2"
    )


def test_summarize_exact_strings_for_other_dtypes_and_edge_cases():
    assert views.summarize(torch.arange(6, dtype=torch.int64).reshape(2, 3)) == (
        "tensor[2, 3] int64 cpu min=0 max=5 mean=2.5 std=1.871 norm=7.416 nan=0 inf=0"
    )
    assert views.summarize(torch.tensor([True, False, True, True])) == (
        "tensor[4] bool cpu min=0 max=1 mean=0.75 std=0.5 norm=1.732 nan=0 inf=0"
    )
    assert views.summarize(torch.tensor(-0.5, dtype=torch.float16)) == (
        "tensor[] float16 cpu min=-0.5 max=-0.5 mean=-0.5 std=0 norm=0.5 nan=0 inf=0"
    )
    assert views.summarize(torch.zeros(0, 3)) == "tensor[0, 3] float32 cpu empty"
    assert views.summarize(torch.full((2,), float("nan"))) == "tensor[2] float32 cpu no finite values nan=2 inf=0"


def test_summarize_numbers_equal_torch_on_a_real_tensor(run):
    t = run.trace.prompt_embeds
    d = t.double()
    expected = (
        f"tensor[{', '.join(map(str, t.shape))}] float32 cpu min={float(d.min()):.4g} max={float(d.max()):.4g} "
        f"mean={float(d.mean()):.4g} std={float(d.std()):.4g} norm={float(d.norm()):.4g} nan=0 inf=0"
    )
    assert views.summarize(t) == expected


def test_summarize_rejects_what_is_not_a_tensor():
    with pytest.raises(views.InspectError, match="summarize takes a torch.Tensor, not list"):
        views.summarize([1, 2, 3])


def test_trace_summary_has_one_aligned_line_per_tensor(run):
    summary = run.trace.summary()
    tensors = run.trace.tensors()
    lines = summary.splitlines()
    assert len(lines) == len(tensors)
    width = max(map(len, tensors))
    for line, (name, tensor) in zip(lines, tensors.items()):
        assert line == f"{name:<{width}}  {views.summarize(tensor)}"
    assert repr(summary) == str(summary)  # shows as lines, not a quoted string, in a notebook


def test_saved_trace_reloads_bit_identical(run, tmp_path):
    path = run.trace.save(tmp_path / "run.safetensors", recipe=run.recipe)
    loaded, recipe = Trace.load(path)
    original, reread = run.trace.tensors(), loaded.tensors()
    assert original.keys() == reread.keys()
    assert "latents" in reread
    for name, tensor in original.items():
        assert reread[name].dtype == tensor.dtype, name
        assert torch.equal(reread[name], tensor), name
    assert loaded.latent_steps == run.trace.latent_steps
    assert loaded.timesteps == run.trace.timesteps
    assert recipe == run.recipe
    assert loaded.summary() == run.trace.summary()


# -- what CLIP saw -------------------------------------------------------------------------------


def test_what_clip_saw_is_the_processors_crop_before_normalisation(tiny_pipe, run, inputs):
    view = views.what_clip_saw(run.trace.pixel_values, tiny_pipe.image_processor, inputs)
    by_hand = tiny_pipe.image_processor(images=inputs, do_normalize=False, do_rescale=False, return_tensors="pt")
    expected = by_hand["pixel_values"].permute(0, 2, 3, 1).numpy()
    assert len(view.seen) == 2
    for seen, want in zip(view.seen, expected):
        assert seen.size == (32, 32)
        assert np.abs(np.asarray(seen, dtype=np.float64) - want).max() <= 1.0
    picture = _decoded(view.to_png())
    assert picture.height >= 2 * 224  # one row per input, original beside the crop
    assert view._repr_png_() == view.to_png()


def test_clip_input_images_rejects_a_wrong_shape(tiny_pipe):
    with pytest.raises(views.InspectError, match=r"pixel_values must be \[N, 3, H, W\], got shape \(3, 32, 32\)"):
        views.clip_input_images(torch.zeros(3, 32, 32), tiny_pipe.image_processor)


# -- the scale gap -------------------------------------------------------------------------------


def test_scale_gap_norms_equal_hand_computed_norms(tiny_pipe, run):
    prompts = ["a cat", "two harbours at dusk"]
    view = views.scale_gap(run.trace, tiny_pipe, prompts)
    assert torch.equal(view.image_norms, run.trace.prompt_embeds[0].norm(dim=-1))
    sd = tiny_pipe.sd
    ids = sd.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd.text_encoder(ids)[0]
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(view.text_norms[prompt], hidden[i].norm(dim=-1), rtol=1e-5, atol=1e-5)
    # The run was not norm-matched: the other curve is every token at the engine's typical text norm.
    assert not view.norm_matched_run
    assert view.target_norm == tiny_pipe.text_token_norm()
    torch.testing.assert_close(view.other_norms, torch.full((77,), view.target_norm), rtol=1e-5, atol=1e-5)
    assert view.ratio == pytest.approx(float(hidden.norm(dim=-1).mean()) / float(view.image_norms.mean()), rel=1e-5)
    assert "times the image's" in view.describe()
    _decoded(view.to_png())


def test_scale_gap_of_a_norm_matched_run_shows_the_norms_before_matching(tiny_pipe, inputs):
    matched = tiny_pipe.generate(inputs[0], steps=1, norm_match=True, scale=2.0, guidance_scale=1.0)
    view = views.scale_gap(matched.trace, tiny_pipe, ["a cat"], scale=2.0)
    assert view.norm_matched_run
    torch.testing.assert_close(view.image_norms, torch.full((77,), 2.0 * tiny_pipe.text_token_norm()))
    before = tiny_pipe.encode_image(inputs[0]).image_embeds[0].norm()
    torch.testing.assert_close(view.other_norms, torch.full((77,), float(before)), rtol=1e-5, atol=1e-5)


# -- similarity ----------------------------------------------------------------------------------


def test_similarity_equals_normalised_dot_products_with_clip_text_features(tiny_pipe, run):
    from transformers import CLIPModel, CLIPTokenizer

    from imageprompt_widgets.loading.offline import ensure_tiny_models

    texts = ["a cat", "a dog"]
    view = views.similarity(run.trace.image_embeds, tiny_pipe, texts)
    clip_dir = ensure_tiny_models()[1]
    clip = CLIPModel.from_pretrained(clip_dir)
    tokens = CLIPTokenizer.from_pretrained(clip_dir)(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = clip.get_text_features(**tokens).pooler_output
        image = clip.get_image_features(pixel_values=run.trace.pixel_values).pooler_output
    torch.testing.assert_close(run.trace.image_embeds, image, rtol=1e-5, atol=1e-5)  # same CLIP space
    both = torch.cat([image, text])
    expected = F.normalize(image, dim=-1) @ F.normalize(both, dim=-1).T
    torch.testing.assert_close(view.matrix, expected, rtol=1e-5, atol=1e-5)
    assert view.col_labels == ["image 1", "image 2", "'a cat'", "'a dog'"]
    assert "with projection" in view.note
    assert tiny_pipe.clip_text_tower() is tiny_pipe.clip_text_tower()  # loaded once, in the model cache
    assert view.matrix.shape == (2, 4)
    _decoded(view.to_png())


def test_similarity_says_clearly_when_the_encoder_has_no_text_tower(tiny_pipe, run, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.presets import Preset

    # An encoder checkpoint with the vision tower only, as SD image-variations and IP-Adapter ship.
    tiny_pipe.image_encoder.save_pretrained(tmp_path / "vision-only")
    vision_only = ImagePromptPipeline(
        tiny_pipe.sd, CLIPVisionModelWithProjection.from_pretrained(tmp_path / "vision-only"),
        tiny_pipe.image_processor,
        preset=Preset(name="vision-only", sd_model="x", clip_model=str(tmp_path / "vision-only")),
    )
    view = views.similarity(run.trace.image_embeds, vision_only, ["a cat"])
    assert view.note == (
        f"The image encoder {str(tmp_path / 'vision-only')!r} ships no CLIP text tower, so images cannot be "
        "compared with text."
    )
    assert view.matrix.shape == (2, 2)
    with pytest.raises(views.TextTowerUnavailable):
        vision_only.clip_text_tower()


def test_cosine_similarity_rejects_mismatched_widths():
    with pytest.raises(views.InspectError, match=r"got \(2, 3\) and \(1, 4\)"):
        views.cosine_similarity(torch.ones(2, 3), torch.ones(1, 4))


# -- tokens --------------------------------------------------------------------------------------


def test_token_view_of_repeat_has_one_distinct_row_and_patch_norms_on_the_grid(tiny_pipe, run):
    view = views.token_view(run.trace, 0, tiny_pipe.image_processor)
    assert torch.equal(view.prompt_embeds, run.trace.prompt_embeds[0])
    assert view.distinct_tokens == 1
    hidden = run.trace.hidden_states[0]
    side = int(math.sqrt(hidden.shape[0] - 1))
    assert side == 8  # 32 px / patch 4
    assert torch.equal(view.patch_norms, hidden[1:].norm(dim=-1).reshape(side, side))
    assert float(view.patch_norms[2, 5]) == pytest.approx(float(hidden[1 + 2 * side + 5].norm()))
    _decoded(view.to_png())


def test_token_view_of_the_tokens_mode_shows_cls_and_patch_tokens(tiny_pipe, inputs):
    result = tiny_pipe.generate(inputs[0], mode="tokens", steps=1, guidance_scale=1.0)
    view = views.token_view(result.trace)
    assert view.prompt_embeds.shape == (65, 32)
    assert view.distinct_tokens == 65
    torch.testing.assert_close(view.prompt_embeds[0], result.trace.image_embeds[0])  # token 0 is CLS = image_embeds


def test_patch_norms_rejects_a_non_square_token_count():
    with pytest.raises(views.InspectError, match="7 patch tokens do not form a square grid"):
        views.patch_norms(torch.ones(8, 4))


# -- denoising filmstrip -------------------------------------------------------------------------


@pytest.mark.slow
def test_filmstrip_statistics_and_exact_frames(tiny_pipe, run):
    view = views.filmstrip(run, tiny_pipe)
    latents = run.trace.latents.double()
    assert view.steps == run.trace.latent_steps == [1, 2, 3, 4]
    for s in range(latents.shape[0]):
        expected = [latents[s].mean(), latents[s].std(), latents[s].min(), latents[s].max(), latents[s].norm()]
        torch.testing.assert_close(view.statistics[s], torch.stack(expected))
    # The last frame is the VAE decode of the final latents: exactly the output image.
    assert np.array_equal(np.asarray(view.frames[-1]), np.asarray(run.images[0]))
    assert view.table().splitlines()[0].split() == ["step", *views.LATENT_STAT_NAMES]
    _decoded(view.to_png())


def test_filmstrip_with_the_preview_decoder_uses_preview_py(tiny_pipe, run):
    from imageprompt_widgets.engine import preview

    view = views.filmstrip(run, tiny_pipe, decoder="linear")
    expected = preview.to_pil(preview.decoder_for(tiny_pipe, "linear")(run.trace.latents[:, 0]))
    assert [np.asarray(f).tolist() for f in view.frames] == [np.asarray(f).tolist() for f in expected]


def test_filmstrip_x0_frames_equal_the_live_step_estimates(tiny_pipe, inputs):
    live = {}
    result = tiny_pipe.generate(
        inputs, steps=STEPS, seed=3, trace_latents=True,
        on_step=lambda info: live.__setitem__(info.step, info.x0().detach().cpu().clone()),
    )
    view = views.filmstrip(result, tiny_pipe, x0=True)
    assert view.x0 and view.frame_steps == [1, 2, 3, 4]
    # The latent after step k is the input of step k + 1, whose live x0 preview is the same estimate.
    for frame, step in enumerate(view.frame_steps[:-1]):
        torch.testing.assert_close(view.frame_latents[frame], live[step + 1][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(view.frame_latents[-1], result.trace.latents[-1, 0])  # the final latent is its own x0
    assert not torch.allclose(view.frame_latents[0], result.trace.latents[0, 0])  # x0 is not the noisy latent
    assert np.array_equal(np.asarray(view.frames[-1]), np.asarray(result.images[0]))


def test_filmstrip_without_traced_latents_says_how_to_get_them(run):
    untraced = Trace(**{k: getattr(run.trace, k) for k in ("pixel_values", "image_embeds", "hidden_states",
                                                               "prompt_embeds")})
    with pytest.raises(views.InspectError, match="generate with trace_latents=True"):
        views.filmstrip(dataclasses.replace(run, trace=untraced), None)


def test_frame_indices_are_evenly_spaced_and_keep_the_last():
    assert views.frame_indices(5) == [0, 1, 2, 3, 4]
    assert views.frame_indices(31, limit=4) == [0, 10, 20, 30]


# -- interpolation -------------------------------------------------------------------------------


def test_interpolation_equals_the_engines_slerp_generation(tiny_pipe, inputs):
    a, b = inputs
    walk = tiny_pipe.interpolate(a, b, 3, seed=5, steps=1, guidance_scale=1.0)
    view = views.interpolation_view(walk)
    assert view.weights == walk.weights == [0.0, 0.5, 1.0]
    # Each point is an ordinary engine run: traced, checked, with its settings.
    assert [r.settings.mode for r in walk.results] == ["repeat"] * 3 and not walk.cancelled
    ends = tiny_pipe.encode_image([a, b]).image_embeds
    torch.testing.assert_close(view.embeds[0], ends[0])
    torch.testing.assert_close(view.embeds[2], ends[1])
    halfway = tiny_pipe.generate([a, b], combine="slerp", weights=[0.5, 0.5], seed=5, steps=1, guidance_scale=1.0)
    alone = tiny_pipe.generate(a, seed=5, steps=1, guidance_scale=1.0)
    # The walk encodes each end alone, the engine both in one batch: the slerp point may round a level apart.
    assert_pixels_within(view.images[1], halfway.images[0], levels=1)
    assert np.array_equal(np.asarray(view.images[0]), np.asarray(alone.images[0]))
    assert _decoded(view.to_png()).width >= 3 * 128


def test_interpolation_towards_text_uses_the_clip_text_tower(tiny_pipe, inputs):
    walk = tiny_pipe.interpolate(inputs[0], "a cat", 2, steps=1, guidance_scale=1.0)
    torch.testing.assert_close(walk.embeds[1], tiny_pipe.clip_text_tower().embed(["a cat"])[0])
    assert walk.labels == ("an image", "'a cat'")
    with pytest.raises(SettingsError, match="at least 2 images, not 1"):
        tiny_pipe.interpolate(inputs[0], "a cat", 1)


def test_an_interpolation_stops_at_a_cancel_and_keeps_the_finished_points(tiny_pipe, inputs):
    cancel = threading.Event()
    walk = tiny_pipe.interpolate(inputs[0], inputs[1], 3, steps=2, guidance_scale=1.0, cancel=cancel,
                                 on_step=lambda info: cancel.set() if info.step == 2 else None)
    assert walk.cancelled and walk.results == []  # the first point was stopped after its last step


# -- pictures: matplotlib, labelled, no leaks, a clean fallback without it -----------------------


def _figure_images(figure):
    return [image for ax in figure.axes for image in ax.get_images()]


def test_small_crops_are_shown_with_visible_pixels_not_blurred(tiny_pipe, run, inputs):
    figure = views.what_clip_saw(run.trace.pixel_values, tiny_pipe.image_processor, inputs).figure()
    shown = _figure_images(figure)
    assert len(shown) == 4  # two originals, two crops
    assert {image.get_interpolation() for image in shown} == {"nearest"}  # 32 px crops, 64 px originals
    width, height = figure.get_size_inches() * figure.dpi
    assert width <= 700 and height <= 700  # not blown up to ~900 px per crop


def test_what_clip_saw_names_inputs_by_file_and_marks_the_centre_crop(tiny_pipe, tmp_path):
    wide = tmp_path / "harbour wide.png"
    make_image(3, size=(96, 48)).save(wide)
    emb = tiny_pipe.encode_image(wide)
    view = views.what_clip_saw(emb.pixel_values, tiny_pipe.image_processor, [wide])
    assert view.labels == ["harbour wide.png"]
    figure = view.figure()
    assert figure.axes[0].get_title() == "harbour wide.png: original 96x48"
    (box,) = figure.axes[0].patches
    assert (box.get_x() + 0.5, box.get_y() + 0.5, box.get_width(), box.get_height()) == (24, 0, 48, 48)
    assert views.source_labels([wide, make_image(0), "https://example.com/a/cat.png?x=1"]) == [
        "harbour wide.png", "image 2", "cat.png"]


def test_crop_comparison_shows_each_crop_exactly(tiny_pipe, tmp_path):
    wide = make_image(4, size=(120, 40))
    pixel_values = {crop: tiny_pipe.encode_image(wide, crop=crop).pixel_values for crop in ("center_crop", "pad")}
    view = views.crop_comparison(wide, pixel_values, tiny_pipe.image_processor)
    for crop, values in pixel_values.items():
        expected = views.clip_input_images(values, tiny_pipe.image_processor)[0]
        assert np.array_equal(np.asarray(view.seen[crop]), np.asarray(expected))
    assert "center_crop: the centre square" in view.describe()
    assert [ax.get_title() for ax in view.figure().axes] == [
        "original 120x40", "crop='center_crop': 32x32", "crop='pad': 32x32"]


def test_similarity_is_labelled_with_the_names_given(run, tiny_pipe):
    view = views.similarity(run.trace.image_embeds, tiny_pipe, labels=["sunset.png", "still_life.png"])
    figure = view.figure()
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sunset.png", "still_life.png"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sunset.png", "still_life.png"]
    assert figure.axes[1].get_ylabel() == "cosine similarity"  # the colour bar
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == sorted(f"{float(v):.2f}" for v in view.matrix.flatten())
    with pytest.raises(views.InspectError, match="1 labels for 2 images"):
        views.similarity(run.trace.image_embeds, labels=["one"])


def test_scale_gap_legend_hides_no_line(tiny_pipe, run):
    """Five curves, four of which lie on top of each other with the tiny models: every one keeps a
    style of its own (colour, line style, marker) and a legend entry."""
    view = views.scale_gap(run.trace, tiny_pipe)
    figure = view.figure()
    lines = figure.axes[0].get_lines()
    assert len(lines) == len(view.series()) == 5
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker(), line.get_linewidth()) for line in lines}
    assert len(styles) == 5
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"{i + 1}. {label}" for i, label in enumerate(view.series())]
    assert figure.axes[0].get_xlabel().startswith("token position")
    assert figure.axes[0].get_ylabel().startswith("L2 norm")
    # The averages panel shows every curve's mean, one bar each.
    assert [float(t.get_text()) for t in figure.axes[1].texts] == pytest.approx(
        [float(f"{float(v.mean()):.4g}") for v in view.series().values()])


def test_token_heatmap_has_axes_and_a_colour_bar(tiny_pipe, run):
    figure = views.token_view(run.trace, 0, tiny_pipe.image_processor).figure()
    heat = figure.axes[0]
    assert heat.get_xlabel() == "embedding dimension (0 to 31)"
    assert heat.get_ylabel() == "token position (0 to 76)"
    assert "1 distinct" in heat.get_title()
    assert {ax.get_ylabel() for ax in figure.axes} >= {"value", "patch token norm"}  # both colour bars


def test_direction_gap_cosines_equal_an_independent_computation(tiny_pipe, run):
    prompts = ["a cat", "a red boat", "two dogs"]
    view = views.direction_gap(run.trace, tiny_pipe, prompts)
    sd = tiny_pipe.sd
    ids = sd.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd.text_encoder(ids)[0]  # SD's un-projected per-token hidden states, [3, 77, D]
    image = run.trace.image_embeds[0]
    expected = F.cosine_similarity(image[None, None], hidden, dim=-1)
    torch.testing.assert_close(view.image_vs_sd_tokens, expected, rtol=1e-5, atol=1e-5)
    # Norm matching rescales: the length moves to SD's typical token norm, no cosine moves.
    torch.testing.assert_close(view.image_vs_sd_tokens_matched, view.image_vs_sd_tokens, rtol=0, atol=1e-6)
    assert view.image_norm == pytest.approx(float(image.norm()))
    assert view.matched_norm == pytest.approx(tiny_pipe.text_token_norm())
    torch.testing.assert_close(view.sd_tokens_across_prompts[0], F.cosine_similarity(hidden[0], hidden[1], dim=-1))
    assert view.sd_tokens_across_prompts.shape == (3, 77)  # the three pairs of prompts
    tower = tiny_pipe.clip_text_tower().embed(prompts)  # CLIP's *projected* text embeddings
    torch.testing.assert_close(view.image_vs_clip_text, F.cosine_similarity(image[None], tower, dim=-1))
    torch.testing.assert_close(view.clip_text_vs_sd_tokens[2], F.cosine_similarity(tower[2][None], hidden[2], dim=-1))
    assert "it fixes length, not direction" in view.describe()
    assert len(view.groups()) == 5
    with pytest.raises(views.InspectError, match="at least 2, not 1"):
        views.direction_gap(run.trace, tiny_pipe, ["a cat"])


def test_attention_view_groups_and_shares_are_sums_of_the_traced_maps(tiny_pipe, inputs):
    result = tiny_pipe.generate(inputs[0], mode="tokens", steps=2, seed=0, trace_attention=True)
    view = views.attention_view(result, tiny_pipe)
    maps = result.trace.attention_maps[0]
    assert list(view.groups)[:2] == ["CLS token", "all 64 patch tokens"]
    torch.testing.assert_close(view.group_maps["CLS token"], maps[0])
    torch.testing.assert_close(view.group_maps["all 64 patch tokens"], maps[1:].sum(0))
    assert view.shares["CLS token"] + view.shares["all 64 patch tokens"] == pytest.approx(1.0, abs=1e-4)
    # The patch tokens' shares laid out on the input's 8x8 patch grid, row by row.
    torch.testing.assert_close(view.patch_shares, maps[1:].mean((1, 2)).reshape(8, 8))
    assert float(view.patch_shares[2, 5]) == pytest.approx(float(maps[1 + 2 * 8 + 5].mean()))
    top = [view.groups[label] for label in view.groups if label.endswith("(most attended)")]
    shares = maps.mean((1, 2))
    assert top == [[i] for i in sorted(range(1, 65), key=lambda i: -float(shares[i]))[:3]]
    figure = view.figure()
    assert len([ax for ax in figure.axes if ax.get_images()]) == len(view.panels())
    colour_bars = [ax for ax in figure.axes if ax.get_ylabel() == "share of attention"]
    assert len(colour_bars) == len(view.panels()) - 1  # every map has one; the plain output has none


def test_attention_view_of_blend_separates_text_and_image_tokens(tiny_pipe, inputs):
    result = tiny_pipe.generate(inputs[0], mode="blend", blend="concat", prompt="a cat", steps=1, seed=0,
                                trace_attention=True)
    view = views.attention_view(result, tiny_pipe)
    words = len(tiny_pipe.sd.tokenizer("a cat").input_ids) - 2
    assert view.groups == {"start token": [0], f"the {words} word tokens": list(range(1, words + 1)),
                           "end + padding": list(range(words + 1, 77)), "image token": [77]}
    assert sum(view.shares.values()) == pytest.approx(1.0, abs=1e-4)
    assert view.token_labels[0] == "<start>" and view.token_labels[77] == "image token 1"


def test_attention_view_of_a_words_only_run_names_its_words(tiny_pipe):
    """``mode="text"`` (no image): the groups are the start token, the words and the padding, then a panel per word
    token of a short text, in order (a caption's colour and shape words are rarely the most attended), or the three
    most attended of a longer one; each labelled by what it says, as in blend (not "tokens 1 to 76")."""
    tokenizer = tiny_pipe.sd.tokenizer
    for text in ("a cat", "a red circle on a blue background"):  # the tiny tokenizer splits into letters
        result = tiny_pipe.generate(mode="text", prompt=text, steps=1, seed=0, trace_attention=True)
        view = views.attention_view(result, tiny_pipe)
        words = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids[1:-1])
        assert list(view.groups)[:3] == ["start token", f"the {len(words)} word tokens", "end + padding"]
        assert view.token_labels[1 : 1 + len(words)] == [repr(word.replace("</w>", "")) for word in words]
        singles = list(view.groups)[3:]
        if len(words) <= EVERY_WORD_UP_TO:
            assert singles == [f"token {i}: {view.token_labels[i]}" for i in range(1, 1 + len(words))]
        else:
            shares = view.maps.mean((1, 2))
            top = sorted(range(1, 1 + len(words)), key=lambda i: -float(shares[i]))[:3]
            assert singles == [f"token {i}: {view.token_labels[i]}" for i in top]


def test_attention_view_of_repeat_says_every_token_has_the_same_share(tiny_pipe, inputs):
    result = tiny_pipe.generate(inputs[0], steps=1, seed=0, trace_attention=True)
    view = views.attention_view(result)
    assert view.groups == {"all 77 tokens are one image token": list(range(77))}  # one panel
    assert float(view.maps[0].mean()) == pytest.approx(1 / 77, abs=1e-6)  # each copy gets exactly 1/77
    assert "In repeat all 77 tokens are one" in view.describe()
    with pytest.raises(views.InspectError, match="names token 80, but the prompt has 77 tokens"):
        views.attention_view(result, groups={"beyond": [80]})


def test_attention_view_without_recorded_maps_says_how_to_get_them(run, tiny_pipe, inputs):
    with pytest.raises(views.InspectError, match="generate with trace_attention=True"):
        views.attention_view(run)
    cancel = threading.Event()
    stopped = tiny_pipe.generate(inputs[0], steps=3, trace_attention=True, cancel=cancel,
                                 on_step=lambda info: cancel.set())
    assert stopped.cancelled and stopped.trace.attention_maps.shape == (1, 77, 32, 32)  # the step that ran
    with pytest.raises(views.InspectError, match="cancelled before its images were decoded"):
        views.attention_view(stopped)


@pytest.mark.slow
def test_rendering_every_view_registers_no_figure_anywhere(tiny_pipe, run, inputs):
    from matplotlib._pylab_helpers import Gcf

    before = Gcf.get_num_fig_managers()
    for view in (views.what_clip_saw(run.trace.pixel_values, tiny_pipe.image_processor, inputs),
                 views.scale_gap(run.trace, tiny_pipe), views.similarity(run.trace.image_embeds),
                 views.token_view(run.trace), views.filmstrip(run, tiny_pipe, decoder="linear")):
        _decoded(view.to_png())
    assert Gcf.get_num_fig_managers() == before == 0  # pyplot never saw them: nothing to close, nothing leaks


def test_without_matplotlib_the_numbers_work_and_the_picture_says_what_to_install(run, monkeypatch):
    import sys

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    view = views.token_view(run.trace)
    assert view.distinct_tokens == 1  # computed without matplotlib
    with pytest.raises(views.PlotUnavailableError) as caught:
        view.to_png()
    assert str(caught.value) == views.PLOT_MISSING == (
        "Drawing this view needs matplotlib: pip install 'imageprompt_widgets[plot]' "
        "(its numbers are on the view without it)."
    )
    assert view._repr_png_() is None  # the notebook falls back to text

    class Printer:  # IPython's pretty printer, as far as a view uses it
        def __init__(self):
            self.written = []

        def text(self, value):
            self.written.append(value)

    printer = Printer()
    view._repr_pretty_(printer, False)
    assert printer.written == [f"{view.describe()}\n{views.PLOT_MISSING}"]


def test_image_grid_captions_every_picture_and_marks_gaps(inputs):
    view = views.image_grid([inputs[0], None, inputs[1]], ["input", "caption\n(needs another preset)", "b"], columns=2)
    figure = view.figure()
    shown = [ax for ax in figure.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in shown] == ["input", "caption\n(needs another preset)", "b"]
    assert len(_figure_images(figure)) == 2 and shown[1].texts[0].get_text() == "no image"
    assert view.describe() == "input; caption (needs another preset); b"
    with pytest.raises(views.InspectError, match="2 images but 1 captions"):
        views.image_grid(inputs, ["one"])


# ---------------------------------------------------------------------------------------------
# SDXL's pooled slot


@pytest.fixture(scope="module")
def sdxl_pipe():
    from imageprompt_widgets import ImagePromptPipeline

    return ImagePromptPipeline.from_preset("tiny-sdxl")


def _pooled_text(pipe, prompt: str) -> torch.Tensor:
    """bigG's projected text embedding, straight from diffusers' second tokenizer and text encoder."""
    sd = pipe.sd
    ids = sd.tokenizer_2(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return sd.text_encoder_2(ids)[0][0].float()


def _bigg_image(pipe, image) -> torch.Tensor:
    """bigG's image embedding, straight from the second image encoder and its processor (center crop)."""
    with torch.no_grad():
        return pipe.image_encoder_2(**pipe.image_processor_2(images=[image], return_tensors="pt")).image_embeds[0]


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_pooled_slot_norms_and_cosines_equal_an_independent_computation(sdxl_pipe, inputs, strength):
    prompt = "a red boat"
    result = sdxl_pipe.generate(inputs[0], mode="revision", prompt=prompt, revision_strength=strength,
                                noise_augmentation=0.0, steps=2, seed=4)
    view = views.pooled_slot(result, sdxl_pipe, [inputs[0]])
    text, image = _pooled_text(sdxl_pipe, prompt), _bigg_image(sdxl_pipe, inputs[0])
    fed = result.trace.pooled_prompt_embeds[0]
    assert view.labels == ["fed to the UNet", "negative fed to the UNet", f"text {prompt!r}", "image (bigG)"]
    expected = torch.stack([fed, result.trace.negative_pooled_prompt_embeds[0], text, image])
    torch.testing.assert_close(view.norms, expected.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert view.norms[1] == 0 and view.cosines[1].isnan().all()  # SDXL base: zeros for the empty negative
    assert view.cosine(f"text {prompt!r}", "image (bigG)") == pytest.approx(
        float(F.cosine_similarity(text, image, dim=0)), abs=1e-5)
    # Strength 0 is the text's own pooled embedding, strength 1 the image's bigG embedding (no noise).
    same, other = (text, image) if strength == 0 else (image, text)
    torch.testing.assert_close(fed, same, rtol=1e-5, atol=1e-5)
    toward = "image (bigG)" if strength else f"text {prompt!r}"
    away = f"text {prompt!r}" if strength else "image (bigG)"
    assert view.cosine("fed to the UNet", toward) == pytest.approx(1.0, abs=1e-5)
    assert view.cosine("fed to the UNet", away) == pytest.approx(float(F.cosine_similarity(same, other, dim=0)),
                                                                 abs=1e-5)
    assert view.describe().startswith(f"revision at strength {strength:g}: the pooled slot fed to the UNet has")
    assert "the negative pooled slot is all zeros" in view.describe()


def test_pooled_slot_figure_labels_every_axis_and_without_images_it_says_how(sdxl_pipe, inputs):
    result = sdxl_pipe.generate(inputs[0], mode="revision", revision_strength=0.8, noise_augmentation=0.3,
                                steps=2, seed=4)
    view = views.pooled_slot(result, sdxl_pipe)  # no prompt typed: the default prompts are the text references
    assert view.labels[2:5] == [f"text {prompt!r}" for prompt in views.DEFAULT_PROMPTS]
    assert view.labels[-1] == "revision's image (blended in)" and "Pass the run's input images" in view.note
    torch.testing.assert_close(view.vectors[-1], result.trace.extras["revision_image_pooled"][0])
    figure = view.figure()
    bars, heat = figure.axes[:2]
    assert bars.get_xlabel() == "L2 norm (length of the vector)"
    assert heat.get_ylabel() == "vector" and heat.get_xlabel() == "vector (–: all zeros)"
    assert figure.axes[2].get_ylabel() == "cosine similarity"  # the colour bar
    # no prompt was typed: the title does not call the reference texts "the prompt's"
    assert figure._suptitle.get_text() == ("SDXL's pooled slot: what the UNet got, beside text and image embeddings "
                                           "(revision)")
    assert bars.get_yticklabels()[0].get_text() == "1. fed to the UNet"
    assert _decoded(view.to_png()).size[0] > 500


def test_pooled_slot_and_direction_gap_say_which_family_they_are_for(tiny_pipe, run, sdxl_pipe, inputs):
    with pytest.raises(views.InspectError, match="^SD 1.x has no pooled slot; its UNet reads only the 77 prompt tokens"):
        views.pooled_slot(run, tiny_pipe)
    sdxl_run = sdxl_pipe.generate(inputs[0], mode="repeat", steps=2, seed=4)
    with pytest.raises(views.InspectError, match=r"on SDXL the image has a slot in its own space.*views\.pooled_slot"):
        views.direction_gap(sdxl_run.trace, sdxl_pipe)
