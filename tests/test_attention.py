"""Cross-attention maps (``generate(..., trace_attention=True)``), checked against softmaxes computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imageprompt_widgets.engine import attention
from imageprompt_widgets.engine.results import Trace
from imageprompt_widgets.loading.offline import sample_image as make_image


@pytest.fixture(scope="module")
def image():
    return make_image(0)


@pytest.fixture(scope="module")
def other_image():
    return make_image(1)


def _capture_layer_inputs(unet, names):
    """Test hooks that keep what each named cross-attention layer receives, per call."""
    calls: dict[str, list[tuple]] = {name: [] for name in names}
    layers = attention.cross_attention_layers(unet)

    def keeper(name):
        def keep(module, args, kwargs):
            calls[name].append((args[0].detach().clone(), kwargs["encoder_hidden_states"].detach().clone(),
                                None if kwargs.get("attention_mask") is None else kwargs["attention_mask"].clone()))
        return keep

    handles = [layers[name].register_forward_pre_hook(keeper(name), with_kwargs=True) for name in names]
    return calls, handles


def _softmax_by_hand(attn, hidden, context, bias, latent=(32, 32)):
    """The layer's attention probabilities from its weights: heads averaged, on the latent grid."""
    heads = attn.heads
    query = hidden @ attn.to_q.weight.T
    key = context @ attn.to_k.weight.T
    batch, positions, inner = query.shape
    head_dim = inner // heads
    query = query.view(batch, positions, heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias[:, None]  # [B, 1, L] -> every head and position
    probabilities = scores.softmax(-1).mean(1)  # [B, positions, L]
    side = math.isqrt(positions)
    maps = probabilities.transpose(1, 2).reshape(batch, -1, side, side)
    return F.interpolate(maps, size=latent, mode="bilinear", align_corners=False)


def _hooks_on(unet) -> int:
    return sum(len(module._forward_pre_hooks) for module in attention.cross_attention_layers(unet).values())


def test_maps_have_the_contract_shape_and_sum_to_one_over_tokens(tiny_pipe, image):
    result = tiny_pipe.generate(image, steps=2, seed=0, num_images=2, trace_attention=True)
    maps = result.trace.attention_maps
    latent = result.trace.prompt_embeds.shape[1]
    assert maps.dtype == torch.float32 and maps.shape == (2, latent, 32, 32)  # tiny: 64 px images, 32x32 latents
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 32, 32), rtol=0, atol=1e-3)
    assert float(maps.min()) >= 0
    # repeat: 77 identical tokens share every position equally, 1/77 each: the image prompt acts everywhere alike.
    torch.testing.assert_close(maps, torch.full_like(maps, 1 / 77), rtol=0, atol=1e-6)


def test_one_layer_one_step_equals_the_softmax_by_hand(tiny_pipe):
    unet = tiny_pipe.sd.unet
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 9, 32, generator=generator)
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0  # the conditional row's last three tokens are padding
    calls, handles = _capture_layer_inputs(unet, [name])
    try:
        with torch.no_grad(), attention.recording_attention(unet, 1, layers=[name]) as recorder:
            unet(sample, 500, encoder_hidden_states=context, encoder_attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    maps = recorder.maps()
    assert maps.calls == 1 and maps.adapter is None
    (hidden, seen_context, bias), = calls[name]
    expected = _softmax_by_hand(attention.cross_attention_layers(unet)[name], hidden[1:], seen_context[1:], bias[1:])
    torch.testing.assert_close(maps.prompt, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(maps.prompt[:, 6:], torch.zeros(1, 3, 32, 32))  # padding carries exactly 0
    torch.testing.assert_close(maps.prompt.sum(1), torch.ones(1, 32, 32), rtol=0, atol=1e-5)


def test_a_run_averages_every_layer_of_the_conditional_branch(tiny_pipe, image):
    """One step of a guided ``tokens`` run (65 distinct tokens, padded to the negative's 77): the maps are the
    mean over the six cross-attention layers of the conditional row's softmax, cut to the 65 tokens."""
    unet = tiny_pipe.sd.unet
    names = list(attention.cross_attention_layers(unet))
    calls, handles = _capture_layer_inputs(unet, names)
    try:
        result = tiny_pipe.generate(image, mode="tokens", steps=1, seed=2, trace_attention=True)
    finally:
        for handle in handles:
            handle.remove()
    assert all(len(calls[name]) == 1 for name in names)  # one step: one UNet call (guided: a batch of 2)
    layers = attention.cross_attention_layers(unet)
    expected = torch.stack([_softmax_by_hand(layers[name], h[1:], c[1:], b[1:]) for name, ((h, c, b),) in
                            calls.items()]).mean(0)
    assert expected.shape == (1, 77, 32, 32)
    maps = result.trace.attention_maps
    assert maps.shape == (1, 65, 32, 32)
    torch.testing.assert_close(maps, expected[:, :65], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.sum(1), torch.ones(1, 32, 32), rtol=0, atol=1e-3)


def test_masked_padding_gets_no_attention(tiny_pipe, image):
    """``single`` with guidance: one image token padded to the negative's 77. Unmasked, the 76 zero tokens
    would take a share; masked, the one real token holds all of it."""
    result = tiny_pipe.generate(image, mode="single", steps=2, seed=0, trace_attention=True)
    assert result.trace.extras["encoder_attention_mask"][1].sum() == 1  # the conditional row: one real token
    maps = result.trace.attention_maps
    assert maps.shape == (1, 1, 32, 32)
    torch.testing.assert_close(maps, torch.ones(1, 1, 32, 32), rtol=0, atol=1e-6)


def test_without_trace_attention_nothing_is_hooked_and_maps_are_none(tiny_pipe, image):
    unet = tiny_pipe.sd.unet
    processors = dict(unet.attn_processors)
    seen: list[tuple[int, int]] = []

    def look(info):
        seen.append((_hooks_on(unet), len(unet._forward_pre_hooks)))

    off = tiny_pipe.generate(image, steps=2, seed=0, on_step=look)
    counting = 1  # the run's own UNet call counter (res.unet_calls), there on every run
    assert len(seen) == 3 and set(seen) == {(0, counting)}  # PNDM: 2 steps are 3 UNet calls
    assert off.trace.attention_maps is None
    seen.clear()
    on = tiny_pipe.generate(image, steps=2, seed=0, on_step=look, trace_attention=True)
    layers = len(attention.cross_attention_layers(unet))
    assert set(seen) == {(layers, counting + 1)}  # one hook per cross-attention layer, one for the latent size
    assert _hooks_on(unet) == 0 and len(unet._forward_pre_hooks) == 0  # removed after the run
    assert unet.attn_processors == processors  # the processors are never swapped
    # Recording reads the softmax beside the processors, so the pictures do not change.
    assert np.array_equal(np.asarray(on.images[0]), np.asarray(off.images[0]))


def test_hooks_are_removed_when_a_run_fails(tiny_pipe, image):
    unet = tiny_pipe.sd.unet

    def fail(info):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_pipe.generate(image, steps=2, on_step=fail, trace_attention=True)
    assert _hooks_on(unet) == 0 and len(unet._forward_pre_hooks) == 0


def test_ip_adapter_tokens_get_maps_of_their_own(image):
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.methods.ip_adapter import adapter_processors

    pipe = ImagePromptPipeline.from_preset("tiny-ip-adapter")
    result = pipe.generate(image, prompt="a cat", steps=2, seed=0, trace_attention=True)
    text, adapter = result.trace.attention_maps, result.trace.extras["adapter_attention_maps"]
    assert text.shape == (1, 77, 32, 32)
    assert adapter.shape == (1, adapter_processors(pipe.sd.unet)[0].num_tokens[0], 32, 32)  # 4 adapter tokens
    torch.testing.assert_close(text.sum(1), torch.ones(1, 32, 32), rtol=0, atol=1e-3)
    torch.testing.assert_close(adapter.sum(1), torch.ones(1, 32, 32), rtol=0, atol=1e-3)
    assert not torch.allclose(adapter, torch.full_like(adapter, 1 / adapter.shape[1]))  # distinct tokens


def test_maps_are_saved_and_loaded_with_the_trace(tiny_pipe, image, tmp_path):
    result = tiny_pipe.generate(image, steps=1, seed=0, trace_attention=True)
    loaded, _ = Trace.load(result.trace.save(tmp_path / "run.safetensors"))
    assert torch.equal(loaded.attention_maps, result.trace.attention_maps)
    assert "attention_maps" in result.trace.summary()
    import dataclasses

    from imageprompt_widgets.engine.results import ResultFileError

    flat = dataclasses.replace(result.trace, attention_maps=result.trace.attention_maps[0])  # [L, h, w]
    with pytest.raises(ResultFileError, match="attention_maps has 3 dimensions, not 4"):
        Trace.load(flat.save(tmp_path / "flat.safetensors"))


def test_layer_grid_follows_the_downsamplers_rounding():
    assert attention.layer_grid(64 * 64, (64, 64)) == (64, 64)
    assert attention.layer_grid(8 * 12, (60, 92)) == (8, 12)  # 60 -> 30 -> 15 -> 8, 92 -> 46 -> 23 -> 12
    with pytest.raises(attention.AttentionRecordError, match="no downsampling of the 64x64 latent grid"):
        attention.layer_grid(100, (64, 64))


def test_an_unknown_layer_name_is_refused(tiny_pipe):
    with pytest.raises(attention.AttentionRecordError, match="no cross-attention layer named 'nope'"):
        attention.AttentionRecorder(tiny_pipe.sd.unet, 1, layers=["nope"])


def test_several_adapters_each_get_maps_summing_to_one_and_an_adapter_that_is_off_gets_none(image, other_image):
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.presets import Preset

    mixed = ImagePromptPipeline.from_preset(Preset(  # a plain adapter (4 tokens) and a Plus adapter (16) at once
        name="tiny-mixed-adapters", sd_model="tiny-ip-adapter", clip_model="tiny-ip-adapter",
        ip_adapter=("tiny-ip-adapter", "tiny-ip-adapter-plus"), method="ip_adapter",
        defaults=(("mode", "ip_adapter"),), image_tokens_fit=False,
    ))
    both = mixed.generate(image, adapter_images=[[image], [other_image]], prompt="a cat", steps=2, seed=0,
                          trace_attention=True)
    maps = both.trace.extras["adapter_attention_maps"]
    assert maps.shape == (1, 4 + 16, 32, 32)
    torch.testing.assert_close(maps[:, :4].sum(1), torch.ones(1, 32, 32), rtol=0, atol=1e-3)
    torch.testing.assert_close(maps[:, 4:].sum(1), torch.ones(1, 32, 32), rtol=0, atol=1e-3)
    half = mixed.generate(image, adapter_scales=[0.8, 0.0], prompt="a cat", steps=2, seed=0, trace_attention=True)
    maps = half.trace.extras["adapter_attention_maps"]
    torch.testing.assert_close(maps[:, :4].sum(1), torch.ones(1, 32, 32), rtol=0, atol=1e-3)
    assert torch.equal(maps[:, 4:], torch.zeros(1, 16, 32, 32))  # scale 0: the Plus adapter read nothing
