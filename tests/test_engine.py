"""The engine on the tiny preset: encoding, the guide's method, determinism, parity with bare diffusers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import pixels

from imageprompt_widgets import GenerationSettings, ImagePromptPipeline, SettingsError
from imageprompt_widgets.engine import steps as steps_module
from imageprompt_widgets.engine.results import Trace, recipe_from_png
from imageprompt_widgets.loading.offline import sample_image as make_image

FAST = {"steps": 4, "seed": 0}


def test_encode_image_equals_the_encoder_run_by_hand(tiny_pipe, image, other_image):
    emb = tiny_pipe.encode_image([image, other_image])

    inputs = tiny_pipe.image_processor(images=[image, other_image], return_tensors="pt")
    with torch.no_grad():
        contract = tiny_pipe.image_encoder(**inputs)
        vision = tiny_pipe.image_encoder.vision_model
        hidden = vision(pixel_values=inputs["pixel_values"]).last_hidden_state
        # CLIP's image embedding by hand: CLS token -> post-layernorm -> visual projection.
        by_hand = tiny_pipe.image_encoder.visual_projection(vision.post_layernorm(hidden[:, 0]))

    assert emb.pixel_values.shape == (2, 3, 32, 32)
    assert emb.image_embeds.shape == (2, 32)
    assert emb.hidden_states.shape == (2, 65, 32)  # 8x8 patches + CLS
    assert torch.equal(emb.pixel_values, inputs["pixel_values"])
    assert torch.equal(emb.image_embeds, contract.image_embeds)
    assert torch.equal(emb.hidden_states, contract.last_hidden_state)
    assert torch.allclose(emb.image_embeds, by_hand, atol=1e-6)
    assert torch.equal(emb.hidden_states, hidden)


def test_encode_image_accepts_what_load_image_accepts(tiny_pipe, image, tmp_path):
    path = tmp_path / "photo.png"
    image.save(path)
    from_path = tiny_pipe.encode_image(str(path))
    from_array = tiny_pipe.encode_image(np.asarray(image))
    assert torch.equal(from_path.image_embeds, tiny_pipe.encode_image(image).image_embeds)
    assert torch.equal(from_array.image_embeds, from_path.image_embeds)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_repeat_mode_is_the_guides_formula_exactly(tiny_pipe, image, scale):
    res = tiny_pipe.generate(image, mode="repeat", scale=scale, **FAST)
    image_embeds = res.trace.image_embeds
    expected = scale * image_embeds[:, None, :].repeat(1, 77, 1)
    assert res.trace.prompt_embeds.shape == (1, 77, 32)
    assert torch.equal(res.trace.prompt_embeds, expected)
    assert torch.equal(image_embeds, tiny_pipe.encode_image(image).image_embeds)


def test_same_seed_gives_identical_pixels_and_other_seeds_or_images_differ(tiny_pipe, image, other_image):
    first = tiny_pipe.generate(image, **FAST).images[0]
    again = tiny_pipe.generate(image, **FAST).images[0]
    other_seed = tiny_pipe.generate(image, steps=4, seed=1).images[0]
    other_input = tiny_pipe.generate(other_image, **FAST).images[0]
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other_seed))
    assert not np.array_equal(pixels(first), pixels(other_input))


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.slow
def test_images_equal_bare_diffusers_for_the_traced_embeddings(tiny_pipe, image, num_images):
    res = tiny_pipe.generate(image, steps=5, seed=7, num_images=num_images, guidance_scale=6.0)
    bare = StableDiffusionPipeline(**tiny_pipe.sd.components)
    bare.set_progress_bar_config(disable=True)
    expected = bare(
        prompt_embeds=res.trace.prompt_embeds,
        negative_prompt_embeds=res.trace.negative_prompt_embeds,
        num_inference_steps=5,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images
    assert len(res.images) == num_images == res.trace.prompt_embeds.shape[0]
    for ours, theirs in zip(res.images, expected):
        assert np.array_equal(pixels(ours), pixels(theirs))


def test_default_negative_is_what_diffusers_itself_encodes(tiny_pipe, image):
    """The guide passes no negative: diffusers encodes an empty prompt; the trace records exactly that."""
    res = tiny_pipe.generate(image, **FAST)
    _, diffusers_negative = tiny_pipe.sd.encode_prompt(
        None, torch.device("cpu"), 1, True, prompt_embeds=res.trace.prompt_embeds
    )
    assert torch.equal(res.trace.negative_prompt_embeds, diffusers_negative)
    bare_without_negative = tiny_pipe.sd(
        prompt_embeds=res.trace.prompt_embeds, num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    assert np.array_equal(pixels(res.images[0]), pixels(bare_without_negative))


def test_without_guidance_there_is_no_negative(tiny_pipe, image):
    res = tiny_pipe.generate(image, guidance_scale=1.0, **FAST)
    assert res.trace.negative_prompt_embeds is None
    assert len(res.images) == 1


def test_several_images_are_averaged_into_one_prompt(tiny_pipe, image, other_image):
    res = tiny_pipe.generate([image, other_image], **FAST)
    mean = res.trace.image_embeds.mean(dim=0)
    assert res.trace.image_embeds.shape == (2, 32)
    assert torch.allclose(res.trace.prompt_embeds[0], mean.expand(77, -1), atol=1e-7)


def test_on_step_reports_every_step_in_order(tiny_pipe, image):
    seen = []
    res = tiny_pipe.generate(image, on_step=lambda info: seen.append((info.step, info.total)), **FAST)
    total = len(res.trace.timesteps)
    assert total == 5  # PNDM (SD 1.4's scheduler) runs one more UNet step than asked
    assert seen == [(step, total) for step in range(1, total + 1)]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a"])
@pytest.mark.slow
def test_x0_equals_the_schedulers_own_prediction(tiny_pipe, image, scheduler, monkeypatch):
    """x0 previews are the predicted clean image; DDIM and the Euler schedulers compute the same quantity
    themselves (Euler in its own, sigma-scaled latents: the preview must undo that scaling exactly)."""
    from imageprompt_widgets.engine.samplers import scheduler_class

    cls = scheduler_class(scheduler)
    ours, theirs = [], []
    real_step = cls.step

    def recording_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        theirs.append((out[1] if isinstance(out, tuple) else out.pred_original_sample).clone())
        return out

    monkeypatch.setattr(cls, "step", recording_step)
    tiny_pipe.generate(image, scheduler=scheduler, on_step=lambda info: ours.append(info.x0().clone()), steps=7,
                       seed=0)
    assert len(ours) == len(theirs) == 7
    for mine, reference in zip(ours, theirs):
        assert torch.allclose(mine, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cancel_stops_within_one_step_without_decoding_and_the_next_run_is_unharmed(tiny_pipe, image):
    cancel = threading.Event()
    steps = []

    def on_step(info):
        steps.append(info.step)
        if info.step == 2:
            cancel.set()

    res = tiny_pipe.generate(image, steps=10, seed=3, on_step=on_step, cancel=cancel)
    assert res.cancelled and res.images == []
    assert steps == [1, 2]
    clean = tiny_pipe.generate(image, steps=10, seed=3).images[0]
    again = tiny_pipe.generate(image, steps=10, seed=3).images[0]
    assert np.array_equal(pixels(clean), pixels(again))


def test_a_cancel_set_before_the_run_runs_nothing(tiny_pipe, image):
    cancel = threading.Event()
    cancel.set()
    steps = []
    res = tiny_pipe.generate(image, on_step=lambda info: steps.append(info.step), cancel=cancel, **FAST)
    assert res.cancelled and steps == []


@pytest.mark.slow
def test_traced_latents_are_the_per_step_latents_and_bounded(tiny_pipe, image, monkeypatch):
    seen = []
    res = tiny_pipe.generate(
        image, trace_latents=True, on_step=lambda info: seen.append(info.latents.clone()), **FAST
    )
    assert res.trace.latents.shape == (5, 1, 4, 32, 32)
    assert res.trace.latent_steps == [1, 2, 3, 4, 5]
    for snapshot, live in zip(res.trace.latents, seen):
        assert torch.equal(snapshot, live)

    monkeypatch.setattr(steps_module, "MAX_TRACED_STEPS", 3)
    bounded = tiny_pipe.generate(image, trace_latents=True, steps=10, seed=0)
    assert bounded.trace.latent_steps == [1, 5, 9, 11]  # stride 4, plus the last step
    assert bounded.trace.latents.shape[0] == 4
    assert tiny_pipe.generate(image, **FAST).trace.latents is None


def test_recipe_is_json_and_rerunning_it_gives_the_same_pixels(tiny_pipe, image, tmp_path):
    res = tiny_pipe.generate(image, steps=4, seed=11, scale=1.5)
    paths = res.save(tmp_path)
    recipe = recipe_from_png(paths[0])
    # The result carries the validated settings; the recipe is derived from them.
    assert res.settings == GenerationSettings(steps=4, seed=11, scale=1.5)
    assert recipe["settings"] == res.settings.to_dict() == res.recipe["settings"]
    assert recipe["model"]["preset"] == "tiny"
    rerun = tiny_pipe.generate(image, GenerationSettings(**recipe["settings"]))
    assert np.array_equal(pixels(rerun.images[0]), pixels(res.images[0]))
    assert res.save(tmp_path)[0] != paths[0]  # a second save never overwrites the first


def test_trace_saves_and_reloads_bit_identical(tiny_pipe, image, tmp_path):
    res = tiny_pipe.generate(image, trace_latents=True, **FAST)
    res.trace.save(tmp_path / "run.safetensors", recipe=res.recipe)
    loaded, recipe = Trace.load(tmp_path / "run.safetensors")
    assert recipe == res.recipe
    assert loaded.timesteps == res.trace.timesteps and loaded.latent_steps == res.trace.latent_steps
    for name, tensor in res.trace.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name


def test_reencoding_is_skipped_for_the_same_images(tiny_pipe, image, monkeypatch):
    tiny_pipe.encode_image(image)
    calls = []
    encoder = tiny_pipe.image_encoder
    monkeypatch.setattr(encoder, "forward", lambda *a, **k: calls.append(1))
    tiny_pipe.generate(image, steps=2, seed=5)
    tiny_pipe.generate(image, steps=2, seed=6)
    assert calls == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps=0 is outside its range 1 to 150"),
        ({"height": 70}, "multiple of 8"),
        ({"mode": "telepathy"}, "mode='telepathy' is not one of"),
        ({"seed": 1.5}, "whole number"),
        ({"guidance_scale": "high"}, "must be a number"),
        ({"stpes": 3}, "Unknown setting stpes"),
    ],
)
def test_bad_settings_are_refused_with_a_readable_error(tiny_pipe, image, changes, message):
    with pytest.raises(SettingsError, match=message) as err:
        tiny_pipe.generate(image, **changes)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_bad_images_are_refused_before_any_work(tiny_pipe, tmp_path):
    from imageprompt_widgets import ImageInputError

    bad = tmp_path / "holiday.heic"
    bad.write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    with pytest.raises(ImageInputError, match="holiday.heic"):
        tiny_pipe.generate(str(bad), **FAST)


def test_module_level_generate_uses_the_default_preset_from_the_environment(image, monkeypatch, tiny_pipe):
    import imageprompt_widgets

    monkeypatch.setenv("IMAGEPROMPT_MODEL", "tiny")
    res = imageprompt_widgets.generate(image, **FAST)
    direct = tiny_pipe.generate(image, **FAST)
    assert np.array_equal(pixels(res.images[0]), pixels(direct.images[0]))
    assert res.recipe["model"]["preset"] == "tiny"


def test_make_image_fixture_is_deterministic():
    assert np.array_equal(pixels(make_image(3)), pixels(make_image(3)))


def test_pipeline_parts_are_the_documented_classes(tiny_pipe):
    from transformers import CLIPVisionModelWithProjection

    assert isinstance(tiny_pipe.sd, StableDiffusionPipeline)
    assert type(tiny_pipe.image_encoder) is CLIPVisionModelWithProjection  # never a second text tower
    assert tiny_pipe.image_encoder.config.projection_dim == tiny_pipe.sd.unet.config.cross_attention_dim
    assert isinstance(tiny_pipe, ImagePromptPipeline)
