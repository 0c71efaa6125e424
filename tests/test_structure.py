"""Keeping the input's structure: Canny edges through a ControlNet, img2img from the noised input.

Everything runs on the tiny twins (the tiny SD and a tiny ControlNet made from its UNet), at 64 px
with a few steps. Structure images are drawn shapes: their edges survive resizing, unlike the
fine texture of ``make_image``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import WAIT, optional_module, pixels
from PIL import Image

from imageprompt_widgets import GenerationSettings, SettingsError
from imageprompt_widgets.loading.cache import ModelLoadError
from imageprompt_widgets.loading.offline import shape_image
from imageprompt_widgets.structure import plan as structure

cv2 = optional_module("cv2")

SIZE = 64




def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# ---------------------------------------------------------------------------------------------
# Edge maps, sizes, settings: pure functions


def test_edge_map_is_opencv_canny_of_the_resized_grayscale(image):
    size = (48, 40)
    edges = structure.edge_map(image, 30, 90, size)
    gray = np.asarray(image.resize(size, Image.Resampling.LANCZOS).convert("L"))
    expected = cv2.Canny(gray, 30, 90)
    assert edges.mode == "L" and edges.size == size
    np.testing.assert_array_equal(np.asarray(edges), expected)
    assert expected.any()  # the comparison is not between two empty maps
    # the thresholds reach Canny: higher ones keep fewer edge pixels
    fewer = np.asarray(structure.edge_map(image, 60, 120, size))
    assert 0 < (fewer > 0).sum() < (expected > 0).sum()


def test_control_tensor_is_the_edge_map_in_three_equal_channels():
    edges = structure.edge_map(shape_image("square"), 100, 200)
    tensor = structure.control_tensor(edges)
    assert tensor.shape == (1, 3, SIZE, SIZE) and tensor.dtype == torch.float32
    expected = torch.from_numpy(np.asarray(edges) / 255.0).float()
    for channel in range(3):
        assert torch.equal(tensor[0, channel], expected)


def test_fit_size_keeps_the_aspect_ratio_in_multiples_of_8():
    assert structure.fit_size((1200, 800), native=512) == (512, 344)  # 341.3 -> 344
    assert structure.fit_size((800, 1200), native=512) == (344, 512)
    assert structure.fit_size((1200, 800), width=768, native=512) == (768, 512)
    assert structure.fit_size((1200, 800), height=256, native=512) == (384, 256)
    assert structure.fit_size((1200, 800), height=256, width=320) == (320, 256)  # both given: those
    assert structure.fit_size((96, 80), native=64) == (64, 56)


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(structure.MissingExtraError) as caught:
        structure.edge_map(shape_image("square"))
    assert isinstance(caught.value, ValueError)
    assert "pip install 'imageprompt_widgets[edges]'" in str(caught.value)
    assert "opencv-python-headless" in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"structure": "img2img", "strength": 0.05, "steps": 10},
         ("strength=0.05 with steps=10 leaves no denoising step (img2img runs int(steps * strength) of them): "
          "raise strength to at least 0.1 or add steps.")),
        ({"canny_low": 150, "canny_high": 100}, "canny_low=150 must not be above canny_high=100."),
        ({"control_start": 0.6, "control_end": 0.6}, "control_start=0.6 must be less than control_end=0.6."),
        ({"structure": "sketch"}, "structure='sketch' is not one of none, edges, depth, img2img."),
    ],
)
def test_bad_structure_settings_say_what_to_change(changes, message):
    with pytest.raises(SettingsError) as caught:
        GenerationSettings(**changes)
    assert str(caught.value) == message


def test_structure_settings_have_specs_in_the_structure_section():
    from imageprompt_widgets.settings import setting_specs

    names = [spec.name for spec in setting_specs() if spec.section == "structure"]
    assert names == ["structure", "canny_low", "canny_high", "control_scale", "control_start", "control_end",
                     "strength", "control_units"]


def test_a_structure_image_without_a_structure_is_refused(tiny_pipe, image):
    with pytest.raises(SettingsError, match="structure_image was given but structure='none'"):
        tiny_pipe.generate(image, steps=1, structure_image=shape_image("square"))


def test_a_model_without_controlnet_says_how_to_get_one():
    runners = structure.StructureRunners(sd=None, controlnet_family=None)
    with pytest.raises(SettingsError, match=r"pipe.load_controlnet\('lllyasviel/sd-controlnet-canny'\)"):
        runners.controlnet()


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_offline_missing_controlnet_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="lllyasviel/sd-controlnet-canny"):
        structure.load_controlnet("lllyasviel/sd-controlnet-canny", torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------
# ControlNet (edges)


def test_control_image_reaches_the_controlnet_and_steers_the_output(tiny_pipe, image):
    controlnet = tiny_pipe.load_controlnet()
    seen: list[torch.Tensor] = []
    handle = controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()), with_kwargs=True
    )
    try:
        square = tiny_pipe.generate(image, steps=2, seed=0, structure="edges", structure_image=shape_image("square"))
    finally:
        handle.remove()
    circle = tiny_pipe.generate(image, steps=2, seed=0, structure="edges", structure_image=shape_image("circle"))

    control = square.trace.extras["control_image"]
    expected = structure.control_tensor(structure.edge_map(shape_image("square"), 100, 200, (SIZE, SIZE)))
    assert torch.equal(control, expected)
    assert len(seen) == square.recipe["settings"]["steps"] + 1  # PNDM runs one more step than asked
    for cond in seen:  # [uncond, cond] halves of classifier-free guidance both get the edge map
        assert cond.shape == (2, 3, SIZE, SIZE)
        assert torch.equal(cond[0:1], control) and torch.equal(cond[1:2], control)
    # a different edge map gives a visibly different picture: the residuals reach the UNet
    assert mean_abs_diff(pixels(square), pixels(circle)) > 3.0
    assert square.recipe["model"]["controlnet"] == "tiny"
    assert square.recipe["settings"]["structure"] == "edges" and len(square.recipe["structure_input"]) == 16


def test_trace_with_structure_survives_save_and_load(tiny_pipe, image, tmp_path):
    from imageprompt_widgets import Trace

    result = tiny_pipe.generate(image, steps=1, seed=0, structure="edges", structure_image=shape_image("square"))
    loaded, recipe = Trace.load(result.trace.save(tmp_path / "run.safetensors", recipe=result.recipe))
    assert torch.equal(loaded.extras["control_image"], result.trace.extras["control_image"])
    assert torch.equal(loaded.extras["start_latents"], result.trace.extras["start_latents"])
    assert recipe == result.recipe


def test_control_scale_zero_is_pixel_identical_to_no_controlnet(tiny_pipe, image):
    """Zero scale multiplies every residual by 0.0; adding exact zeros leaves the UNet's features unchanged,
    and latents, timesteps and scheduler are those of the plain run, so the pixels are identical (not just close).
    """
    square = shape_image("square")
    off = tiny_pipe.generate(image, steps=2, seed=3, structure="edges", structure_image=square, control_scale=0.0)
    plain = tiny_pipe.generate(image, steps=2, seed=3, height=SIZE, width=SIZE)
    on = tiny_pipe.generate(image, steps=2, seed=3, structure="edges", structure_image=square)
    assert np.array_equal(pixels(off), pixels(plain))
    assert mean_abs_diff(pixels(on), pixels(plain)) > 3.0
    assert torch.equal(off.trace.extras["start_latents"], on.trace.extras["start_latents"])


def test_edges_run_equals_bare_diffusers_controlnet_pipeline(tiny_pipe, image):
    from diffusers import StableDiffusionControlNetPipeline

    square = shape_image("square")
    result = tiny_pipe.generate(
        image, steps=3, seed=5, structure="edges", structure_image=square, control_scale=0.8,
        control_start=0.2, control_end=0.9, canny_low=50, canny_high=150,
    )
    bare = tiny_pipe.structure_pipeline("edges")
    assert isinstance(bare, StableDiffusionControlNetPipeline)
    assert bare.unet is tiny_pipe.sd.unet and bare.vae is tiny_pipe.sd.vae  # shared, not a second SD
    edges = Image.fromarray(cv2.Canny(np.asarray(square.convert("L")), 50, 150)).convert("RGB")
    expected = bare(
        prompt_embeds=result.trace.prompt_embeds,
        negative_prompt_embeds=result.trace.negative_prompt_embeds,
        image=edges,
        num_inference_steps=3,
        guidance_scale=7.5,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=0.2,
        control_guidance_end=0.9,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert np.array_equal(np.asarray(expected), np.asarray(result.images[0]))


def test_padding_mask_reaches_the_controlnet_cross_attention(tiny_pipe):
    """With a padded prompt (single/tokens modes) the ControlNet must ignore the zero padding like the UNet."""
    controlnet = tiny_pipe.load_controlnet()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    short = torch.randn(1, 3, 32, generator=generator)
    padded = torch.cat([short, torch.zeros(1, 74, 32)], dim=1)
    mask = torch.cat([torch.ones(1, 3), torch.zeros(1, 74)], dim=1)
    cond = structure.control_tensor(structure.edge_map(shape_image("square", 32), 100, 200))

    def residuals(context):
        with torch.no_grad():
            down, mid = controlnet(sample, 500, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        return torch.cat([r.flatten() for r in (*down, mid)])

    unpadded = residuals(short)
    with structure.masked_cross_attention(controlnet, mask):
        masked = residuals(padded)
    torch.testing.assert_close(masked, unpadded, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(residuals(padded), unpadded, atol=1e-3)  # unmasked padding does change it


# ---------------------------------------------------------------------------------------------
# img2img


def _vae_posterior_sample(pipe, picture, seed):
    """What img2img draws first from the seeded generator: the VAE posterior sample of the picture, scaled."""
    sd = pipe.sd
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        pixels_in = sd.image_processor.preprocess(picture)
        latents = sd.vae.encode(pixels_in).latent_dist.sample(generator) * sd.vae.config.scaling_factor
    return latents, generator


def test_img2img_starts_from_the_noised_input(tiny_pipe, image):
    square = shape_image("square")
    result = tiny_pipe.generate(image, steps=10, seed=4, structure="img2img", strength=0.5, structure_image=square)
    # int(10 * 0.5) = 5 steps: the second half of the 10-step schedule (PNDM runs one step twice)
    assert result.trace.timesteps == [501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    z0, generator = _vae_posterior_sample(tiny_pipe, square, 4)
    noise = torch.randn(z0.shape, generator=generator)
    alpha = tiny_pipe.sd.scheduler.alphas_cumprod[501]
    expected = alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise
    torch.testing.assert_close(result.trace.extras["start_latents"], expected, atol=1e-5, rtol=1e-5)
    assert "control_image" not in result.trace.extras


def test_img2img_strength_near_zero_keeps_the_input_and_one_ignores_it(tiny_pipe, image):
    """The tiny VAE is random: its round trip of the input is no copy of it (about 130 levels off), and its
    posterior is wide (two decodes of one input differ by about 40 levels). So the bound is that spread:
    with strength near 0 the output stays closer to the decoded start point than the VAE's own sampling
    noise moves it; with strength 1 it does not, and the structure image barely matters.
    """
    square, circle = shape_image("square"), shape_image("circle")
    z0, _ = _vae_posterior_sample(tiny_pipe, square, 0)
    sd = tiny_pipe.sd
    with torch.no_grad():
        mode = sd.vae.encode(sd.image_processor.preprocess(square)).latent_dist.mode()
        decoded = [sd.image_processor.postprocess(sd.vae.decode(z).sample, output_type="np")[0] * 255
                   for z in (z0 / sd.vae.config.scaling_factor, mode)]
    round_trip, round_trip_of_mean = decoded
    vae_spread = mean_abs_diff(round_trip, round_trip_of_mean)

    def run(strength, picture, steps):
        return pixels(tiny_pipe.generate(image, steps=steps, seed=0, structure="img2img", strength=strength,
                                         structure_image=picture, guidance_scale=1.0))

    near_zero = mean_abs_diff(run(0.02, square, 50), round_trip)  # int(50 * 0.02) = 1 step, from t=21
    full_square, full_circle = run(1.0, square, 4), run(1.0, circle, 4)
    full = mean_abs_diff(full_square, round_trip)
    assert near_zero < 0.85 * vae_spread, (near_zero, vae_spread)
    assert full > near_zero + 10, (full, near_zero)
    # strength 1 still keeps sqrt(alphas_cumprod[t0]) of the input (diffusers noises the input to the first
    # timestep, not pure noise), so it is not text-to-image; but the input's share is small:
    alpha = float(tiny_pipe.sd.scheduler.alphas_cumprod[751])  # first timestep of 4 PNDM steps
    assert 0.1 < alpha**0.5 < 0.25
    assert mean_abs_diff(full_square, full_circle) < 2.0
    text_to_image = pixels(tiny_pipe.generate(image, steps=4, seed=0, height=SIZE, width=SIZE, guidance_scale=1.0))
    assert not np.array_equal(full_square, text_to_image)


# ---------------------------------------------------------------------------------------------
# Every method, traces, previews, cancel


@pytest.mark.parametrize("structure_name", ["edges", "img2img"])
@pytest.mark.parametrize("mode", ["repeat", "single", "tokens", "blend"])
@pytest.mark.slow
def test_structure_works_with_every_method_and_keeps_its_conditioning(tiny_pipe, image, mode, structure_name):
    from threading import Event

    extra = {"prompt": "a red house"} if mode == "blend" else {}
    stopped = Event()
    stopped.set()  # cancelled before the first step: the trace of the plain run's conditioning, no denoising
    plain = tiny_pipe.generate(image, steps=2, seed=1, mode=mode, cancel=stopped, **extra)
    kept = tiny_pipe.generate(image, steps=2, seed=1, mode=mode, structure=structure_name,
                              structure_image=shape_image("circle"), **extra)
    assert torch.equal(kept.trace.prompt_embeds, plain.trace.prompt_embeds)
    assert torch.equal(kept.trace.negative_prompt_embeds, plain.trace.negative_prompt_embeds)
    assert kept.images[0].size == (SIZE, SIZE)
    assert kept.trace.extras["start_latents"].shape == (1, 4, SIZE // 2, SIZE // 2)
    assert ("control_image" in kept.trace.extras) == (structure_name == "edges")


def test_previews_and_cancel_work_with_structure(tiny_pipe, image):
    from threading import Event

    cancel = Event()
    seen = []

    def on_step(info):
        seen.append((info.step, info.total, tuple(info.x0().shape)))
        if info.step == 2:
            cancel.set()

    result = tiny_pipe.generate(image, steps=10, seed=0, structure="img2img", strength=0.6, on_step=on_step,
                                cancel=cancel, structure_image=shape_image("square"))
    assert result.cancelled and result.images == []
    assert seen == [(1, 7, (1, 4, 32, 32)), (2, 7, (1, 4, 32, 32))]  # int(10 * 0.6) = 6 steps, PNDM runs 7
    result = tiny_pipe.generate(image, steps=2, seed=0, structure="edges", on_step=lambda info: seen.append(info.x0()))
    assert not result.cancelled and torch.isfinite(seen[-1]).all()


def test_one_call_generate_and_cli_take_the_structure_options(tmp_path, image):
    import imageprompt_widgets
    from imageprompt_widgets.cli import main

    result = imageprompt_widgets.generate(image, model="tiny", steps=2, structure="img2img", strength=0.5,
                                          structure_image=shape_image("square"))
    assert result.images[0].size == (SIZE, SIZE)
    image.save(tmp_path / "in.png")
    shape_image("circle").save(tmp_path / "shape.png")
    code = main(["generate", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--model", "tiny",
                 "--steps", "2", "--structure", "edges", "--canny-low", "50", "--control-scale", "0.5",
                 "--structure-image", str(tmp_path / "shape.png")])
    assert code == 0
    written = list((tmp_path / "out").glob("*.png"))
    assert len(written) == 1
    from imageprompt_widgets.engine.results import recipe_from_png

    settings = recipe_from_png(written[0])["settings"]
    assert (settings["structure"], settings["canny_low"], settings["control_scale"]) == ("edges", 50, 0.5)


# ---------------------------------------------------------------------------------------------
# The widget's Structure section


@pytest.mark.slow
def test_widget_structure_section_previews_the_edge_map_and_runs_with_it(tiny_pipe, image):
    import io

    from imageprompt_widgets import ImagePromptWidget
    from imageprompt_widgets.engine.runners import InlineRunner

    def shown(tile) -> np.ndarray:
        assert tile.filled and tile.placeholder.layout.display == "none"
        return np.asarray(Image.open(io.BytesIO(tile.image.value)))

    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), steps=2)
    try:
        box = widget.controls.groups["structure"]  # the panel's Structure group
        labels = [getattr(child, "description", None) for child in box.children]
        assert labels[:7] == ["keep layout", "edges low", "edges high", "layout strength", "layout from",
                              "layout until", "how much changes"]  # the settings' plain labels, in the spec's order
        assert widget.structure_upload in widget.structure_extras.children and widget.structure_extras in box.children
        assert box.children.index(widget.structure_extras) < box.children.index(widget.controls["control_units"])
        assert box.children[-1] is widget.maps  # the maps close the section
        widget.set_images([image])
        assert widget.maps.layout.display == "none"  # structure="none": nothing to preview

        widget.set_structure_image(shape_image("square"))
        widget.controls["structure"].value = "edges"  # as the browser sets it
        (tile,) = widget.maps.tiles
        expected = structure.edge_map(shape_image("square"), 100, 200, (SIZE, SIZE))  # tiny: native 64 px
        assert widget.maps.layout.display is None
        np.testing.assert_array_equal(shown(tile), np.asarray(expected))
        assert "ControlNet 1 · Canny edges" in tile.caption.value
        widget.controls["canny_low"].value = 10  # the thresholds update it
        widget.controls["canny_high"].value = 20
        lower = shown(tile)
        np.testing.assert_array_equal(lower, np.asarray(structure.edge_map(shape_image("square"), 10, 20, (SIZE, SIZE))))

        result = widget.generate().result(WAIT)
        assert result.recipe["settings"]["structure"] == "edges"
        assert len(result.recipe["structure_input"]) == 16  # the structure image, not the input, was used
        assert "in this run" in widget.maps.note.value
        np.testing.assert_array_equal(shown(widget.maps.tiles[0]), lower)  # the run's own edge map, the same pixels
    finally:
        widget.close()
