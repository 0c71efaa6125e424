"""Structure on SDXL: edges and depth through SDXL ControlNets, img2img through SDXL's img2img pipeline.

Everything runs on the tiny twins (tiny-sdxl and the tiny SDXL ControlNets made from its UNet, loading/
offline_sdxl.py); every run equals bare diffusers (``StableDiffusionXLControlNetPipeline``,
``StableDiffusionXLImg2ImgPipeline``) on the same components, fed the trace's ``prompt_embeds``,
``pooled_prompt_embeds`` and their negatives, with the same seed (pixel difference at most 1).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from helpers import assert_pixels_within, optional_module, pixels
from PIL import Image

from imageprompt_widgets import ImagePromptPipeline, SettingsError
from imageprompt_widgets.loading.offline import shape_image
from imageprompt_widgets.presets import PRESETS
from imageprompt_widgets.structure import plan as structure
from imageprompt_widgets.structure.controlnets import CONTROL_KINDS, controlnet_for, kind_of_controlnet

cv2 = optional_module("cv2")

STEPS = 3


@pytest.fixture(scope="module")
def sdxl() -> ImagePromptPipeline:
    return ImagePromptPipeline.from_preset("tiny-sdxl")


def trace_kwargs(result) -> dict:
    """What bare diffusers is fed: the traced embeddings, the steps, the guidance and a fresh seeded generator."""
    trace, settings = result.trace, result.settings
    return {
        "prompt_embeds": trace.prompt_embeds,
        "pooled_prompt_embeds": trace.pooled_prompt_embeds,
        "negative_prompt_embeds": trace.negative_prompt_embeds,
        "negative_pooled_prompt_embeds": trace.negative_pooled_prompt_embeds,
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(settings.seed),
    }


def result_size(result) -> tuple[int, int]:
    return result.images[0].size


def traced_map(result, name: str = "control_image") -> Image.Image:
    """The map a run fed its ControlNet, back as the RGB picture diffusers is handed ([1, 3, H, W] in 0..1)."""
    gray = (result.trace.extras[name][0, 0] * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(gray).convert("RGB")


# -- presets and names ---------------------------------------------------------------------------------------


def test_sdxl_presets_name_sdxl_controlnets_and_their_twins():
    assert PRESETS["sdxl"].controlnet == "sdxl" and PRESETS["tiny-sdxl"].controlnet == "tiny-sdxl"
    assert controlnet_for("edges", "sdxl") == "diffusers/controlnet-canny-sdxl-1.0"
    assert controlnet_for("depth", "sdxl") == "diffusers/controlnet-depth-sdxl-1.0"
    assert (controlnet_for("edges", "tiny-sdxl"), controlnet_for("depth", "tiny-sdxl")) == (
        "tiny-sdxl-canny", "tiny-sdxl-depth")
    for kind in CONTROL_KINDS.values():
        assert "GB" in kind.sdxl_controlnet_size
        assert kind_of_controlnet(kind.sdxl_controlnet) == kind_of_controlnet(kind.sdxl_twin) == kind.name
    assert "SDXL ControlNets (about 5 GB each)" in PRESETS["sdxl"].note


def test_tiny_sdxl_controlnet_is_made_from_the_tiny_sdxl_unet(sdxl):
    from diffusers import ControlNetModel

    controlnet = sdxl.load_controlnet()
    assert isinstance(controlnet, ControlNetModel)
    unet = sdxl.sd.unet.config
    for name in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                 "cross_attention_dim", "block_out_channels", "transformer_layers_per_block"):
        assert controlnet.config[name] == unet[name], name
    # from_unet copies the UNet's encoder: the first convolution is the UNet's, the depth twin has another seed
    assert torch.equal(controlnet.conv_in.weight, sdxl.sd.unet.conv_in.weight)
    depth = sdxl.load_controlnet(kind="depth")
    assert depth is not controlnet
    assert not torch.equal(depth.controlnet_mid_block.weight, controlnet.controlnet_mid_block.weight)


# -- bare diffusers equality ---------------------------------------------------------------------------------


def test_edges_on_sdxl_equals_bare_sdxl_controlnet_pipeline(sdxl, image):
    from diffusers import StableDiffusionXLControlNetPipeline

    square = shape_image("square")
    result = sdxl.generate(image, steps=STEPS, seed=5, structure="edges", structure_image=square, control_scale=0.8,
                           control_start=0.2, control_end=0.9, canny_low=50, canny_high=150)
    size = sdxl.native_size
    edges = Image.fromarray(cv2.Canny(np.asarray(square.resize((size, size), Image.Resampling.LANCZOS)
                                                 .convert("L")), 50, 150)).convert("RGB")
    assert np.array_equal(np.asarray(traced_map(result)), np.asarray(edges))  # the map is OpenCV's, at the run's size
    assert result.recipe["model"]["controlnet"] == "tiny-sdxl-canny"
    assert result.trace.pooled_prompt_embeds is not None

    bare = StableDiffusionXLControlNetPipeline(**sdxl.sd.components, controlnet=sdxl.load_controlnet())
    bare.set_progress_bar_config(disable=True)
    expected = bare(image=edges, controlnet_conditioning_scale=0.8, control_guidance_start=0.2,
                    control_guidance_end=0.9, **trace_kwargs(result)).images
    assert_pixels_within(result.images, expected)
    runner = sdxl.structure_pipeline("edges")
    assert isinstance(runner, StableDiffusionXLControlNetPipeline) and runner.unet is sdxl.sd.unet  # no second SD


def test_control_scale_zero_on_sdxl_equals_plain_sdxl(sdxl, image):
    """Zero scale adds exact zeros to the UNet's features: the plain SDXL run's pixels; a scale of 1 moves them."""
    square = shape_image("square")
    size = sdxl.native_size
    off = sdxl.generate(image, steps=2, seed=3, structure="edges", structure_image=square, control_scale=0.0)
    plain = sdxl.generate(image, steps=2, seed=3, height=size, width=size)
    on = sdxl.generate(image, steps=2, seed=3, structure="edges", structure_image=square)
    assert_pixels_within(off.images, plain.images)
    assert float(np.abs(pixels(on).astype(float) - pixels(plain).astype(float)).mean()) > 1.0


def test_depth_on_sdxl_equals_bare_sdxl_controlnet_pipeline(sdxl, image):
    from diffusers import StableDiffusionXLControlNetPipeline

    square = shape_image("square")
    result = sdxl.generate(image, steps=STEPS, seed=2, structure="depth", structure_image=square, control_scale=0.7,
                           control_start=0.1)
    assert (result.recipe["model"]["controlnet"], result.recipe["model"]["depth_estimator"]) == (
        "tiny-sdxl-depth", "tiny")
    depth = sdxl._structure.estimator("depth").depth_map(structure.resized(square, (sdxl.native_size,) * 2))
    assert np.array_equal(np.asarray(traced_map(result).convert("L")), np.asarray(depth))

    bare = StableDiffusionXLControlNetPipeline(**sdxl.sd.components, controlnet=sdxl.load_controlnet(kind="depth"))
    bare.set_progress_bar_config(disable=True)
    expected = bare(image=depth.convert("RGB"), controlnet_conditioning_scale=0.7, control_guidance_start=0.1,
                    **trace_kwargs(result)).images
    assert_pixels_within(result.images, expected)


def test_two_units_on_sdxl_equal_bare_multi_controlnet(sdxl, image):
    """edges and depth at once (diffusers' MultiControlNetModel over both SDXL twins), each its picture and scale."""
    from diffusers import StableDiffusionXLControlNetPipeline

    square, circle = shape_image("square"), shape_image("circle")
    result = sdxl.generate(image, steps=2, seed=6, mode="revision", structure="edges", control_scale=0.9,
                           structure_image=[square, circle], control_units=[{"kind": "depth", "scale": 0.5,
                                                                             "end": 0.5}])
    assert result.recipe["model"]["controlnet"] == ["tiny-sdxl-canny", "tiny-sdxl-depth"]
    nets = [sdxl.load_controlnet(), sdxl.load_controlnet(kind="depth")]
    bare = StableDiffusionXLControlNetPipeline(**sdxl.sd.components, controlnet=nets)
    bare.set_progress_bar_config(disable=True)
    expected = bare(image=[traced_map(result), traced_map(result, "control_image_1")],
                    controlnet_conditioning_scale=[0.9, 0.5], control_guidance_start=[0.0, 0.0],
                    control_guidance_end=[1.0, 0.5], **trace_kwargs(result)).images
    assert_pixels_within(result.images, expected)


def test_img2img_on_sdxl_equals_bare_sdxl_img2img_pipeline(sdxl, image):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    square = shape_image("square")
    result = sdxl.generate(image, steps=6, seed=4, structure="img2img", strength=0.5, structure_image=square)
    assert "control_image" not in result.trace.extras and "start_latents" in result.trace.extras
    init = structure.resized(square, (sdxl.native_size,) * 2)
    bare = StableDiffusionXLImg2ImgPipeline(**sdxl.sd.components)
    bare.set_progress_bar_config(disable=True)
    expected = bare(image=init, strength=0.5, **trace_kwargs(result)).images
    assert_pixels_within(result.images, expected)
    assert len(result.trace.timesteps) == 3  # int(6 * 0.5): the second half of the schedule
    assert isinstance(sdxl.structure_pipeline("img2img"), StableDiffusionXLImg2ImgPipeline)


def test_sdxl_img2img_prints_no_empty_float32_warning(sdxl, image):
    """SDXL's img2img casts its VAE to float32 and back each run; diffusers warns on each cast even when no module
    is listed. Our run drops that one message (bare diffusers prints it); other messages still pass."""
    import logging

    from imageprompt_widgets.structure.plan import EMPTY_UPCAST_WARNING, without_empty_upcast_warning

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever verbosity diffusers was left at
    logger.addHandler(handler)
    try:
        sdxl.generate(image, steps=2, seed=0, structure="img2img", strength=0.5, structure_image=shape_image("square"))
        assert not any(EMPTY_UPCAST_WARNING in message for message in seen)
        bare = sdxl.structure_pipeline("img2img")
        bare(image=shape_image("square"), strength=0.5, num_inference_steps=2, prompt_embeds=torch.zeros(1, 77, 64),
             pooled_prompt_embeds=torch.zeros(1, 32), guidance_scale=1.0)
        assert any(EMPTY_UPCAST_WARNING in message for message in seen)  # the message is real; only ours drops it
        seen.clear()
        with without_empty_upcast_warning():
            logger.warning("another message")
        assert seen == ["another message"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_micro_conditioning_reaches_the_structure_pipelines(sdxl, image):
    """original_size / crops_coords_top_left go to the ControlNet and img2img calls as to bare diffusers', and
    change the picture (SDXL's time ids), while the recipe says what SDXL was told."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    square = shape_image("square")
    told = {"original_size": (32, 48), "crops_coords_top_left": (8, 0)}
    result = sdxl.generate(image, steps=4, seed=1, structure="img2img", strength=0.75, structure_image=square, **told)
    plain = sdxl.generate(image, steps=4, seed=1, structure="img2img", strength=0.75, structure_image=square)
    assert not np.array_equal(pixels(result), pixels(plain))
    bare = StableDiffusionXLImg2ImgPipeline(**sdxl.sd.components)
    bare.set_progress_bar_config(disable=True)
    expected = bare(image=structure.resized(square, (sdxl.native_size,) * 2), strength=0.75, **told,
                    **trace_kwargs(result)).images
    assert_pixels_within(result.images, expected)
    size = sdxl.native_size
    assert result.recipe["micro_conditioning"] == {
        "original_size": [32, 48], "crops_coords_top_left": [8, 0], "target_size": [size, size]}

    wide = square.resize((128, 64))  # img2img keeps its aspect ratio: 64 x 32 on the 64 px twin
    wide_run = sdxl.generate(image, steps=2, seed=1, structure="img2img", strength=0.75, structure_image=wide)
    assert result_size(wide_run) == (64, 32)
    assert wide_run.recipe["micro_conditioning"]["original_size"] == [32, 64]  # (height, width), as diffusers
    expected = bare(image=structure.resized(wide, (64, 32)), strength=0.75, **trace_kwargs(wide_run)).images
    assert_pixels_within(wide_run.images, expected)

    edges = sdxl.generate(image, steps=2, seed=1, structure="edges", structure_image=square, **told)
    bare_cn = sdxl.structure_pipeline("edges")
    expected = bare_cn(image=traced_map(edges), **told, **trace_kwargs(edges)).images
    assert_pixels_within(edges.images, expected)


def test_structure_keeps_each_sdxl_methods_conditioning(sdxl, image):
    """The method's prompt and pooled slot are what the ControlNet run is handed (revision: the image's bigG
    embedding in the pooled slot), the same as without structure."""
    square = shape_image("square")
    for mode in ("repeat", "single", "revision"):  # single: a padded prompt, masked in the ControlNet too
        plain = sdxl.generate(image, steps=1, seed=0, mode=mode)
        edged = sdxl.generate(image, steps=1, seed=0, mode=mode, structure="edges", structure_image=square)
        assert torch.equal(plain.trace.prompt_embeds, edged.trace.prompt_embeds), mode
        assert torch.equal(plain.trace.pooled_prompt_embeds, edged.trace.pooled_prompt_embeds), mode


# -- mismatches say what to load -----------------------------------------------------------------------------


def test_an_sd1_controlnet_on_sdxl_and_an_sdxl_one_on_sd1_are_one_sentence(sdxl, tiny_pipe):
    runners = structure.StructureRunners(sdxl.sd, None)
    with pytest.raises(structure.ControlNetMismatchError, match=(
            r"^The ControlNet 'tiny' was made for SD 1\.x \(cross-attention 32 wide\), and this model is SDXL "
            r"\(cross-attention 64 wide\): load a ControlNet made for it, e\.g\. "
            r"pipe\.load_controlnet\('diffusers/controlnet-canny-sdxl-1\.0'\)\.$")):
        runners.controlnet("tiny")
    runners = structure.StructureRunners(tiny_pipe.sd, None)
    with pytest.raises(structure.ControlNetMismatchError, match=r"made for SDXL .* this model is SD 1\.x .*"
                                                                r"'lllyasviel/control_v11f1p_sd15_depth'"):
        runners.controlnet("tiny-sdxl-depth")
    assert issubclass(structure.ControlNetMismatchError, SettingsError)


def test_an_sdxl_model_without_controlnet_names_the_sdxl_one():
    fake_sdxl = types.SimpleNamespace(components={"text_encoder_2": None})  # all is_sdxl looks at
    runners = structure.StructureRunners(fake_sdxl, None)
    with pytest.raises(SettingsError, match=r"\(sdxl, tiny-sdxl\) or call "
                                            r"pipe\.load_controlnet\('diffusers/controlnet-depth-sdxl-1\.0'\)"):
        runners.controlnet(kind="depth")


def test_ip_adapter_with_edges_on_sdxl_equals_bare_controlnet_pipeline(image):
    """The SDXL IP-Adapter presets have SDXL ControlNets too: the adapter's image tokens, the prompt's tokens and
    pooled slot and the edge map reach diffusers' SDXL ControlNet pipeline as a hand-written call gives them."""
    from diffusers import StableDiffusionXLControlNetPipeline

    assert PRESETS["sdxl-ip-adapter"].controlnet == "sdxl" and PRESETS["tiny-sdxl-ip-adapter"].controlnet == "tiny-sdxl"
    pipe = ImagePromptPipeline.from_preset("tiny-sdxl-ip-adapter")
    result = pipe.generate(image, prompt="a cat", steps=2, seed=1, structure="edges",
                           structure_image=shape_image("square"))
    assert result.settings.mode == "ip_adapter" and result.recipe["model"]["controlnet"] == "tiny-sdxl-canny"
    bare = StableDiffusionXLControlNetPipeline(**pipe.sd.components, controlnet=pipe.load_controlnet())
    bare.set_progress_bar_config(disable=True)
    expected = bare(image=traced_map(result), ip_adapter_image_embeds=[result.trace.extras["ip_adapter_image_embeds"]],
                    **trace_kwargs(result)).images
    assert_pixels_within(result.images, expected)
