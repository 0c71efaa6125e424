"""IP-Adapter Plus and Plus-Face, several adapters at once, per-block scale dictionaries.

Everything runs on the offline twins (the tiny IP-Adapter SD and encoder with random adapters) and is
compared with bare diffusers on the same components: ``pipe.sd(..., ip_adapter_image=...)`` encodes the
pictures itself, so equal pixels mean we fed the adapters exactly what diffusers feeds them.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from helpers import pixels
from PIL import Image

from imageprompt_widgets import GenerationSettings, ImagePromptPipeline, SettingsError
from imageprompt_widgets.loading.offline import sample_image as make_image
from imageprompt_widgets.methods.ip_adapter import adapter_processors
from imageprompt_widgets.presets import PRESETS, Preset

FAST = {"steps": 2, "seed": 7}
#: A plain adapter and a Plus adapter at once: each reads something different from the same encoder.
MIXED = Preset(
    name="tiny-mixed-adapters", sd_model="tiny-ip-adapter", clip_model="tiny-ip-adapter",
    ip_adapter=("tiny-ip-adapter", "tiny-ip-adapter-plus"), method="ip_adapter",
    defaults=(("mode", "ip_adapter"),), image_tokens_fit=False,
)


def bare(pipe, images, **kwargs):
    """diffusers' own StableDiffusionPipeline call on the pipeline's components, encoding ``images`` itself."""
    return pipe.sd("a cat", ip_adapter_image=images, num_inference_steps=2, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(7), **kwargs).images


@pytest.fixture(scope="module")
def plus_pipe():
    return ImagePromptPipeline.from_preset("tiny-ip-adapter-plus")


@pytest.fixture(scope="module")
def adapter_image_pipe():
    return ImagePromptPipeline.from_preset("tiny-ip-adapter")


@pytest.fixture(scope="module")
def mixed_pipe():
    return ImagePromptPipeline.from_preset(MIXED)


def test_plus_presets_and_their_twins_are_listed():
    for name in ("ip-adapter-plus", "ip-adapter-plus-face", "ip-adapter-plus-and-face"):
        preset, twin = PRESETS[name], PRESETS[f"tiny-{name}"]
        assert preset.clip_model == "h94/IP-Adapter" and preset.clip_subfolder == "models/image_encoder"
        assert len(preset.ip_adapters) == len(twin.ip_adapters) and twin.offline_builder
    assert PRESETS["ip-adapter-plus"].ip_adapters == ("h94/IP-Adapter:models:ip-adapter-plus_sd15.safetensors",)
    assert PRESETS["ip-adapter-plus-face"].ip_adapters == (
        "h94/IP-Adapter:models:ip-adapter-plus-face_sd15.safetensors",)


def test_plus_twin_is_written_in_ip_adapters_own_layout_and_loads_back_unchanged(plus_pipe):
    """The twin's resampler goes through diffusers' checkpoint converter exactly like h94's files do."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from imageprompt_widgets.loading.offline import resampler_to_original_keys

    torch.manual_seed(0)
    resampler = IPAdapterPlusImageProjection(embed_dims=32, output_dims=32, hidden_dims=64, heads=1, num_queries=16)
    original = resampler_to_original_keys(resampler.state_dict())
    assert "layers.0.0.to_kv.weight" in original and "layers.3.1.3.weight" in original
    converted = plus_pipe.sd.unet._convert_ip_adapter_image_proj_to_diffusers(original)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in resampler.state_dict().items())
    (projection,) = plus_pipe.parts["ip_adapter"].projections
    assert isinstance(projection, IPAdapterPlusImageProjection) and projection.latents.shape == (1, 16, 64)


@pytest.mark.parametrize("preset", ["tiny-ip-adapter-plus", "tiny-ip-adapter-plus-face"])
@pytest.mark.slow
def test_plus_adapters_equal_bare_diffusers(preset, image):
    pipe = ImagePromptPipeline.from_preset(preset)
    res = pipe.generate(image, prompt="a cat", **FAST)
    assert np.array_equal(pixels(res.images), pixels(bare(pipe, image)))
    without = pipe.generate(image, prompt="a cat", scale=0.0, **FAST)
    assert np.abs(pixels(without.images) - pixels(res.images)).mean() > 2  # the adapter reaches the UNet


def test_plus_reads_the_penultimate_hidden_states_and_an_all_zero_input_as_negative(plus_pipe, image):
    encoder, processor = plus_pipe.image_encoder, plus_pipe.image_processor
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = encoder(pixel_values, output_hidden_states=True).hidden_states
        zeros = encoder(torch.zeros_like(pixel_values), output_hidden_states=True).hidden_states[-2]
    res = plus_pipe.generate(image, prompt="a cat", **FAST)
    fed = res.trace.extras["ip_adapter_image_embeds"]
    assert fed.shape == (2, 1, 65, 32)  # [negative + positive, images, CLS + 8x8 patches, width]
    assert torch.equal(fed[1, 0], states[-2][0]) and not torch.equal(fed[1, 0], states[-1][0])
    assert torch.equal(fed[0, 0], zeros[0])  # diffusers: encode_image on zeros_like(pixel_values)
    assert torch.equal(plus_pipe.encode_image(image).hidden_states, states[-1])  # encode_image is unchanged


def test_plus_concat_keeps_each_pictures_tokens_and_needs_pictures(plus_pipe, image, other_image):
    from imageprompt_widgets.encoding import ImageEmbedding

    res = plus_pipe.generate([image, other_image], combine="concat", weights=[1.0, 0.5], prompt="a cat", **FAST)
    fed = res.trace.extras["ip_adapter_image_embeds"]
    states = plus_pipe._encode_loaded([image, other_image], ["a", "b"], "center_crop", hidden=True)
    assert fed.shape == (2, 2, 65, 32)
    torch.testing.assert_close(fed[1], states.penultimate_hidden_states * torch.tensor([1.0, 0.5])[:, None, None])
    assert torch.equal(fed[0, 0], fed[0, 1])  # the all-zero input's states for each
    embeds = ImageEmbedding.from_embeds(torch.randn(1, 48))
    with pytest.raises(SettingsError, match="IP-Adapter Plus of 'tiny-ip-adapter-plus' reads the image encoder's "
                                            "hidden states: pass pictures"):
        plus_pipe.generate(embeds, **FAST)


def test_plus_has_the_same_window_and_block_controls(plus_pipe, image):
    unet = plus_pipe.sd.unet
    names = {id(p): n for n, p in unet.attn_processors.items()}
    calls: list[dict[str, float]] = []
    handle = unet.register_forward_pre_hook(
        lambda module, args: calls.append({names[id(p)]: p.scale[0] for p in adapter_processors(unet)}))
    try:
        plus_pipe.generate(image, scale=0.6, adapter_blocks="style", adapter_start=0.5, steps=4, seed=0)
    finally:
        handle.remove()
    style = {n for n in calls[-1] if n.startswith("up_blocks.1.")}
    assert {n for n, s in calls[-1].items() if s} == style and {calls[-1][n] for n in style} == {0.6}
    assert set(calls[0].values()) == {0.0}  # before the window
    assert all(p.scale == [1.0] for p in adapter_processors(unet))  # restored after the run


def test_two_adapters_each_with_its_images_and_scale_equal_bare_diffusers(mixed_pipe, image, other_image):
    handle = mixed_pipe.parts["ip_adapter"]
    assert len(handle) == 2 and handle.reads_hidden_states == (False, True)
    res = mixed_pipe.generate(image, adapter_images=[[image], [other_image]], adapter_scales=[0.8, 0.3],
                              prompt="a cat", **FAST)
    processors = adapter_processors(mixed_pipe.sd.unet)
    assert all(p.scale == [1.0, 1.0] for p in processors)  # restored after the run
    mixed_pipe.sd.set_ip_adapter_scale([0.8, 0.3])
    try:
        expected = bare(mixed_pipe, [image, other_image])
    finally:
        mixed_pipe.sd.set_ip_adapter_scale([1.0, 1.0])
    assert np.array_equal(pixels(res.images), pixels(expected))
    assert res.trace.extras["ip_adapter_image_embeds"].shape == (2, 1, 48)  # plain: the projected embedding
    assert res.trace.extras["ip_adapter_image_embeds_1"].shape == (2, 1, 65, 32)  # Plus: hidden states
    assert res.recipe["adapter_inputs"] == [[_print(image)], [_print(other_image)]]
    assert res.recipe["model"]["ip_adapter"] == ["tiny-ip-adapter", "tiny-ip-adapter-plus"]
    assert json.loads(json.dumps(res.recipe)) == res.recipe


def _print(picture) -> str:
    from imageprompt_widgets.encoding import fingerprint

    return fingerprint(picture)[:16]


def test_without_adapter_images_every_adapter_sees_the_inputs(mixed_pipe, image):
    res = mixed_pipe.generate(image, prompt="a cat", **FAST)
    assert np.array_equal(pixels(res.images), pixels(bare(mixed_pipe, [image, image])))
    assert "adapter_inputs" not in res.recipe


def test_the_paired_preset_loads_plus_and_plus_face():
    pipe = ImagePromptPipeline.from_preset("tiny-ip-adapter-plus-and-face")
    handle = pipe.parts["ip_adapter"]
    assert pipe.ip_adapters == handle.names == ("tiny-ip-adapter-plus", "tiny-ip-adapter-plus-face")
    assert handle.reads_hidden_states == (True, True)
    first, second = handle.projections
    assert not torch.equal(first.latents, second.latents)  # two different adapters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapter_images": [[make_image(0)]]},
         ("adapter_images has 1 entry but 'tiny-mixed-adapters' has 2 IP-Adapters: give one list of images per "
         "adapter.")),
        ({"adapter_scales": [0.5]},
         ("adapter_scales has 1 number but 2 IP-Adapters are loaded ('tiny-ip-adapter', 'tiny-ip-adapter-plus'): "
         "give one per adapter, or none to use scale for each.")),
        ({"adapter_images": [[make_image(0)], [make_image(1)]], "mode": "tokens"},
         "adapter_images are the IP-Adapters' images: use them with mode='ip_adapter', not 'tokens'."),
        ({"adapter_block_scales": [{"up": 1.0}]},
         ("adapter_block_scales lists 1 entries but 2 IP-Adapters are loaded: give one per adapter, or one "
         "dictionary for all.")),
    ],
)
def test_per_adapter_inputs_that_do_not_fit_say_so(mixed_pipe, image, kwargs, message):
    with pytest.raises(SettingsError) as caught:
        mixed_pipe.generate(image, **FAST, **kwargs)
    assert str(caught.value) == message


# ---------------------------------------------------------------------------------------------
# Per-block scale dictionaries (diffusers' set_ip_adapter_scale format)


def test_a_block_dictionary_equals_diffusers_set_ip_adapter_scale(plus_pipe, image):
    # InstantStyle's single-layer form, sized for the twin's UNet (SD's layout, one layer per down block)
    blocks = {"down": {"block_2": 1.0}, "up": {"block_1": [0.0, 1.0]}}
    res = plus_pipe.generate(image, prompt="a cat", adapter_block_scales=blocks, **FAST)
    assert res.settings.adapter_blocks == "custom"
    assert json.loads(res.recipe["settings"]["adapter_block_scales"]) == blocks
    plus_pipe.sd.set_ip_adapter_scale(blocks)
    try:
        expected = bare(plus_pipe, image)
    finally:
        plus_pipe.sd.set_ip_adapter_scale(1.0)
    assert np.array_equal(pixels(res.images), pixels(expected))
    everywhere = plus_pipe.generate(image, prompt="a cat", **FAST)
    assert not np.array_equal(pixels(res.images), pixels(everywhere.images))


def test_block_dictionary_numbers_are_multiplied_by_each_adapters_scale(mixed_pipe):
    from imageprompt_widgets.methods.ip_adapter import AdapterHandle

    handle: AdapterHandle = mixed_pipe.parts["ip_adapter"]
    settings = GenerationSettings(mode="ip_adapter", adapter_scales=(0.5, 2.0),
                                  adapter_block_scales=[{"mid": 1.0}, {"up": {"block_1": [1.0, 0.5]}}])
    assert handle.scale_configs(settings) == [{"mid": 0.5}, {"up": {"block_1": [2.0, 1.0]}}]
    named = GenerationSettings(mode="ip_adapter", scale=0.7, adapter_blocks="composition")
    assert handle.scale_configs(named) == [{"down": {"block_2": 0.7}, "mid": 0.7}] * 2


def test_a_block_dictionary_that_does_not_fit_the_unet_names_its_blocks(plus_pipe, image):
    with pytest.raises(SettingsError) as caught:
        plus_pipe.generate(image, adapter_block_scales={"up": {"block_1": [1.0, 0.0, 1.0]}}, **FAST)
    assert str(caught.value) == (
        "adapter_block_scales does not fit this UNet (Expected 2 scales for up.block_1, got 3): it has attention in "
        "down blocks 0, 1, 2 (1 layer each), mid (1) and up blocks 1, 2, 3 (2 layers each)."
    )
    with pytest.raises(SettingsError, match=r"does not fit this UNet \(up.block_0 has no attention layers\): it has"):
        plus_pipe.generate(image, adapter_block_scales={"up": {"block_0": 1.0}}, **FAST)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{up: 1}", ("adapter_block_scales is not JSON (Expecting property name enclosed in double quotes at "
                    'character 1): write it like {"up": {"block_1": [0.0, 1.0, 0.0]}}.')),
        ({"upper": 1.0}, ("adapter_block_scales has the key 'upper': use 'down', 'mid', 'up' (diffusers' "
                         "set_ip_adapter_scale format).")),
        ({"up": {"1": 1.0}}, "adapter_block_scales['up'] has the key '1': name blocks 'block_0', 'block_1', …."),
        ({"up": {"block_1": "high"}}, ("adapter_block_scales['up']['block_1'] must be a number or a list of numbers "
                                      "(one per attention layer), not 'high'.")),
        ({"mid": [1.0, 0.5]}, ("adapter_block_scales['mid'] must be a number (the mid block has one attention "
                              "layer), not [1.0, 0.5].")),
        ({"down": [0.0, 1.0]}, "adapter_block_scales['down'] must be a number, not [0.0, 1.0]."),
        ([], "adapter_block_scales is an empty list: give one entry per adapter, or a dictionary."),
    ],
)
def test_bad_block_dictionaries_name_the_bad_part(value, message):
    with pytest.raises(SettingsError) as caught:
        GenerationSettings(mode="ip_adapter", adapter_block_scales=value)
    assert str(caught.value) == message


def test_custom_blocks_and_named_blocks_do_not_mix():
    with pytest.raises(SettingsError, match=r"adapter_blocks='custom' needs adapter_block_scales"):
        GenerationSettings(adapter_blocks="custom")
    with pytest.raises(SettingsError, match=r"adapter_block_scales replaces adapter_blocks='style'"):
        GenerationSettings(adapter_blocks="style", adapter_block_scales={"mid": 1.0})
    settings = GenerationSettings(adapter_block_scales='{"mid": 1.0}')
    assert GenerationSettings.from_kwargs(**settings.to_dict()) == settings  # the recipe round trip
    numpy_numbers = GenerationSettings(adapter_block_scales={"mid": np.float32(0.5), "up": {"block_1": [np.int64(1)]}})
    assert numpy_numbers.block_scales() == {"mid": 0.5, "up": {"block_1": [1]}}


# ---------------------------------------------------------------------------------------------
# The inspector's view of the adapter's tokens


def test_adapter_tokens_are_what_the_unet_reads_and_where_each_query_looked(plus_pipe, image):
    res = plus_pipe.generate(image, prompt="a cat", **FAST)
    traced = res.trace.extras["ip_adapter_image_embeds"]
    tokens = plus_pipe.adapter_tokens(res)
    assert tokens.tokens.shape == (16, 32) and tokens.queries == 16
    with torch.no_grad():  # diffusers' own route from the traced input to the adapter's tokens
        (expected,) = plus_pipe.sd.unet.encoder_hid_proj([traced[1:2]])
    torch.testing.assert_close(tokens.tokens, expected[0, 0], rtol=0, atol=0)

    last = plus_pipe.parts["ip_adapter"].projections[0].layers[-1].attn
    seen = []
    handle = last.register_forward_pre_hook(lambda module, args: seen.append(args))
    try:
        with torch.no_grad():
            plus_pipe.sd.unet.encoder_hid_proj([traced[1:2]])
            queries, keys = seen[0]
            heads, width = last.heads, last.inner_dim // last.heads
            q = last.to_q(queries).reshape(1, 16, heads, width).transpose(1, 2)
            k = last.to_k(keys).reshape(1, keys.shape[1], heads, width).transpose(1, 2)
            by_hand = torch.softmax(q @ k.transpose(-1, -2) / width**0.5, dim=-1).mean(dim=1)[0]
    finally:
        handle.remove()
    assert tokens.attention.shape == (16, 65)  # each query over CLS + 8x8 patches
    torch.testing.assert_close(tokens.attention, by_hand[:, :65], atol=1e-6, rtol=1e-5)
    assert bool((tokens.attention.sum(dim=1) < 1).all())  # the rest went to the queries themselves


def test_the_adapter_tokens_view_draws_the_tokens_and_each_querys_map(plus_pipe, adapter_image_pipe, image):
    from imageprompt_widgets.views.adapter_tokens import adapter_tokens_view, attention_grids

    res = plus_pipe.generate(image, prompt="a cat", **FAST)
    tokens = plus_pipe.adapter_tokens(res)
    view = adapter_tokens_view(tokens, seen=image)
    assert view.attention_maps.shape == (16, 8, 8)
    torch.testing.assert_close(view.attention_maps, attention_grids(tokens.attention))
    expected = tokens.attention[:, 1:].reshape(16, 8, 8)
    torch.testing.assert_close(view.attention_maps, expected / expected.flatten(1).amax(1)[:, None, None])
    assert view.describe() == ("tiny-ip-adapter-plus: 16 tokens x 32 dims, 16 distinct; 16 resampler queries over "
                               "a 8x8 patch grid")
    png = view.to_png()
    assert png.startswith(b"\x89PNG")
    picture = Image.open(io.BytesIO(png))
    assert picture.width > 600 and picture.height > 300  # the heatmap beside a 4x4 grid of query maps
    figure = view.figure()
    assert len(figure.axes) == 1 + 1 + 16  # heatmap, its colour bar, one per query
    assert [figure.axes[2 + q].get_title() for q in (0, 15)] == ["query 0", "query 15"]
    plain = adapter_tokens_view(adapter_image_pipe.adapter_tokens(adapter_image_pipe.generate(image, **FAST)))
    assert plain.tokens.shape == (4, 32) and plain.attention_maps is None
    assert plain.describe() == "tiny-ip-adapter: 4 tokens x 32 dims, 4 distinct"
    with pytest.raises(SettingsError, match="This run fed no IP-Adapter"):
        plus_pipe.adapter_tokens(res, adapter=1)
