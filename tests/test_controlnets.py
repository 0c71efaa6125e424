"""ControlNets beyond canny: depth maps, each ControlNet with its own preprocessor, several units at once.

Everything runs on the tiny twins (the tiny SD, two tiny ControlNets made from its UNet with different
seeds, a tiny random Depth Anything) at 64 px with a few steps, and is compared with the libraries' own
calls: transformers' depth-estimation pipeline for the maps, diffusers' ControlNet pipeline (one
ControlNet, or a list: its MultiControlNetModel) for the pixels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import optional_module
from PIL import Image

from imageprompt_widgets import ControlUnit, GenerationSettings, SettingsError
from imageprompt_widgets.loading.offline import shape_image
from imageprompt_widgets.settings import (
    CONTROLNET_STRUCTURES,
    STRUCTURE_SETTINGS,
    STRUCTURES,
    UNIT_SETTINGS,
    setting_specs,
    unit_specs,
)
from imageprompt_widgets.structure import plan as structure
from imageprompt_widgets.structure.controlnets import CONTROL_KINDS, controlnet_for, kind_of_controlnet

cv2 = optional_module("cv2")

SIZE = 64




def canny_rgb(picture: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    return Image.fromarray(cv2.Canny(np.asarray(picture.convert("L")), low, high)).convert("RGB")


def transformers_depth(tiny_pipe, picture: Image.Image) -> Image.Image:
    """The library's own call: transformers' depth-estimation pipeline on the loaded estimator."""
    from transformers import pipeline

    estimator = tiny_pipe._structure.estimator("depth")
    return pipeline("depth-estimation", model=estimator.model, image_processor=estimator.processor)(picture)["depth"]


def bare_call(runner, result, **kwargs):
    return runner(
        prompt_embeds=result.trace.prompt_embeds, negative_prompt_embeds=result.trace.negative_prompt_embeds,
        num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(5), **kwargs,
    ).images[0]


# ---------------------------------------------------------------------------------------------
# The registry and the settings: pure


def test_each_kind_names_its_map_controlnet_twin_and_the_settings_it_reads():
    assert tuple(CONTROL_KINDS) == CONTROLNET_STRUCTURES and set(CONTROLNET_STRUCTURES) < set(STRUCTURES)
    unit_fields = {spec.name for spec in unit_specs()}
    setting_names = {spec.name for spec in setting_specs()}
    for name, kind in CONTROL_KINDS.items():
        assert kind.reads == UNIT_SETTINGS[name] and set(kind.reads) <= unit_fields
        assert set(STRUCTURE_SETTINGS[name]) <= setting_names
        assert controlnet_for(name, "sd15") == kind.controlnet and controlnet_for(name, "tiny") == kind.twin
    assert CONTROL_KINDS["edges"].controlnet == "lllyasviel/sd-controlnet-canny"
    assert CONTROL_KINDS["depth"].controlnet == "lllyasviel/control_v11f1p_sd15_depth"
    assert CONTROL_KINDS["depth"].estimator == "depth-anything/Depth-Anything-V2-Small-hf"
    assert "canny_low" in UNIT_SETTINGS["edges"] and "canny_low" not in UNIT_SETTINGS["depth"]
    # a preset from before kinds existed names its canny ControlNet: it serves edges only
    assert controlnet_for("edges", "me/my-canny") == "me/my-canny" and controlnet_for("depth", "me/my-canny") is None


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("lllyasviel/sd-controlnet-canny", "edges"),
        ("lllyasviel/control_v11p_sd15_canny", "edges"),
        ("lllyasviel/control_v11f1p_sd15_depth", "depth"),
        ("/models/controlnet-depth/", "depth"),
        ("tiny", "edges"),
        ("tiny-depth", "depth"),
        ("lllyasviel/control_v11p_sd15_openpose", None),
        ("me/canny-and-depth", None),
    ],
)
def test_a_controlnets_name_tells_which_map_it_reads(model, kind):
    assert kind_of_controlnet(model) == kind


def test_the_first_units_settings_copy_the_unit_fields_ranges_and_defaults():
    units = {spec.name: spec for spec in unit_specs()}
    flat = {spec.name: spec for spec in setting_specs()}
    for name, unit_name in [("control_scale", "scale"), ("control_start", "start"), ("control_end", "end"),
                            ("canny_low", "canny_low"), ("canny_high", "canny_high")]:
        a, b = flat[name], units[unit_name]
        assert (a.kind, a.default, a.min, a.max, a.step) == (b.kind, b.default, b.min, b.max, b.step)
        assert a.section == "structure"


def test_units_are_the_structures_own_then_control_units_and_round_trip():
    settings = GenerationSettings(structure="depth", control_scale=0.7, control_units=[
        {"kind": "edges", "scale": 0.5, "canny_low": 40}, ControlUnit(kind="depth", end=0.5)])
    first, second, third = settings.units()
    assert first == ControlUnit(kind="depth", scale=0.7)
    assert second == ControlUnit(kind="edges", scale=0.5, canny_low=40) and third == ControlUnit(kind="depth", end=0.5)
    assert GenerationSettings.from_kwargs(**settings.to_dict()) == settings
    numpy_unit = GenerationSettings(structure="edges", control_units=[{"kind": "depth", "scale": np.float64(0.5)}])
    assert numpy_unit.units()[1] == ControlUnit(kind="depth", scale=0.5)
    assert GenerationSettings(structure="img2img").units() == () == GenerationSettings().units()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"structure": "edges", "control_units": [{"kind": "pose"}]},
         "control_units[0]: kind='pose' is not one of edges, depth."),
        ({"structure": "edges", "control_units": [{"kind": "depth"}, {"scale": 2.5}]},
         "control_units[1]: scale=2.5 is outside its range 0 to 2."),
        ({"structure": "depth", "control_units": [{"start": 0.7, "end": 0.3}]},
         "control_units[0]: start=0.7 must be less than end=0.3."),
        ({"structure": "depth", "control_units": [{"kind": "edges", "canny_low": 90, "canny_high": 80}]},
         "control_units[0]: canny_low=90 must not be above canny_high=80."),
        ({"structure": "depth", "control_units": [{"weight": 1}]},
         "control_units[0]: Unknown unit setting weight: a unit has kind, scale, start, end, canny_low, canny_high."),
        ({"structure": "img2img", "control_units": [{"kind": "depth"}]},
         ("control_units add ControlNets beside the structure's own: set structure='edges' or 'depth' (the first "
         "unit), not 'img2img'.")),
        ({"structure": "edges", "control_units": "[{'kind': 'depth'}]"},
         ('control_units is not JSON (Expecting property name enclosed in double quotes at character 2): write it '
         'like [{"kind": "depth", "scale": 0.5}].')),
        ({"structure": "edges", "control_units": [{"kind": "depth"}] * 4},
         "A run takes at most 4 ControlNets; control_units adds 4 to the structure's own."),
    ],
)
def test_unit_settings_that_do_not_fit_say_which_unit_and_why(changes, message):
    with pytest.raises(SettingsError) as caught:
        GenerationSettings(**changes)
    assert str(caught.value) == message


# ---------------------------------------------------------------------------------------------
# Maps: each preprocessor equals the library's own call


def test_depth_map_equals_transformers_depth_estimation_pipeline(tiny_pipe):
    picture = shape_image("circle", 96).crop((0, 0, 96, 72))  # not square: the map keeps the picture's size
    unit = ControlUnit(kind="depth")
    estimator = tiny_pipe._structure.estimator("depth")
    for size in (None, (48, 40)):
        expected = transformers_depth(tiny_pipe, structure.resized(picture, size))
        depth = structure.control_map(unit, picture, size, estimator)
        assert depth.mode == "L" and depth.size == (size or picture.size)
        np.testing.assert_array_equal(np.asarray(depth), np.asarray(expected))
    assert np.asarray(depth).min() == 0 and np.asarray(depth).max() == 255  # stretched, as the pipeline does


def test_edges_unit_map_is_opencv_canny_and_never_needs_the_estimator():
    picture = shape_image("square", 96)
    unit = ControlUnit(kind="edges", canny_low=30, canny_high=90)
    edges = structure.control_map(unit, picture, (48, 40))
    expected = cv2.Canny(np.asarray(picture.resize((48, 40), Image.Resampling.LANCZOS).convert("L")), 30, 90)
    np.testing.assert_array_equal(np.asarray(edges), expected)
    with pytest.raises(SettingsError, match="A depth map needs its estimator"):
        structure.control_map(ControlUnit(kind="depth"), picture)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_offline_missing_depth_estimator_is_named(monkeypatch):
    from imageprompt_widgets.loading.cache import ModelLoadError
    from imageprompt_widgets.structure.depth import load_depth_estimator

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="depth-anything/Depth-Anything-V2-Small-hf"):
        load_depth_estimator("depth-anything/Depth-Anything-V2-Small-hf", torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------
# Runs against bare diffusers


def test_depth_run_feeds_the_depth_controlnet_its_depth_map_and_equals_bare_diffusers(tiny_pipe, image):
    from diffusers import StableDiffusionControlNetPipeline

    square = shape_image("square")
    depth_net = tiny_pipe.load_controlnet(kind="depth")
    assert depth_net is not tiny_pipe.load_controlnet()  # the canny twin is another model
    seen: list[torch.Tensor] = []
    handle = depth_net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"][:1].clone()), with_kwargs=True)
    try:
        result = tiny_pipe.generate(image, steps=3, seed=5, structure="depth", structure_image=square,
                                    control_scale=0.8, control_start=0.1)
    finally:
        handle.remove()
    depth = transformers_depth(tiny_pipe, square)
    assert torch.equal(result.trace.extras["control_image"], structure.control_tensor(depth))
    assert seen and all(torch.equal(cond, structure.control_tensor(depth)) for cond in seen)
    assert not np.array_equal(np.asarray(depth), np.asarray(canny_rgb(square).convert("L")))
    assert (result.recipe["model"]["controlnet"], result.recipe["model"]["depth_estimator"]) == ("tiny-depth", "tiny")

    bare = tiny_pipe.structure_pipeline("depth")
    assert isinstance(bare, StableDiffusionControlNetPipeline) and bare.controlnet is depth_net
    assert bare.unet is tiny_pipe.sd.unet  # shared, not a second SD
    expected = bare_call(bare, result, image=depth.convert("RGB"), controlnet_conditioning_scale=0.8,
                         control_guidance_start=0.1)
    assert np.array_equal(np.asarray(expected), np.asarray(result.images[0]))


@pytest.mark.slow
def test_two_units_each_with_its_picture_scale_and_window_equal_bare_multicontrolnet(tiny_pipe, image):
    from diffusers import MultiControlNetModel

    square, circle = shape_image("square"), shape_image("circle")
    result = tiny_pipe.generate(
        image, steps=3, seed=5, structure="depth", control_scale=0.9, control_end=0.8, structure_image=[square, circle],
        control_units=[{"kind": "edges", "scale": 0.6, "start": 0.2, "canny_low": 50, "canny_high": 150}],
    )
    runner = tiny_pipe.structure_pipeline(result.settings)
    assert isinstance(runner.controlnet, MultiControlNetModel) and len(runner.controlnet.nets) == 2
    depth, edges = transformers_depth(tiny_pipe, square), canny_rgb(circle, 50, 150)
    expected = bare_call(runner, result, image=[depth.convert("RGB"), edges], controlnet_conditioning_scale=[0.9, 0.6],
                         control_guidance_start=[0.0, 0.2], control_guidance_end=[0.8, 1.0])
    assert np.array_equal(np.asarray(expected), np.asarray(result.images[0]))
    # every map is traced, in unit order
    assert torch.equal(result.trace.extras["control_image"], structure.control_tensor(depth))
    assert torch.equal(result.trace.extras["control_image_1"], structure.control_tensor(edges))
    assert result.recipe["model"]["controlnet"] == ["tiny-depth", "tiny"]
    assert len(result.recipe["structure_input"]) == 2
    # each unit matters: without the second one the picture changes
    alone = tiny_pipe.generate(image, steps=3, seed=5, structure="depth", control_scale=0.9, control_end=0.8,
                               structure_image=square)
    assert np.abs(np.asarray(alone.images[0], dtype=float) - np.asarray(result.images[0], dtype=float)).mean() > 1


def test_one_structure_image_serves_every_unit_and_other_counts_are_refused(tiny_pipe, image):
    square = shape_image("square")
    settings = GenerationSettings(steps=1, structure="edges", control_units=[{"kind": "edges", "canny_low": 10}])
    result = tiny_pipe.generate(image, settings, structure_image=square)
    assert torch.equal(result.trace.extras["control_image"], structure.control_tensor(
        structure.edge_map(square, 100, 200, (SIZE, SIZE))))
    assert torch.equal(result.trace.extras["control_image_1"], structure.control_tensor(
        structure.edge_map(square, 10, 200, (SIZE, SIZE))))
    with pytest.raises(SettingsError) as caught:
        tiny_pipe.generate(image, settings, structure_image=[square, square, square])
    assert str(caught.value) == ("3 structure images for 2 ControlNet units: give one for all, or one per unit (the "
                                 "structure's own first, then control_units).")
    with pytest.raises(SettingsError, match="structure='img2img' takes one structure_image, not 2."):
        tiny_pipe.generate(image, steps=2, structure="img2img", structure_image=[square, square])


def test_structure_maps_are_the_maps_a_run_feeds(tiny_pipe, image):
    """The panel's preview: the same maps, before any run, without the pipeline's lock."""
    square, circle = shape_image("square"), shape_image("circle")
    settings = GenerationSettings(steps=1, structure="edges", canny_low=20,
                                  control_units=[dataclasses.asdict(ControlUnit(kind="depth"))])
    maps = tiny_pipe.structure_maps(image, settings, structure_image=[square, circle])
    assert [(m.index, m.kind, m.size, m.controlnet, m.estimator) for m in maps] == [
        (0, "edges", (SIZE, SIZE), "tiny", None), (1, "depth", (SIZE, SIZE), "tiny-depth", "tiny")]
    result = tiny_pipe.generate(image, settings, structure_image=[square, circle])
    for m in maps:
        assert torch.equal(structure.control_tensor(m.image), result.trace.extras[structure.control_trace_name(m.index)])
    (first,) = tiny_pipe.structure_maps(image, structure="depth")  # keyword changes, the first input as picture
    assert first.kind == "depth" and first.size == (SIZE, 56)  # 96 x 80 input, longer side at 64 px
    assert tiny_pipe.structure_maps(image, structure="img2img") == []


def test_load_structure_loads_each_units_controlnet_and_estimator_before_a_run(tiny_pipe):
    from imageprompt_widgets import ImagePromptPipeline

    # a second pipeline over the same components: its ControlNets and estimator are not loaded yet
    pipe = ImagePromptPipeline(tiny_pipe.sd, tiny_pipe.image_encoder, tiny_pipe.image_processor, preset=tiny_pipe.preset)
    said: list[str] = []
    pipe.load_structure(GenerationSettings(structure="depth", control_units=[{"kind": "edges"}]), said.append)
    assert [message for message in said if message.startswith("Loading")] == [
        "Loading the ControlNet 'tiny-depth' onto cpu…", "Loading the depth estimator 'tiny' onto cpu…",
        "Loading the ControlNet 'tiny' onto cpu…"]
    said.clear()
    pipe.load_structure(GenerationSettings(structure="edges", control_units=[{"kind": "depth"}]), said.append)
    assert said == []  # each loads once


def test_load_controlnet_tells_the_kind_from_the_name_or_asks(tiny_pipe):
    assert tiny_pipe.load_controlnet("tiny-depth") is tiny_pipe.load_controlnet(kind="depth")
    with pytest.raises(SettingsError) as caught:
        tiny_pipe.load_controlnet("/models/my-controlnet")
    assert str(caught.value) == ("Which map does the ControlNet '/models/my-controlnet' read? Its name does not say: "
                                 "pass kind='edges' or 'depth'.")
    with pytest.raises(SettingsError, match="'pose' is not a ControlNet kind: use one of edges, depth."):
        tiny_pipe.load_controlnet("/models/my-controlnet", kind="pose")


def test_a_model_without_a_depth_controlnet_says_how_to_get_one():
    runners = structure.StructureRunners(sd=None, controlnet_family=None)
    with pytest.raises(SettingsError) as caught:
        runners.controlnet(kind="depth")
    assert str(caught.value) == (
        "structure='depth' needs a ControlNet trained on depth and this model has none: use a preset that has one "
        "(sd14, sd15, tiny) or call pipe.load_controlnet('lllyasviel/control_v11f1p_sd15_depth')."
    )


def test_faces_show_each_structures_own_controls():
    from imageprompt_widgets.methods import settings_read

    depth, edges = settings_read("repeat", "depth"), settings_read("repeat", "edges")
    assert {"control_scale", "control_start", "control_end", "control_units"} <= depth & edges
    assert "canny_low" in edges and "canny_low" not in depth and "strength" not in depth
    assert not {"control_units", "control_scale"} & settings_read("repeat", "img2img")
