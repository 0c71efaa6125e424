"""SDXL on the tiny twin: every route equals bare ``StableDiffusionXLPipeline`` fed the traced tensors.

The tiny SDXL (loading/offline_sdxl.py) keeps SDXL's arithmetic at 64 px: two text encoders (32 + 32 wide tokens,
a 32-wide pooled slot), a ViT-L analog and a bigG analog (projections 32 and 32, 65 tokens each).
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from helpers import assert_pixels_within, bare_sdxl_images, one_sentence, pixels

from imageprompt_widgets import GenerationSettings, ImagePromptPipeline, SettingsError
from imageprompt_widgets.conditioning import noise_augmented
from imageprompt_widgets.engine.results import Trace
from imageprompt_widgets.loading.cache import EncoderMismatchError, check_encoder_fits
from imageprompt_widgets.methods import methods_for, preset_capabilities, settings_read
from imageprompt_widgets.presets import PRESETS

STEPS = 3


@pytest.fixture(scope="module")
def sdxl() -> ImagePromptPipeline:
    return ImagePromptPipeline.from_preset("tiny-sdxl")


def bare_images(pipe: ImagePromptPipeline, res, *, steps: int = STEPS, **kwargs):
    return bare_sdxl_images(pipe, res, steps=steps, **kwargs)


def towers(pipe: ImagePromptPipeline, images) -> tuple:
    """Both towers run by hand: (ViT-L analog output, bigG analog output)."""
    with torch.no_grad():
        first = pipe.image_encoder(**pipe.image_processor(images=images, return_tensors="pt"))
        second = pipe.image_encoder_2(**pipe.image_processor_2(images=images, return_tensors="pt"))
    return first, second


def projected_tokens(encoder, output) -> torch.Tensor:
    with torch.no_grad():
        return encoder.visual_projection(encoder.vision_model.post_layernorm(output.last_hidden_state))


# -- the twin and its loading ---------------------------------------------------------------------------------


def test_tiny_sdxl_loads_as_sdxl_with_consistent_widths(sdxl):
    assert isinstance(sdxl.sd, StableDiffusionXLPipeline)
    unet, text, text_2 = sdxl.sd.unet.config, sdxl.sd.text_encoder.config, sdxl.sd.text_encoder_2.config
    assert unet.cross_attention_dim == text.hidden_size + text_2.hidden_size == 64
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + text_2.projection_dim
    assert sdxl.image_encoder.config.projection_dim == text.hidden_size
    assert sdxl.image_encoder_2.config.projection_dim == text_2.projection_dim == 32
    assert sdxl.native_size == 64
    assert {"sdxl", "pooled_image", "image_tokens", "text"} <= sdxl.capabilities()
    assert "revision" in sdxl.methods()
    assert sdxl.sd.config.force_zeros_for_empty_prompt


def test_the_twin_is_small(sdxl):
    from imageprompt_widgets.loading.offline_sdxl import tiny_sdxl_dir

    size = sum(path.stat().st_size for path in tiny_sdxl_dir().rglob("*") if path.is_file())
    assert size < 5 * 2**20, size


def test_the_bigg_analog_text_tower_is_sdxls_second_text_encoder(sdxl):
    """As in the real checkpoints: bigG's text tower with projection is SDXL's text_encoder_2, so the pooled text
    embedding and bigG's image embedding share one space."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(sdxl.image_encoder_2.config.name_or_path, use_safetensors=True)
    ours = {**{f"text_model.{k}": v for k, v in clip.text_model.state_dict().items()},
            **{f"text_projection.{k}": v for k, v in clip.text_projection.state_dict().items()}}
    theirs = sdxl.sd.text_encoder_2.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert torch.equal(clip.visual_projection.weight, sdxl.image_encoder_2.visual_projection.weight)


def test_check_encoder_fits_adds_both_towers_widths():
    preset = PRESETS["sdxl"]

    def config(**values):
        return types.SimpleNamespace(config=types.SimpleNamespace(**values))

    unet, text_2 = config(cross_attention_dim=2048), config(projection_dim=1280)
    check_encoder_fits(config(projection_dim=768), unet, preset, config(projection_dim=1280), text_2)
    with pytest.raises(EncoderMismatchError, match="768-d and 1024-d") as err:
        check_encoder_fits(config(projection_dim=768), unet, preset, config(projection_dim=1024), text_2)
    one_sentence(err.value)


def test_a_local_sdxl_folder_resolves_as_sdxl(sdxl, tmp_path):
    from imageprompt_widgets.loading.offline_sdxl import tiny_sdxl_dir
    from imageprompt_widgets.presets import resolve_preset

    local = resolve_preset(str(tiny_sdxl_dir() / "sd"))
    assert local.family == "sdxl" and not local.image_tokens_fit and local.clip_model_2 is None
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert resolve_preset(str(tmp_path)).family == "sd1"


def test_presets_and_capabilities():
    assert PRESETS["sdxl"].sd_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert PRESETS["sdxl"].clip_model_2 == "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
    assert PRESETS["sdxl-live"].loras == (("latent-consistency/lcm-lora-sdxl", 1.0),)
    assert dict(PRESETS["sdxl-live"].defaults)["scheduler"] == "lcm"
    assert "revision" in methods_for(PRESETS["tiny-sdxl"]) and "revision" in methods_for(PRESETS["sdxl"])
    assert "revision" not in methods_for(PRESETS["tiny"])
    assert "original_size" in settings_read("repeat", capabilities=preset_capabilities(PRESETS["tiny-sdxl"]))
    assert "original_size" not in settings_read("repeat", capabilities=preset_capabilities(PRESETS["tiny"]))


# -- text: exactly diffusers' encode_prompt and its call -------------------------------------------------------


def test_text_route_equals_diffusers_encoding_its_own_prompt(sdxl):
    res = sdxl.generate(mode="text", prompt="a red house", steps=STEPS, seed=3)
    embeds, negative, pooled, negative_pooled = sdxl.sd.encode_prompt("a red house", device=torch.device("cpu"))
    trace = res.trace
    assert trace.prompt_embeds.shape == (1, 77, 64) and trace.pooled_prompt_embeds.shape == (1, 32)
    assert torch.equal(trace.prompt_embeds, embeds) and torch.equal(trace.pooled_prompt_embeds, pooled)
    # SDXL base forces zeros for the empty negative: so do we.
    assert torch.equal(trace.negative_prompt_embeds, negative) and not trace.negative_prompt_embeds.any()
    assert torch.equal(trace.negative_pooled_prompt_embeds, negative_pooled)
    bare = StableDiffusionXLPipeline(**sdxl.sd.components)
    bare.set_progress_bar_config(disable=True)
    theirs = bare(prompt="a red house", num_inference_steps=STEPS, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3)).images
    assert_pixels_within(res.images, theirs)
    assert_pixels_within(res.images, bare_images(sdxl, res, seed=3))


@pytest.mark.slow
def test_a_negative_prompt_is_diffusers_negative(sdxl):
    res = sdxl.generate(mode="text", prompt="a red house", negative_prompt="blurry", steps=STEPS)
    _, negative, _, negative_pooled = sdxl.sd.encode_prompt("a red house", device=torch.device("cpu"),
                                                            negative_prompt="blurry")
    assert torch.equal(res.trace.negative_prompt_embeds, negative)
    assert torch.equal(res.trace.negative_pooled_prompt_embeds, negative_pooled)
    assert_pixels_within(res.images, bare_images(sdxl, res))


@pytest.mark.slow
def test_without_guidance_nothing_negative_is_traced(sdxl):
    res = sdxl.generate(mode="text", prompt="a cat", guidance_scale=1.0, steps=STEPS)
    assert res.trace.negative_prompt_embeds is None and res.trace.negative_pooled_prompt_embeds is None
    assert_pixels_within(res.images, bare_images(sdxl, res, guidance=1.0))


# -- the image routes: 2,048-wide tokens (here 64), bigG in the pooled slot ------------------------------------


def test_repeat_fills_both_token_spaces_and_the_pooled_slot(sdxl, image):
    res = sdxl.generate(image, mode="repeat", steps=STEPS)
    first, second = towers(sdxl, [image])
    wide = torch.cat([first.image_embeds, second.image_embeds], dim=-1)
    assert res.trace.prompt_embeds.shape == (1, 77, 64)
    assert torch.equal(res.trace.prompt_embeds, wide[:, None, :].repeat(1, 77, 1))
    assert torch.equal(res.trace.pooled_prompt_embeds, second.image_embeds)
    assert torch.equal(res.trace.image_embeds, first.image_embeds)  # the trace's image_embeds: the first tower's
    assert not res.trace.negative_pooled_prompt_embeds.any()
    assert_pixels_within(res.images, bare_images(sdxl, res))


def test_tokens_concatenate_each_towers_projected_tokens(sdxl, image):
    res = sdxl.generate(image, mode="tokens", negative="zeros", steps=STEPS)
    first, second = towers(sdxl, [image])
    tokens_1 = projected_tokens(sdxl.image_encoder, first)
    tokens_2 = projected_tokens(sdxl.image_encoder_2, second)
    assert tokens_1.shape[1] == tokens_2.shape[1] == 65  # the same patch grid: one token of each per position
    assert sdxl.image_encoder.config.hidden_size != sdxl.image_encoder_2.config.hidden_size
    assert res.trace.prompt_embeds.shape == (1, 65, 64)
    assert torch.allclose(res.trace.prompt_embeds, torch.cat([tokens_1, tokens_2], dim=-1), atol=1e-6)
    assert torch.equal(res.trace.pooled_prompt_embeds, second.image_embeds)
    assert_pixels_within(res.images, bare_images(sdxl, res))


@pytest.mark.slow
def test_single_with_zeros_negative_equals_bare(sdxl, image):
    res = sdxl.generate(image, mode="single", negative="zeros", scale=2.0, steps=STEPS)
    assert res.trace.prompt_embeds.shape == (1, 1, 64)
    assert not res.trace.negative_pooled_prompt_embeds.any()
    assert_pixels_within(res.images, bare_images(sdxl, res))


@pytest.mark.slow
@pytest.mark.parametrize("combine", ["average", "slerp", "concat"])
def test_combines_act_on_tokens_and_pooled_slot(sdxl, image, other_image, combine):
    res = sdxl.generate([image, other_image], mode="repeat", combine=combine, weights=[0.3, 0.7], negative="zeros",
                        steps=STEPS)
    _, second = towers(sdxl, [image, other_image])
    pooled = res.trace.pooled_prompt_embeds
    if combine == "average":
        expected = 0.3 * second.image_embeds[0] + 0.7 * second.image_embeds[1]  # the weights sum to one
        assert torch.allclose(pooled[0], expected, atol=1e-6)
    elif combine == "concat":  # no single vector: the weighted sum, as ComfyUI sums unCLIP conditionings
        assert res.trace.prompt_embeds.shape == (1, 154, 64)
        assert torch.allclose(pooled[0], 0.3 * second.image_embeds[0] + 0.7 * second.image_embeds[1], atol=1e-6)
    else:  # along the great circle, t = 0.7, by hand
        a, b = second.image_embeds[0].double(), second.image_embeds[1].double()
        theta = torch.arccos(a @ b / (a.norm() * b.norm()))
        by_hand = (torch.sin(0.3 * theta) * a + torch.sin(0.7 * theta) * b) / torch.sin(theta)
        assert torch.allclose(pooled[0].double(), by_hand, atol=1e-5)
    assert_pixels_within(res.images, bare_images(sdxl, res))


@pytest.mark.slow
def test_blend_mixes_tokens_and_pooled_slot_by_image_weight(sdxl, image):
    text = sdxl.generate(mode="text", prompt="a boat", steps=STEPS)
    at_zero = sdxl.generate(image, mode="blend", prompt="a boat", image_weight=0.0, steps=STEPS)
    assert torch.equal(at_zero.trace.pooled_prompt_embeds, text.trace.pooled_prompt_embeds)
    assert np.array_equal(pixels(at_zero), pixels(text))
    half = sdxl.generate(image, mode="blend", prompt="a boat", image_weight=0.25, steps=STEPS)
    _, second = towers(sdxl, [image])
    expected = 0.75 * text.trace.pooled_prompt_embeds + 0.25 * second.image_embeds
    assert torch.allclose(half.trace.pooled_prompt_embeds, expected, atol=1e-6)
    assert_pixels_within(half.images, bare_images(sdxl, half))


def test_negative_images_fill_the_negative_pooled_slot(sdxl, image, other_image):
    res = sdxl.generate(image, negative_image=other_image, mode="repeat", negative_prompt="blurry", steps=STEPS)
    _, second = towers(sdxl, [other_image])
    assert torch.equal(res.trace.negative_pooled_prompt_embeds, second.image_embeds)
    assert res.trace.negative_prompt_embeds.shape == (1, 154, 64)  # the negative text's 77 then the image's 77
    assert res.trace.prompt_embeds.shape == (1, 77, 64)  # padded with masked tokens for the UNet
    revision = sdxl.generate(image, negative_image=other_image, mode="revision", prompt="a cat", steps=STEPS)
    assert torch.equal(revision.trace.negative_pooled_prompt_embeds, second.image_embeds)
    assert torch.equal(revision.trace.negative_prompt_embeds, torch.zeros(1, 77, 64))  # the text side: diffusers'


@pytest.mark.slow
def test_two_images_two_outputs_give_one_pooled_row_each(sdxl, image):
    res = sdxl.generate(image, mode="repeat", num_images=2, steps=STEPS)
    assert res.trace.pooled_prompt_embeds.shape == (2, 32)
    assert res.trace.negative_pooled_prompt_embeds.shape == (2, 32)
    assert_pixels_within(res.images, bare_images(sdxl, res))


# -- micro-conditioning ------------------------------------------------------------------------------------------


def time_ids_of(pipe: ImagePromptPipeline, **settings) -> tuple[torch.Tensor, object]:
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    handle = pipe.sd.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        res = pipe.generate(mode="text", prompt="a tree", steps=2, **settings)
    finally:
        handle.remove()
    return seen[0], res


def test_micro_conditioning_defaults_as_diffusers_does(sdxl):
    time_ids, res = time_ids_of(sdxl)
    assert time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # (height, width), (0, 0), (height, width), guided
    assert res.provenance.notes["micro_conditioning"] == {
        "original_size": [64, 64], "crops_coords_top_left": [0, 0], "target_size": [64, 64]}


def test_micro_conditioning_reaches_add_time_ids_and_equals_bare(sdxl):
    chosen = {"original_size": (128, 96), "crops_coords_top_left": (8, 16), "target_size": (48, 40)}
    time_ids, res = time_ids_of(sdxl, **chosen)
    assert time_ids.tolist() == [[128, 96, 8, 16, 48, 40]] * 2
    assert res.recipe["settings"]["original_size"] == [128, 96]
    assert res.provenance.notes["micro_conditioning"]["crops_coords_top_left"] == [8, 16]
    assert_pixels_within(res.images, bare_images(sdxl, res, steps=2, **chosen))
    plain = sdxl.generate(mode="text", prompt="a tree", steps=2)
    assert not np.array_equal(pixels(res), pixels(plain))


def test_micro_conditioning_settings_are_checked():
    assert GenerationSettings(original_size=[1024.0, 768]).original_size == (1024, 768)
    assert GenerationSettings(original_size=None).original_size == ()
    assert GenerationSettings(crops_coords_top_left="0, 32").crops_coords_top_left == (0, 32)
    with pytest.raises(SettingsError, match="two numbers"):
        GenerationSettings(original_size=(1024,))
    with pytest.raises(SettingsError, match="whole pixels"):
        GenerationSettings(target_size=(1024.5, 512))
    with pytest.raises(SettingsError, match="outside its range"):
        GenerationSettings(target_size=(0, 512))


def test_micro_conditioning_is_refused_on_sd1(tiny_pipe):
    with pytest.raises(SettingsError, match="micro-conditioning") as err:
        tiny_pipe.generate(mode="text", prompt="a tree", steps=1, original_size=(512, 512))
    assert "'tiny' is not SDXL" in one_sentence(err.value)


def test_interpolation_is_refused_on_sdxl_for_now(sdxl, image, other_image):
    with pytest.raises(SettingsError, match="not available on SDXL yet") as err:
        sdxl.interpolate(image, other_image, count=2, steps=1)
    one_sentence(err.value)


@pytest.mark.slow
def test_words_route_fills_the_pooled_slot_with_its_words(sdxl, image):
    res = sdxl.generate(image, mode="words", steps=2)
    words = res.provenance.notes["words"]
    embeds, _, pooled, _ = sdxl.sd.encode_prompt(words, device=torch.device("cpu"))
    assert torch.equal(res.trace.prompt_embeds, embeds) and torch.equal(res.trace.pooled_prompt_embeds, pooled)
    assert_pixels_within(res.images, bare_images(sdxl, res, steps=2))


# -- revision ---------------------------------------------------------------------------------------------------


def test_revision_at_strength_zero_is_text_to_image(sdxl, image):
    text = sdxl.generate(mode="text", prompt="a lighthouse", steps=STEPS, seed=5)
    revision = sdxl.generate(image, mode="revision", prompt="a lighthouse", revision_strength=0.0, steps=STEPS,
                             seed=5)
    for name in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        assert torch.equal(getattr(revision.trace, name), getattr(text.trace, name)), name
    assert np.array_equal(pixels(revision), pixels(text))


def test_revision_puts_biggs_image_embedding_in_the_pooled_slot(sdxl, image):
    res = sdxl.generate(image, mode="revision", steps=STEPS)
    _, second = towers(sdxl, [image])
    assert torch.equal(res.trace.pooled_prompt_embeds, second.image_embeds)
    assert torch.equal(res.trace.prompt_embeds, sdxl.encode_text(""))  # no prompt: the empty prompt's tokens
    assert_pixels_within(res.images, bare_images(sdxl, res))
    mixed = sdxl.generate(image, mode="revision", prompt="a dog", revision_strength=0.4, steps=STEPS)
    expected = 0.6 * sdxl.encode_pooled_text("a dog") + 0.4 * second.image_embeds
    assert torch.allclose(mixed.trace.pooled_prompt_embeds, expected, atol=1e-6)
    assert_pixels_within(mixed.images, bare_images(sdxl, mixed))


def test_noise_augmentation_follows_the_cosine_schedule(sdxl, image):
    res = sdxl.generate(image, mode="revision", noise_augmentation=0.3, seed=11, steps=STEPS)
    _, second = towers(sdxl, [image])
    alphas = torch.cumprod(1 - betas_for_alpha_bar(1000, alpha_transform_type="cosine").double(), dim=0)
    alpha = float(alphas[round(999 * 0.3)])
    noise = torch.randn((1, 32), generator=torch.Generator().manual_seed(11))
    expected = math.sqrt(alpha) * second.image_embeds + math.sqrt(1 - alpha) * noise
    assert torch.allclose(res.trace.pooled_prompt_embeds, expected, atol=1e-5)
    again = sdxl.generate(image, mode="revision", noise_augmentation=0.3, seed=11, steps=STEPS)
    assert torch.equal(again.trace.pooled_prompt_embeds, res.trace.pooled_prompt_embeds)
    assert torch.equal(noise_augmented(second.image_embeds, 0.0, torch.Generator()), second.image_embeds)


def test_revision_is_refused_on_sd1(tiny_pipe, image):
    with pytest.raises(SettingsError, match="pooled slot") as err:
        tiny_pipe.generate(image, mode="revision", steps=1)
    one_sentence(err.value)


# -- the trace and the live twin ----------------------------------------------------------------------------------


def test_x0_replays_equal_the_live_previews_on_sdxl(sdxl, image):
    """The inspector's replay feeds SDXL's UNet the traced pooled slot and micro-conditioning: what the live
    preview showed one step later."""
    live = []
    res = sdxl.generate(image, mode="revision", prompt="a cat", steps=4, seed=1, trace_latents=True,
                        original_size=(96, 128), on_step=lambda info: live.append(info.x0().cpu()))
    snapshots = list(range(len(live) - 1))
    replayed = sdxl.replay_x0(res, snapshots)
    for snapshot in snapshots:
        assert torch.allclose(replayed[snapshot], live[snapshot + 1][0], atol=1e-4, rtol=1e-4), snapshot


def test_pooled_tensors_are_traced_saved_and_loaded(sdxl, image, tmp_path, tiny_pipe):
    res = sdxl.generate(image, mode="repeat", steps=2)
    tensors = res.trace.tensors()
    assert tensors["pooled_prompt_embeds"].shape == (1, 32)
    assert tensors["negative_pooled_prompt_embeds"].shape == (1, 32)
    loaded, _ = Trace.load(res.trace.save(tmp_path / "trace.safetensors"))
    assert torch.equal(loaded.pooled_prompt_embeds, res.trace.pooled_prompt_embeds)
    sd1 = tiny_pipe.generate(image, steps=1)
    assert sd1.trace.pooled_prompt_embeds is None and "pooled_prompt_embeds" not in sd1.trace.tensors()


@pytest.mark.slow
def test_tiny_sdxl_live_runs_four_lcm_steps_as_bare_diffusers(image):
    live = ImagePromptPipeline.from_preset("tiny-sdxl-live")
    settings = live.default_settings()
    assert (settings.scheduler, settings.steps, settings.guidance_scale, settings.decoder) == ("lcm", 4, 1.0, "tiny")
    assert [info.source for info in live.loras] == ["tiny-sdxl-lcm-lora"]
    res = live.generate(image, mode="repeat")
    assert len(res.trace.timesteps) == 4 and res.trace.negative_prompt_embeds is None
    assert res.provenance.model["tiny_decoder"] == "tiny-taesd"
    theirs = bare_images(live, res, steps=4, guidance=1.0, vae=live.tiny_decoder(),
                         scheduler=LCMScheduler.from_config(live.sd.scheduler.config))
    assert_pixels_within(res.images, theirs)
    full = live.generate(image, mode="repeat", decoder="full")
    assert_pixels_within(full.images, bare_images(live, full, steps=4, guidance=1.0,
                                                 scheduler=LCMScheduler.from_config(live.sd.scheduler.config)))
    plain = ImagePromptPipeline.from_preset("tiny-sdxl").generate(image, mode="repeat", scheduler="lcm", steps=4,
                                                                  guidance_scale=1.0)
    assert not np.array_equal(pixels(full), pixels(plain))  # the LoRA acts


def test_sdxl_vaes_get_taesdxl():
    from imageprompt_widgets.engine.preview import TAESD_SDXL, is_sd1_vae, is_sdxl_vae

    sdxl_vae = types.SimpleNamespace(config={"latent_channels": 4, "scaling_factor": 0.13025,
                                             "block_out_channels": [128, 256, 512, 512]})
    assert is_sdxl_vae(sdxl_vae) and not is_sd1_vae(sdxl_vae)
    pipe = ImagePromptPipeline.__new__(ImagePromptPipeline)
    pipe.sd, pipe.preset = types.SimpleNamespace(vae=sdxl_vae), PRESETS["sdxl"]
    assert pipe.tiny_decoder_source() == TAESD_SDXL
