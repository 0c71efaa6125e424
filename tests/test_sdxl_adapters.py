"""IP-Adapters on SDXL, on the tiny twins: each twin's encoder is chosen by its adapter file's shapes, and
``mode="ip_adapter"`` equals bare ``StableDiffusionXLPipeline`` fed the trace's tensors with the same seed.

``tiny-sdxl-ip-adapter`` stands for ``ip-adapter_sdxl`` (it reads the bigG analog's projected embedding),
``tiny-sdxl-ip-adapter-plus`` for ``ip-adapter-plus_sdxl_vit-h`` (a resampler over a ViT-H analog's hidden states).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_pixels_within, bare_sdxl_images, pixels

from imageprompt_widgets import ImagePromptPipeline
from imageprompt_widgets.loading.adapter_fit import AdapterFitError
from imageprompt_widgets.methods.ip_adapter import adapter_processors
from imageprompt_widgets.presets import PRESETS

STEPS = 3
RUN = {"steps": STEPS, "seed": 0, "prompt": "a cat"}


@pytest.fixture(scope="module")
def plain_pipe() -> ImagePromptPipeline:
    return ImagePromptPipeline.from_preset("tiny-sdxl-ip-adapter")


@pytest.fixture(scope="module")
def plus_pipe() -> ImagePromptPipeline:
    return ImagePromptPipeline.from_preset("tiny-sdxl-ip-adapter-plus")


def bare_images(pipe: ImagePromptPipeline, res, **kwargs):
    """Bare SDXL fed the trace's text and adapter tensors."""
    return bare_sdxl_images(pipe, res, steps=STEPS, ip_adapter_image_embeds=[res.trace.extras["ip_adapter_image_embeds"]],
                            **kwargs)


def encoder_widths(pipe: ImagePromptPipeline) -> tuple[int, int]:
    return pipe.image_encoder.config.projection_dim, pipe.image_encoder.config.hidden_size


def test_the_sdxl_adapter_presets_pair_each_file_with_the_encoder_it_reads():
    plain, plus = PRESETS["sdxl-ip-adapter"], PRESETS["sdxl-ip-adapter-plus"]
    assert plain.ip_adapters == ("h94/IP-Adapter:sdxl_models:ip-adapter_sdxl.safetensors",)
    assert (plain.clip_model, plain.clip_subfolder) == ("h94/IP-Adapter", "sdxl_models/image_encoder")
    assert plus.ip_adapters == ("h94/IP-Adapter:sdxl_models:ip-adapter-plus_sdxl_vit-h.safetensors",)
    assert (plus.clip_model, plus.clip_subfolder) == ("h94/IP-Adapter", "models/image_encoder")
    for preset in (plain, plus):
        assert preset.is_sdxl and preset.download_size and not preset.image_tokens_fit
        assert preset.defaults[-1] == ("mode", "ip_adapter")
    for name in ("tiny-sdxl-ip-adapter", "tiny-sdxl-ip-adapter-plus"):
        twin = PRESETS[name]
        assert twin.is_sdxl and twin.offline_builder and twin.ip_adapters == (name,) and twin.clip_model == name


@pytest.mark.slow
def test_each_twins_encoder_is_the_one_its_adapter_file_needs(plain_pipe, plus_pipe):
    from imageprompt_widgets.loading.offline_sdxl import ensure_tiny_sdxl
    from imageprompt_widgets.loading.offline_sdxl_adapters import encoder_widths as saved_widths

    (plain,), (plus,) = plain_pipe.parts["ip_adapter"].needs, plus_pipe.parts["ip_adapter"].needs
    assert (plain.kind, plain.reads, plain.input_width, plain.tokens) == ("plain", "image_embeds", 32, 4)
    assert (plus.kind, plus.reads, plus.input_width, plus.tokens) == ("plus", "hidden_states", 32, 16)
    assert plain.cross_attention_dim == plus.cross_attention_dim == plain_pipe.sd.unet.config.cross_attention_dim
    assert encoder_widths(plain_pipe) == saved_widths(ensure_tiny_sdxl()[2]) == (32, 48)  # the bigG analog
    assert encoder_widths(plus_pipe) == (40, 32)  # the ViT-H analog: its hidden states are what Plus reads
    assert "ip_adapter" in plain_pipe.methods() and "ip_adapter" in plus_pipe.methods()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["plain", "plus"])
def test_ip_adapter_on_sdxl_equals_bare_diffusers(which, plain_pipe, plus_pipe, image):
    pipe = {"plain": plain_pipe, "plus": plus_pipe}[which]
    res = pipe.generate(image, **RUN)
    fed = res.trace.extras["ip_adapter_image_embeds"]
    assert fed.shape == ((2, 1, 32) if which == "plain" else (2, 1, 65, 32))  # [negative + positive, images, ...]
    assert res.trace.pooled_prompt_embeds is not None
    assert_pixels_within(res.images, bare_images(pipe, res))
    without = pipe.generate(image, scale=0.0, **RUN)
    assert np.abs(pixels(without.images) - pixels(res.images)).mean() > 1  # the adapter reaches the UNet


@pytest.mark.slow
def test_style_blocks_on_sdxl_are_instantstyles_layer_and_equal_diffusers_scale_dictionary(plain_pipe, image):
    unet = plain_pipe.sd.unet
    names = {id(p): n for n, p in unet.attn_processors.items()}
    seen: list[dict[str, float]] = []
    handle = unet.register_forward_pre_hook(
        lambda module, args: seen.append({names[id(p)]: p.scale[0] for p in adapter_processors(unet)}))
    try:
        res = plain_pipe.generate(image, scale=0.6, adapter_blocks="style", **RUN)
    finally:
        handle.remove()
    assert {n for n, s in seen[-1].items() if s} == {n for n in seen[-1] if n.startswith("up_blocks.0.attentions.1.")}
    assert {s for s in seen[-1].values() if s} == {0.6}
    assert all(p.scale == [1.0] for p in adapter_processors(unet))  # restored after the run
    plain_pipe.sd.set_ip_adapter_scale({"up": {"block_0": [0.0, 0.6, 0.0]}})
    try:
        bare = bare_images(plain_pipe, res)
    finally:
        plain_pipe.sd.set_ip_adapter_scale(1.0)
    assert_pixels_within(res.images, bare)


@pytest.mark.slow
def test_a_file_for_the_other_encoder_or_unet_is_one_sentence_on_sdxl(plain_pipe, image):
    before = plain_pipe.generate(image, **RUN)
    with pytest.raises(AdapterFitError, match=r"^The IP-Adapter 'tiny-sdxl-ip-adapter-plus' reads hidden states \(32 "
                                              r"wide\) but the image encoder 'tiny-sdxl-ip-adapter' gives 48-wide "
                                              r"hidden states: load it with an image encoder whose hidden states are "
                                              r"32 wide\.$"):
        plain_pipe.load_ip_adapter("tiny-sdxl-ip-adapter-plus")
    with pytest.raises(AdapterFitError, match=r"^The IP-Adapter 'tiny-ip-adapter' was trained for a UNet with 32-wide "
                                              r"cross-attention but this model has a UNet with 64-wide "
                                              r"cross-attention: use it with the model it was trained for\.$"):
        plain_pipe.load_ip_adapter("tiny-ip-adapter")
    assert plain_pipe.ip_adapters == ("tiny-sdxl-ip-adapter",)
    after = plain_pipe.generate(image, **RUN)
    assert np.array_equal(pixels(after.images), pixels(before.images))
