"""Every mode, combine and negative through the tiny pipeline, against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import pixels

from imageprompt_widgets import GenerationSettings, SettingsError
from imageprompt_widgets import conditioning as c
from imageprompt_widgets.engine.pipeline import NORM_PROBE_PROMPTS
from imageprompt_widgets.loading.offline import sample_image as make_image
from imageprompt_widgets.methods import METHODS
from imageprompt_widgets.settings import MODES

FAST = {"steps": 2, "seed": 7}


def test_every_mode_has_a_builder_and_every_builder_a_mode():
    from imageprompt_widgets.methods.ip_adapter import BLOCK_PRESETS
    from imageprompt_widgets.settings import ADAPTER_BLOCKS

    assert list(METHODS) == list(MODES)
    assert all(callable(METHODS[mode].builder()) for mode in MODES)
    assert (*BLOCK_PRESETS, "custom") == ADAPTER_BLOCKS  # custom: the adapter_block_scales dictionary


def test_default_crop_is_exactly_the_processor_and_encoder(tiny_pipe, image):
    emb = tiny_pipe.encode_image(image)
    with torch.no_grad():
        by_hand = tiny_pipe.image_encoder(**tiny_pipe.image_processor(images=[image], return_tensors="pt"))
    assert torch.equal(emb.image_embeds, by_hand.image_embeds)
    assert torch.equal(emb.hidden_states, by_hand.last_hidden_state)


def test_tokens_are_projected_hidden_states_with_token0_equal_to_image_embeds(tiny_pipe, image):
    emb = tiny_pipe.encode_image(image)
    enc = tiny_pipe.image_encoder
    with torch.no_grad():
        by_hand = enc.visual_projection(enc.vision_model.post_layernorm(emb.hidden_states))
    assert emb.tokens.shape == (1, emb.hidden_states.shape[1], emb.image_embeds.shape[1])
    assert torch.equal(emb.tokens, by_hand)
    assert torch.allclose(emb.tokens[:, 0], emb.image_embeds, atol=1e-6)
    res = tiny_pipe.generate(image, mode="tokens", scale=2.0, guidance_scale=1.0, steps=1)
    assert torch.equal(res.trace.prompt_embeds, 2.0 * emb.tokens)


def _clip_normalise(picture, processor) -> torch.Tensor:
    array = np.asarray(picture, dtype=np.float32) / 255.0
    array = (array - np.array(processor.image_mean, dtype=np.float32)) / np.array(processor.image_std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1))[None]


def test_squash_and_pad_show_clip_the_whole_picture(tiny_pipe, image):
    from PIL import Image

    processor = tiny_pipe.image_processor
    size = (processor.crop_size["width"], processor.crop_size["height"])
    squash = tiny_pipe.generate(image, crop="squash", guidance_scale=1.0, steps=1).trace.pixel_values
    expected = _clip_normalise(image.resize(size, Image.Resampling.BICUBIC), processor)
    assert torch.allclose(squash, expected, atol=1e-5)

    padded = tiny_pipe.encode_image(image, crop="pad").pixel_values  # 96x80: 8 rows of CLIP's mean above
    assert padded.shape == squash.shape
    assert padded[0, :, 0].abs().max() < 0.02  # the mean colour normalises to (almost) zero
    center = tiny_pipe.encode_image(image).pixel_values
    assert not torch.allclose(padded, center) and not torch.allclose(squash, center)
    with pytest.raises(SettingsError, match="crop='zoom' is not one of center_crop, squash, pad"):
        tiny_pipe.encode_image(image, crop="zoom")


def test_single_equals_repeat_with_the_same_empty_prompt_negative(tiny_pipe, image):
    """Cross-attention has no positions: 77 copies of a token attend exactly like one."""
    repeat = tiny_pipe.generate(image, mode="repeat", **FAST)
    single = tiny_pipe.generate(image, mode="single", **FAST)
    assert single.trace.prompt_embeds.shape[1] == 1 and repeat.trace.prompt_embeds.shape[1] == 77
    assert torch.equal(single.trace.negative_prompt_embeds, repeat.trace.negative_prompt_embeds)
    assert np.abs(pixels(single) - pixels(repeat)).max() <= 1
    tokens = tiny_pipe.generate(image, mode="tokens", **FAST)  # the comparison can tell different conditionings
    assert np.abs(pixels(tokens) - pixels(repeat)).max() > 10


def test_single_equals_repeat_with_zero_negatives(tiny_pipe, image):
    repeat = tiny_pipe.generate(image, mode="repeat", negative="zeros", **FAST)
    single = tiny_pipe.generate(image, mode="single", negative="zeros", **FAST)
    assert "encoder_attention_mask" not in single.trace.extras  # equal lengths: nothing padded
    assert torch.equal(single.trace.negative_prompt_embeds, torch.zeros(1, 1, 32))
    assert np.abs(pixels(single) - pixels(repeat)).max() <= 1


def test_repeat_mode_is_the_guide_formula_and_bare_diffusers(tiny_pipe, image):
    res = tiny_pipe.generate(image, scale=1.5, **FAST)
    embeds = tiny_pipe.encode_image(image).image_embeds
    assert torch.equal(res.trace.prompt_embeds, 1.5 * embeds[:, None, :].repeat(1, 77, 1))
    bare = tiny_pipe.sd(
        prompt_embeds=res.trace.prompt_embeds, negative_prompt_embeds=res.trace.negative_prompt_embeds,
        num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(7),
    ).images
    assert np.array_equal(pixels(res), np.stack([np.asarray(i, dtype=np.int16) for i in bare]))


def test_blend_at_weight_zero_is_plain_text_to_image(tiny_pipe, image):
    res = tiny_pipe.generate(image, mode="blend", prompt="a lighthouse at dusk", image_weight=0.0, **FAST)
    plain = tiny_pipe.sd(
        "a lighthouse at dusk", num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(7)
    ).images
    assert np.array_equal(pixels(res), np.stack([np.asarray(i, dtype=np.int16) for i in plain]))


def test_blend_mixes_text_and_repeated_image_tokens(tiny_pipe, image):
    text = tiny_pipe.encode_text("a cat")
    image_tokens = c.repeat_tokens(tiny_pipe.encode_image(image).image_embeds)
    res = tiny_pipe.generate(image, mode="blend", prompt="a cat", image_weight=0.25, guidance_scale=1.0, steps=1)
    assert torch.allclose(res.trace.prompt_embeds, 0.75 * text + 0.25 * image_tokens, atol=1e-6)
    full = tiny_pipe.generate(image, mode="blend", prompt="a cat", image_weight=1.0, guidance_scale=1.0, steps=1)
    assert torch.equal(full.trace.prompt_embeds, image_tokens)
    concat = tiny_pipe.generate(image, mode="blend", blend="concat", prompt="a cat", image_weight=0.5, **FAST)
    assert concat.trace.prompt_embeds.shape == (1, 78, 32)
    assert concat.images  # text 77 tokens + 1 image token, negative padded to match


def test_norm_matching_measures_the_loaded_text_encoder(tiny_pipe, image):
    with torch.no_grad():
        probes = torch.cat([tiny_pipe.sd.encode_prompt(p, "cpu", 1, False)[0] for p in NORM_PROBE_PROMPTS])
    target = float(probes[:, 1:].norm(dim=-1).median())
    res = tiny_pipe.generate(image, mode="repeat", norm_match=True, scale=2.0, guidance_scale=1.0, steps=1)
    assert float(res.trace.extras["text_token_norm"]) == pytest.approx(target)
    before = res.trace.extras["image_token_norm_before"]
    assert torch.allclose(before, tiny_pipe.encode_image(image).image_embeds.norm().expand(77))
    assert torch.allclose(res.trace.prompt_embeds.norm(dim=-1), torch.full((1, 77), 2.0 * target))


def test_zero_and_image_negatives(tiny_pipe, image, other_image):
    zeros = tiny_pipe.generate(image, negative="zeros", **FAST)
    assert torch.equal(zeros.trace.negative_prompt_embeds, torch.zeros(1, 77, 32))
    neg = tiny_pipe.generate(image, negative_image=other_image, scale=0.5, **FAST)
    other = tiny_pipe.encode_image(other_image).image_embeds
    assert torch.equal(neg.trace.negative_prompt_embeds, 0.5 * c.repeat_tokens(other))
    assert neg.recipe["settings"]["negative"] == "image" and len(neg.recipe["negative_inputs"]) == 1
    assert np.abs(pixels(neg) - pixels(zeros)).max() > 10
    with pytest.raises(SettingsError, match=r"^negative='image' needs negative_image="):
        tiny_pipe.generate(image, negative="image", **FAST)


def test_two_images_weighted_average_and_concat(tiny_pipe, image, other_image):
    embeds = tiny_pipe.encode_image([image, other_image]).image_embeds
    res = tiny_pipe.generate([image, other_image], weights=[1, 3], guidance_scale=1.0, steps=1)
    expected = ((embeds[0] + 3 * embeds[1]) / 4)[None, None].expand(1, 77, -1)
    assert torch.allclose(res.trace.prompt_embeds, expected, atol=1e-6)
    cat = tiny_pipe.generate([image, other_image], mode="single", combine="concat", **FAST)
    assert torch.equal(cat.trace.prompt_embeds, embeds[None])
    assert cat.trace.extras["encoder_attention_mask"].sum() == 77 + 2


def test_several_images_combine_errors_are_readable(tiny_pipe, image, other_image):
    three = [image, other_image, make_image(2)]
    with pytest.raises(SettingsError, match=r"^'slerp' interpolates between exactly two images, got 3\.$"):
        tiny_pipe.generate(three, combine="slerp", **FAST)
    with pytest.raises(SettingsError, match=r"^Got 1 weights for 2 images"):
        tiny_pipe.generate([image, other_image], weights=[1], **FAST)


def test_recipe_is_json_and_rebuilds_the_settings(tiny_pipe, image, other_image):
    res = tiny_pipe.generate([image, other_image], mode="single", combine="slerp", weights=[1, 2], norm_match=True,
                             crop="pad", **FAST)
    recipe = json.loads(json.dumps(res.recipe))
    assert recipe == res.recipe  # JSON types throughout: the recipe survives a round trip unchanged
    assert recipe["method"] == "single"
    expected = GenerationSettings(mode="single", combine="slerp", weights=(1, 2), norm_match=True, crop="pad", **FAST)
    assert GenerationSettings.from_kwargs(**recipe["settings"]) == expected
    again = tiny_pipe.generate([image, other_image], GenerationSettings.from_kwargs(**recipe["settings"]))
    assert np.array_equal(pixels(again), pixels(res))


def test_image_token_modes_need_a_matching_encoder_width(tiny_pipe, image, monkeypatch):
    config = dict(tiny_pipe.sd.unet.config, cross_attention_dim=48)
    monkeypatch.setattr(tiny_pipe.sd.unet, "_internal_dict", type(tiny_pipe.sd.unet.config)(config))
    with pytest.raises(SettingsError, match="image encoder gives 32-d embeddings and the UNet expects 48-d"):
        tiny_pipe.generate(image, mode="single", **FAST)


# ---------------------------------------------------------------------------------------------
# The stronger methods, each through its offline tiny twin


@pytest.fixture(scope="module")
def variations_pipe():
    from imageprompt_widgets import ImagePromptPipeline

    return ImagePromptPipeline.from_preset("tiny-variations")


@pytest.fixture(scope="module")
def adapter_pipe():
    from imageprompt_widgets import ImagePromptPipeline

    return ImagePromptPipeline.from_preset("tiny-ip-adapter")


@pytest.fixture(scope="module")
def caption_pipe():
    from imageprompt_widgets import ImagePromptPipeline

    return ImagePromptPipeline.from_preset("tiny-caption")


def test_every_method_preset_has_an_offline_twin_and_documents_its_download():
    from imageprompt_widgets import PRESETS
    from imageprompt_widgets.presets import runs_toy_weights

    twinned = []
    for preset in PRESETS.values():
        assert preset.download_size, preset.name
        GenerationSettings.from_kwargs(**dict(preset.defaults))  # every preset's defaults are valid settings
        if preset.method and not preset.offline_builder and not runs_toy_weights(preset):  # toy-*: trained, offline
            twin = PRESETS[f"tiny-{preset.name}"]
            assert (twin.method, twin.defaults) == (preset.method, preset.defaults)
            twinned.append(preset.name)
    assert {"variations", "ip-adapter", "ip-adapter-plus", "ip-adapter-plus-face", "caption"} <= set(twinned)


def test_variations_equals_the_image_variations_pipeline(variations_pipe, image):
    from diffusers import StableDiffusionImageVariationPipeline

    sd = variations_pipe.sd
    res = variations_pipe.generate(image, **FAST)
    assert (res.recipe["method"], res.settings.mode, res.settings.negative) == ("variations", "single", "zeros")
    reference = StableDiffusionImageVariationPipeline(
        vae=sd.vae, image_encoder=sd.image_encoder, unet=sd.unet, scheduler=sd.scheduler, safety_checker=None,
        feature_extractor=sd.feature_extractor, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(image, num_inference_steps=2, guidance_scale=7.5,
                         generator=torch.Generator("cpu").manual_seed(7)).images
    assert np.array_equal(pixels(res), np.stack([np.asarray(i, dtype=np.int16) for i in expected]))


def test_variations_previews_and_cancel_work_like_every_mode(variations_pipe, image):
    import threading

    cancel, seen = threading.Event(), []

    def on_step(info):
        seen.append((info.step, tuple(info.x0().shape)))
        cancel.set()

    res = variations_pipe.generate(image, on_step=on_step, cancel=cancel, **FAST)
    assert res.cancelled and not res.images and seen == [(1, (1, 4, 32, 32))]


def test_variations_has_no_text_so_the_empty_prompt_negative_is_refused(variations_pipe, image):
    with pytest.raises(SettingsError, match="'tiny-variations' model has no text encoder.*negative='zeros'"):
        variations_pipe.generate(image, negative="empty_prompt", **FAST)


def test_ip_adapter_equals_bare_diffusers_with_ip_adapter_image(adapter_pipe, image):
    res = adapter_pipe.generate(image, prompt="a cat", **FAST)
    assert torch.equal(res.trace.prompt_embeds, adapter_pipe.encode_text("a cat"))
    bare = adapter_pipe.sd(
        "a cat", ip_adapter_image=image, num_inference_steps=2, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images
    assert np.array_equal(pixels(res), np.stack([np.asarray(i, dtype=np.int16) for i in bare]))


def _scales_per_call(pipe, **settings):
    from imageprompt_widgets.methods.ip_adapter import adapter_processors

    unet = pipe.sd.unet
    names = {id(p): n for n, p in unet.attn_processors.items()}
    calls = []
    handle = unet.register_forward_pre_hook(
        lambda module, args: calls.append({names[id(p)]: p.scale[0] for p in adapter_processors(unet)})
    )
    try:
        pipe.generate(make_image(0), **settings)
    finally:
        handle.remove()
    return calls


def test_ip_adapter_window_switches_off_outside_and_restores_the_scale(adapter_pipe):
    from imageprompt_widgets.methods.ip_adapter import adapter_processors

    calls = _scales_per_call(adapter_pipe, scale=0.7, adapter_start=0.25, adapter_end=0.75, steps=8, seed=1)
    total = len(calls)  # PNDM runs one step more than asked
    # diffusers' ControlNet window rule: a step acts when it lies wholly inside [start, end].
    expected = [0.7 if i / total >= 0.25 and (i + 1) / total <= 0.75 else 0.0 for i in range(total)]
    assert [set(call.values()) for call in calls] == [{s} for s in expected]
    assert expected.count(0.0) >= 2 and expected.count(0.7) >= 2
    assert all(p.scale == [1.0] for p in adapter_processors(adapter_pipe.sd.unet))  # restored


def test_ip_adapter_style_and_composition_blocks(adapter_pipe):
    style = _scales_per_call(adapter_pipe, adapter_blocks="style", scale=0.5, steps=1)[0]
    assert {n for n, s in style.items() if s} == {n for n in style if n.startswith("up_blocks.1.")}
    assert all(s in (0.0, 0.5) for s in style.values())
    composition = _scales_per_call(adapter_pipe, adapter_blocks="composition", steps=1)[0]
    assert {n for n, s in composition.items() if s} == {
        n for n in composition if n.startswith(("down_blocks.2.", "mid_block."))
    }


def test_ip_adapter_negative_image_and_several_images(adapter_pipe, image, other_image):
    embeds = adapter_pipe.encode_image([image, other_image]).image_embeds
    res = adapter_pipe.generate([image, other_image], combine="concat", negative_image=other_image, **FAST)
    adapter = res.trace.extras["ip_adapter_image_embeds"]
    assert torch.equal(adapter[1], embeds)
    assert torch.allclose(adapter[0], embeds[1:].expand(2, -1), atol=1e-5)  # encoded alone: batch rounding
    assert res.images


def test_adapter_encoder_is_not_a_unet_prompt(adapter_pipe, tiny_pipe, image):
    with pytest.raises(SettingsError, match="image encoder gives 48-d embeddings and the UNet expects 32-d"):
        adapter_pipe.generate(image, mode="repeat", **FAST)
    with pytest.raises(SettingsError, match="mode='ip_adapter' needs a preset with an IP-Adapter"):
        tiny_pipe.generate(image, mode="ip_adapter", **FAST)
    with pytest.raises(SettingsError, match="the IP-Adapter has its own projection"):
        adapter_pipe.generate(image, norm_match=True, **FAST)


def test_a_mismatched_encoder_fails_at_load_naming_both_sizes(adapter_pipe):
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.loading.cache import EncoderMismatchError
    from imageprompt_widgets.loading.offline import ensure_tiny_ip_adapter_models
    from imageprompt_widgets.methods.ip_adapter import check_adapter_fits
    from imageprompt_widgets.presets import Preset

    wide_encoder = ensure_tiny_ip_adapter_models()[1]
    with pytest.raises(EncoderMismatchError, match=r"gives 48-d embeddings but the UNet of 'tiny' expects 32-d"):
        ImagePromptPipeline.from_preset(Preset(name="bad", sd_model="tiny", clip_model=wide_encoder))
    narrow = ImagePromptPipeline.from_preset("tiny").image_encoder
    with pytest.raises(EncoderMismatchError, match=r"gives 32-d embeddings but the IP-Adapter .* expects 48-d"):
        check_adapter_fits(narrow, adapter_pipe.sd.unet, adapter_pipe.preset)


def test_caption_route_generates_from_blips_words_or_the_edited_ones(caption_pipe, image):
    words = caption_pipe.caption(image)
    assert words and words == caption_pipe.caption(image)  # greedy: the same caption every time
    res = caption_pipe.generate(image, **FAST)
    assert (res.recipe["method"], res.recipe["caption"]) == ("caption", words)
    assert torch.equal(res.trace.prompt_embeds, caption_pipe.encode_text(words))
    edited = caption_pipe.generate(image, prompt="a small red house", **FAST)
    assert edited.recipe["caption"] == "a small red house"
    bare = caption_pipe.sd("a small red house", num_inference_steps=2, guidance_scale=7.5,
                           generator=torch.Generator("cpu").manual_seed(7)).images
    assert np.array_equal(pixels(edited), np.stack([np.asarray(i, dtype=np.int16) for i in bare]))


def test_caption_mode_needs_a_captioner_or_words(tiny_pipe, image):
    with pytest.raises(SettingsError, match="'tiny' preset has no captioner"):
        tiny_pipe.generate(image, mode="caption", **FAST)
    with pytest.raises(SettingsError, match="mode='caption' has none: switch norm_match off"):
        tiny_pipe.generate(image, mode="caption", prompt="a cat", norm_match=True, **FAST)


@pytest.mark.parametrize("combine", ["subtract", "slerp"])
def test_a_combine_that_needs_two_images_refuses_one_instead_of_ignoring_it(tiny_pipe, image, combine):
    with pytest.raises(SettingsError, match=f"combine='{combine}' needs at least 2 images"):
        tiny_pipe.generate(image, combine=combine, **FAST)


def test_registry_names_what_each_method_reads_needs_and_its_twin():
    from imageprompt_widgets.methods import methods_for, presets_providing, settings_read
    from imageprompt_widgets.presets import PRESETS

    assert "prompt" not in settings_read("repeat") and "image_weight" not in settings_read("repeat")
    assert {"prompt", "image_weight", "blend"} <= settings_read("blend")
    assert "adapter_start" in settings_read("ip_adapter") and "adapter_start" not in settings_read("single")
    assert "norm_match" not in settings_read("ip_adapter")
    assert "canny_low" not in settings_read("repeat") and "canny_low" in settings_read("repeat", "edges")
    assert settings_read("repeat", "img2img") - settings_read("repeat") == {"strength"}
    assert methods_for(PRESETS["tiny"]) == ["repeat", "single", "tokens", "blend", "text", "words"]
    assert methods_for(PRESETS["tiny-ip-adapter"]) == ["ip_adapter", "text"]  # words only needs SD's text encoder
    assert methods_for(PRESETS["tiny-variations"]) == ["repeat", "single", "tokens"]
    assert "caption" in methods_for(PRESETS["tiny-caption"])
    assert methods_for(PRESETS["toy"]) == ["repeat", "single", "tokens", "blend", "caption", "text", "words",
                                           "projector"]
    assert methods_for(PRESETS["toy-ip-adapter"]) == ["ip_adapter", "text"]
    for name, method in METHODS.items():
        assert method.twin in presets_providing(name), name  # every method runs offline on its twin
        assert PRESETS[method.twin].offline_builder or name == "projector", name  # (the projector's: toy's)
        if method.toy_twin:
            assert method.toy_twin in presets_providing(name), name  # and, with trained weights, in the toy world


def test_a_loaded_pipeline_knows_which_methods_it_can_run(tiny_pipe):
    from imageprompt_widgets.methods import methods_for

    assert tiny_pipe.methods() == methods_for(tiny_pipe.preset)


def test_words_only_is_the_text_encoder_on_the_prompt_and_needs_no_image(tiny_pipe, image):
    from imageprompt_widgets.images import ImageInputError

    result = tiny_pipe.generate(mode="text", prompt="a cat", **FAST)
    assert torch.equal(result.trace.prompt_embeds, tiny_pipe.encode_text("a cat"))
    assert torch.equal(result.trace.negative_prompt_embeds, tiny_pipe.encode_text(""))
    with_image = tiny_pipe.generate(image, mode="text", prompt="a cat", **FAST)  # an image is not encoded
    assert np.array_equal(np.asarray(with_image.images[0]), np.asarray(result.images[0]))
    with pytest.raises(ImageInputError, match="mode='repeat' needs an image: add one, or draw from words alone"):
        tiny_pipe.generate(mode="repeat", **FAST)
    with pytest.raises(ImageInputError, match="mode='blend' needs an image"):
        tiny_pipe.generate([], mode="blend", prompt="a cat", image_weight=0.5, **FAST)
    with pytest.raises(SettingsError, match="type a prompt"):
        tiny_pipe.generate(mode="text", **FAST)
