"""What users of other tools reach for: negative text, the noise source, LoRA, the live mode, memory levels.

Each against an independent computation: bare diffusers given the same text, latents, LoRA or scheduler;
parameters compared tensor by tensor; the diffusers methods a memory level must call.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline
from helpers import WAIT, pixels

from imageprompt_widgets import GenerationSettings, ImagePromptPipeline, SettingsError
from imageprompt_widgets.engine.concurrency import CancelEvent
from imageprompt_widgets.loading.components import load_components
from imageprompt_widgets.loading.lora import describe
from imageprompt_widgets.loading.offline import (
    LORA_WEIGHT_NAME,
    ensure_tiny_lora,
    ensure_tiny_models,
    ensure_tiny_taesd,
)
from imageprompt_widgets.methods import settings_read
from imageprompt_widgets.settings import MODES

FAST = {"steps": 3, "seed": 4}
CPU = torch.device("cpu")


def private_pipe(preset: str = "tiny", **options) -> ImagePromptPipeline:
    """An uncached pipeline of its own: LoRA and memory tests change it, the shared one stays clean."""
    return ImagePromptPipeline.from_components(load_components(preset, CPU, torch.float32, **options))


def bare_sd() -> StableDiffusionPipeline:
    """The tiny SD loaded a second time, straight from its folder: an independent copy for bare diffusers."""
    sd = StableDiffusionPipeline.from_pretrained(ensure_tiny_models()[0], use_safetensors=True)
    sd.set_progress_bar_config(disable=True)
    return sd


# -- negative text ---------------------------------------------------------------------------------


def test_negative_text_is_encoded_exactly_as_diffusers_encodes_it(tiny_pipe, image):
    res = tiny_pipe.generate(image, negative_prompt="blurry, dark", guidance_scale=6.0, **FAST)
    _, diffusers_negative = tiny_pipe.sd.encode_prompt(
        None, CPU, 1, True, negative_prompt="blurry, dark", prompt_embeds=res.trace.prompt_embeds
    )
    assert torch.equal(res.trace.negative_prompt_embeds, diffusers_negative)
    bare = tiny_pipe.sd(
        prompt_embeds=res.trace.prompt_embeds, negative_prompt="blurry, dark", num_inference_steps=3,
        guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(4),
    ).images[0]
    assert np.array_equal(pixels(res.images[0]), pixels(bare))
    plain = tiny_pipe.generate(image, guidance_scale=6.0, **FAST)
    assert not np.array_equal(pixels(res.images[0]), pixels(plain.images[0]))
    assert res.recipe["settings"]["negative_prompt"] == "blurry, dark"


def test_negative_text_and_negative_images_are_one_sequence_text_first(tiny_pipe, image, other_image):
    both = tiny_pipe.generate(image, negative_image=other_image, negative_prompt="blurry", **FAST)
    images_only = tiny_pipe.generate(image, negative_image=other_image, **FAST)
    negative = both.trace.negative_prompt_embeds
    assert negative.shape == (1, 77 + 77, 32)
    assert torch.equal(negative[:, :77], tiny_pipe.encode_text("blurry"))
    assert torch.equal(negative[:, 77:], images_only.trace.negative_prompt_embeds)
    # The prompt is padded to the negative's length; the padding is masked out of cross-attention.
    mask = both.trace.extras["encoder_attention_mask"]
    assert mask.shape == (2, 154) and mask[0].sum() == 154 and mask[1].sum() == 77
    assert not np.array_equal(pixels(both.images[0]), pixels(images_only.images[0]))


@pytest.mark.slow
def test_negative_text_in_blend_ip_adapter_and_caption(tiny_pipe, image):
    blend = tiny_pipe.generate(image, mode="blend", prompt="a cat", negative_prompt="a dog", **FAST)
    assert torch.equal(blend.trace.negative_prompt_embeds, tiny_pipe.encode_text("a dog"))

    adapter_pipe = ImagePromptPipeline.from_preset("tiny-ip-adapter")
    res = adapter_pipe.generate(image, prompt="a cat", negative_prompt="a dog", **FAST)
    bare = adapter_pipe.sd(
        "a cat", negative_prompt="a dog", ip_adapter_image=image, num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(4),
    ).images[0]
    assert np.array_equal(pixels(res.images[0]), pixels(bare))

    caption_pipe = ImagePromptPipeline.from_preset("tiny-caption")
    words = caption_pipe.generate(image, prompt="a red house", negative_prompt="a dog", **FAST)
    bare = caption_pipe.sd("a red house", negative_prompt="a dog", num_inference_steps=3,
                           generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert np.array_equal(pixels(words.images[0]), pixels(bare))


def test_without_guidance_the_negative_text_is_not_even_encoded(tiny_pipe, image, monkeypatch):
    encoded = []
    real = tiny_pipe.encode_text
    monkeypatch.setattr(tiny_pipe, "encode_text", lambda text, **kw: encoded.append(text) or real(text, **kw))
    res = tiny_pipe.generate(image, negative_prompt="blurry", guidance_scale=1.0, **FAST)
    assert res.trace.negative_prompt_embeds is None and "blurry" not in encoded


def test_negative_text_with_zero_negatives_is_refused():
    with pytest.raises(SettingsError, match=r"^negative_prompt is text for the negative branch, but "
                                            r"negative='zeros' feeds zeros there"):
        GenerationSettings(negative="zeros", negative_prompt="blurry")


def test_faces_show_the_negative_text_wherever_it_acts_and_only_there():
    for mode in MODES:
        assert "negative_prompt" in settings_read(mode), mode
    assert {"scheduler", "noise"} <= settings_read("repeat")
    assert "negative_prompt" not in settings_read("single", capabilities={"image_tokens"})  # no text encoder
    assert "negative_prompt" in settings_read("single", capabilities={"image_tokens", "text"})


def test_the_command_line_takes_the_new_settings():
    from imageprompt_widgets.cli import build_parser

    args = build_parser().parse_args(["generate", "a.png", "-o", "out", "--negative-prompt", "blurry",
                                      "--scheduler", "euler_a", "--noise", "cpu"])
    assert (args.negative_prompt, args.scheduler, args.noise) == ("blurry", "euler_a", "cpu")


# -- the noise source ------------------------------------------------------------------------------


def _diffusers_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    return calls


def test_cpu_noise_hands_diffusers_latents_from_a_cpu_generator(tiny_pipe, image, monkeypatch):
    calls = _diffusers_calls(monkeypatch)
    res = tiny_pipe.generate(image, noise="cpu", num_images=2, **FAST)
    (call,) = calls
    expected = torch.randn((2, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(4), dtype=torch.float32)
    assert torch.equal(call["latents"], expected)
    assert call["generator"].device.type == "cpu"
    assert res.recipe["settings"]["noise"] == "cpu"
    bare = tiny_pipe.sd(
        prompt_embeds=res.trace.prompt_embeds, negative_prompt_embeds=res.trace.negative_prompt_embeds,
        latents=expected, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(4),
    ).images
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(res.images, bare))


def test_device_noise_is_diffusers_own_generator_and_on_the_cpu_both_agree(tiny_pipe, image, monkeypatch):
    calls = _diffusers_calls(monkeypatch)
    device = tiny_pipe.generate(image, **FAST)
    assert "latents" not in calls[0] and calls[0]["generator"].device == tiny_pipe.device
    assert device.recipe["settings"]["noise"] == "device"
    # On a CPU machine the device is the CPU: the two sources draw the same numbers.
    cpu = tiny_pipe.generate(image, noise="cpu", **FAST)
    assert np.array_equal(pixels(device.images[0]), pixels(cpu.images[0]))


def test_cpu_noise_drives_stochastic_schedulers_and_img2img_reproducibly(tiny_pipe, image):
    for changes in ({"scheduler": "euler_a"}, {"structure": "img2img", "strength": 0.7}):
        first = tiny_pipe.generate(image, noise="cpu", **FAST, **changes)
        again = tiny_pipe.generate(image, noise="cpu", **FAST, **changes)
        assert np.array_equal(pixels(first.images[0]), pixels(again.images[0])), changes


# -- LoRA ------------------------------------------------------------------------------------------


def _parameters(sd) -> dict[str, torch.Tensor]:
    return {**{f"unet.{k}": v.detach().clone() for k, v in sd.unet.state_dict().items()},
            **{f"text_encoder.{k}": v.detach().clone() for k, v in sd.text_encoder.state_dict().items()}}


@pytest.fixture(scope="module")
def lora_pipe():
    return private_pipe()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # bare diffusers' second adapter
@pytest.mark.slow
def test_loras_load_with_a_weight_each_and_equal_bare_diffusers_with_them(lora_pipe, image):
    base = lora_pipe.generate(image, **FAST)
    style = lora_pipe.load_lora("tiny-lora", weight=0.8)
    lcm = lora_pipe.load_lora("tiny-lcm-lora", weight=0.5, name="lcm")
    try:
        assert [(info.name, info.weight) for info in lora_pipe.loras] == [("tiny-lora", 0.8), ("lcm", 0.5)]
        res = lora_pipe.generate(image, **FAST)
        assert res.recipe["model"]["loras"] == [
            {"name": "tiny-lora", "source": "tiny-lora", "weight": 0.8, "fused": False},
            {"name": "lcm", "source": "tiny-lcm-lora", "weight": 0.5, "fused": False},
        ]
        assert not np.array_equal(pixels(res.images[0]), pixels(base.images[0]))
        # The text encoder's LoRA acts on the negative text too: measured again, not taken from before.
        assert not torch.equal(res.trace.negative_prompt_embeds, base.trace.negative_prompt_embeds)

        bare = bare_sd()
        bare.load_lora_weights(ensure_tiny_lora("tiny-lora"), weight_name=LORA_WEIGHT_NAME, adapter_name="a")
        bare.load_lora_weights(ensure_tiny_lora("tiny-lcm-lora"), weight_name=LORA_WEIGHT_NAME, adapter_name="b")
        bare.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
        expected = bare(prompt_embeds=res.trace.prompt_embeds, num_inference_steps=3,
                        generator=torch.Generator("cpu").manual_seed(4)).images[0]
        assert np.array_equal(pixels(res.images[0]), pixels(expected))

        assert describe(lora_pipe.loras) == "LoRA: tiny-lora 0.8, lcm 0.5" and describe(()) == "LoRA: none"
        lora_pipe.set_lora_weight("lcm", 0.0)
        assert lora_pipe.loras[1].weight == 0.0 and lora_pipe.generate(image, **FAST).recipe["model"]["loras"][1][
            "weight"] == 0.0
    finally:
        lora_pipe.unload_loras()
    assert (style.name, lcm.name) == ("tiny-lora", "lcm")


def test_unloading_restores_every_base_weight_bit_for_bit(lora_pipe, image):
    before = _parameters(lora_pipe.sd)
    base = lora_pipe.generate(image, **FAST)
    lora_pipe.load_lora("tiny-lora")
    lora_pipe.load_lora("tiny-lcm-lora")
    assert set(_parameters(lora_pipe.sd)) != set(before)  # the adapters' layers are there
    lora_pipe.unload_loras()
    after = _parameters(lora_pipe.sd)
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert lora_pipe.loras == () and "loras" not in lora_pipe.generate(image, **FAST).recipe["model"]
    assert np.array_equal(pixels(lora_pipe.generate(image, **FAST).images[0]), pixels(base.images[0]))


def test_lora_mistakes_are_one_readable_sentence(lora_pipe, tmp_path, monkeypatch):
    from imageprompt_widgets.loading.lora import LoraError

    pickled = tmp_path / "style.bin"
    pickled.write_bytes(b"not a pickle")
    with pytest.raises(LoraError, match=r"^The LoRA '.*style\.bin' is a pickle file, which can run code"):
        lora_pipe.load_lora(str(pickled))
    with pytest.raises(LoraError, match=r"^The LoRA file or folder '/nowhere/x\.safetensors' does not exist\.$"):
        lora_pipe.load_lora("/nowhere/x.safetensors")
    with pytest.raises(LoraError, match=r"^The weight of LoRA 'tiny-lora' is 9, outside -4 to 4\.$"):
        lora_pipe.load_lora("tiny-lora", weight=9)
    with pytest.raises(LoraError, match=r"^No LoRA named 'ghost' is loaded \(loaded: none\)\.$"):
        lora_pipe.set_lora_weight("ghost", 1.0)
    lora_pipe.load_lora("tiny-lora")
    try:
        with pytest.raises(LoraError, match=r"^A LoRA named 'tiny-lora' is loaded already: pass another name=\.$"):
            lora_pipe.load_lora("tiny-lcm-lora", name="tiny-lora")
        assert lora_pipe.load_lora("tiny-lora").name == "tiny-lora_2"  # a name from the source, made unique
    finally:
        lora_pipe.unload_loras()
    import diffusers.utils

    monkeypatch.setattr(diffusers.utils, "USE_PEFT_BACKEND", False)
    with pytest.raises(LoraError, match=r"needs the peft package.*pip install 'imageprompt_widgets\[lora\]'\.$"):
        lora_pipe.load_lora("tiny-lora")
    assert isinstance(LoraError("x"), ValueError)


# -- the live mode ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_pipe():
    return ImagePromptPipeline.from_preset("tiny-live")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.slow
def test_live_preset_is_lcm_lora_with_four_steps_and_no_unconditional_pass(live_pipe, image):
    """The preset's LCM-LoRA is fused into its own copy of the model: no adapter layers run per step."""
    from imageprompt_widgets.loading.lora import LoraError

    settings = live_pipe.default_settings()
    assert (settings.scheduler, settings.steps, settings.guidance_scale) == ("lcm", 4, 1.0)
    assert [(info.name, info.source, info.weight, info.fused) for info in live_pipe.loras] == [
        ("tiny-lcm-lora", "tiny-lcm-lora", 1.0, True)]
    assert not any("lora_" in name for name, _ in live_pipe.sd.unet.named_parameters())
    with pytest.raises(LoraError, match=r"^The LoRA 'tiny-lcm-lora' is fused into the 'tiny-live' model"):
        live_pipe.set_lora_weight("tiny-lcm-lora", 0.5)
    live_pipe.unload_loras()  # only what load_lora added goes; the fused one is the model
    assert len(live_pipe.loras) == 1
    batches = []
    hook = live_pipe.sd.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        res = live_pipe.generate(image, seed=2)
    finally:
        hook.remove()
    assert batches == [1, 1, 1, 1]  # four UNet calls, none unconditional
    assert res.trace.negative_prompt_embeds is None
    assert res.recipe["model"]["loras"][0]["name"] == "tiny-lcm-lora"

    bare = bare_sd()
    bare.load_lora_weights(ensure_tiny_lora("tiny-lcm-lora"), weight_name=LORA_WEIGHT_NAME)
    bare.fuse_lora()
    bare.unload_lora_weights()
    bare.scheduler = LCMScheduler.from_config(bare.scheduler.config, clip_sample=False)
    bare.vae = AutoencoderTiny.from_pretrained(ensure_tiny_taesd(), use_safetensors=True)  # the live decoder
    assert res.settings.decoder == "tiny" and res.recipe["model"]["tiny_decoder"] == "tiny-taesd"
    expected = bare(prompt_embeds=res.trace.prompt_embeds, num_inference_steps=4, guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(2)).images[0]
    assert np.array_equal(pixels(res.images[0]), pixels(expected))


def test_a_new_run_starts_right_after_cancelling_the_previous_one(live_pipe, image):
    """What a live panel does on every slider release, without a controller: cancel the running generation,
    start the next. The next one waits only for the cancelled one's current step, then runs in full."""
    reference = live_pipe.generate(image, seed=3, scale=1.5)
    first_cancel, first_steps, second_steps, results = CancelEvent(), [], [], {}

    def second() -> None:
        results["second"] = live_pipe.generate(image, seed=3, scale=1.5,
                                               on_step=lambda info: second_steps.append(info.step))

    thread = threading.Thread(target=second)

    def on_first_step(info) -> None:
        first_steps.append(info.step)
        thread.start()  # the slider moved: the next run is asked for while this one holds the pipeline
        first_cancel.set()  # and this one is cancelled

    results["first"] = live_pipe.generate(image, seed=1, on_step=on_first_step, cancel=first_cancel)
    thread.join(WAIT)
    assert results["first"].cancelled and results["first"].images == [] and first_steps == [1]
    assert second_steps == [1, 2, 3, 4] and not results["second"].cancelled
    assert np.array_equal(pixels(results["second"].images[0]), pixels(reference.images[0]))


def test_the_live_presets_are_listed_with_their_download():
    from imageprompt_widgets import PRESETS
    from imageprompt_widgets.presets import LIVE_TWINS

    assert {name: PRESETS[live].sd_model for name, live in LIVE_TWINS.items()} == {
        name: PRESETS[name].sd_model for name in LIVE_TWINS}
    assert PRESETS["sd15-live"].loras == (("latent-consistency/lcm-lora-sdv1-5", 1.0),)
    assert PRESETS["sd15-live"].defaults == PRESETS["tiny-live"].defaults
    assert "LCM-LoRA" in PRESETS["sd15-live"].download_size


# -- memory levels ---------------------------------------------------------------------------------


def test_an_unknown_memory_level_is_refused_before_loading():
    from imageprompt_widgets.loading.memory import MemoryLevelError

    with pytest.raises(MemoryLevelError, match=r"^memory='tiny' is not one of default, balanced, low, lowest\.$"):
        ImagePromptPipeline.from_preset("tiny", memory="tiny")


def test_memory_levels_are_load_options_in_the_cache_key_and_the_recipe(tiny_pipe, image):
    balanced = ImagePromptPipeline.from_preset("tiny", memory="balanced")
    assert balanced is not tiny_pipe and ImagePromptPipeline.from_preset("tiny", memory="balanced") is balanced
    assert ImagePromptPipeline.from_preset("tiny", memory="default") is ImagePromptPipeline.from_preset("tiny")
    assert tiny_pipe.generate(image, **FAST).recipe["model"]["memory"] == {"level": "default", "measures": []}
    assert balanced.generate(image, **FAST).recipe["model"]["memory"] == {
        "level": "balanced", "measures": ["attention_slicing", "vae_tiling"]}
    low = ImagePromptPipeline.from_preset("tiny", memory="low")  # on the CPU there is nothing to offload
    assert low.memory_measures == ("attention_slicing", "vae_tiling") and low.device == CPU
    assert "memory" not in GenerationSettings().to_dict()  # a load option, not a per-run setting


@pytest.mark.parametrize(("level", "offload"), [("low", "enable_model_cpu_offload"),
                                                ("lowest", "enable_sequential_cpu_offload")])
def test_offloading_levels_call_diffusers_offload_on_an_accelerator(level, offload, monkeypatch):
    """CPU offload needs an accelerator: the diffusers and accelerate calls are recorded instead of run."""
    import accelerate

    from imageprompt_widgets.loading import memory

    sd, encoder = bare_sd(), private_pipe().image_encoder
    calls = []
    for name in ("enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_attention_slicing", "to"):
        monkeypatch.setattr(sd, name, lambda *a, name=name, **k: calls.append((name, a, k)))
    monkeypatch.setattr(encoder, "to", lambda *a, **k: calls.append(("encoder.to", a, k)))
    monkeypatch.setattr(accelerate, "cpu_offload", lambda module, **k: calls.append(("cpu_offload", module, k)))
    cuda = torch.device("cuda")
    done = memory.place(sd, encoder, level, cuda)
    assert done == (offload.removeprefix("enable_"), "attention_slicing", "vae_tiling")
    assert calls == [(offload, (), {"device": cuda}), ("cpu_offload", encoder, {"execution_device": cuda}),
                     ("enable_attention_slicing", (), {})]  # and nothing moved to the device whole
    assert sd.vae.use_tiling


@pytest.mark.parametrize(("sdxl", "device", "gigabytes", "level"), [
    (True, "cuda", 16, "low"),  # a Colab T4: model CPU offload (docs/benchmarks.md, SDXL's memory plan)
    (True, "cuda", 19.9, "low"),
    (True, "cuda", 24, "default"),  # an L4 / A10 / 4090 holds every SDXL model at once
    (True, "cpu", 16, "default"),  # nothing to offload from
    (False, "cuda", 8, "default"),  # SD 1.x fits whole
])
def test_sdxl_on_a_small_gpu_gets_model_offload_unless_a_level_is_named(sdxl, device, gigabytes, level):
    from imageprompt_widgets.loading import memory

    chosen = memory.automatic_level(sdxl, torch.device(device), total_memory=int(gigabytes * 10**9))
    assert chosen == level
    assert ("model_cpu_offload" in memory.measures(chosen, torch.device(device))) == (level == "low")


def test_from_preset_without_a_level_asks_automatic_level_with_the_family_and_device(monkeypatch):
    """The choice is wired in: no ``memory=`` asks memory.automatic_level (here made to answer "balanced", which
    acts on the CPU too); a named level is taken as it is."""
    from imageprompt_widgets.engine import pipeline as engine

    asked = []
    monkeypatch.setattr(engine, "automatic_level", lambda sdxl, device: asked.append((sdxl, device)) or "balanced")
    chosen = ImagePromptPipeline.from_preset("tiny-sdxl")
    assert asked == [(True, CPU)] and chosen.memory_level == "balanced"
    assert chosen.memory_measures == ("attention_slicing", "vae_tiling")
    assert ImagePromptPipeline.from_preset("tiny-sdxl", memory="default").memory_level == "default"
    assert len(asked) == 1
    ImagePromptPipeline.from_preset("tiny")
    assert asked[-1] == (False, CPU)


@pytest.mark.slow
def test_attention_slicing_leaves_pixels_unchanged_and_vae_tiling_acts_only_above_its_tile(image):
    """Slicing computes the same attention in pieces: pixel-identical to the unsliced classic maths. (PyTorch's
    fused attention, the default, rounds differently: a pixel may move by a level.) Tiling blends overlapping
    tiles: it changes pixels where the latents exceed one tile (the tiny VAE's tile is 16 latents, its 64 px
    images have 32), by design."""
    from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor

    default, balanced = private_pipe(), private_pipe(memory_level="balanced")
    assert {type(p) for p in balanced.sd.unet.attn_processors.values()} == {SlicedAttnProcessor}
    plain = pixels(default.generate(image, **FAST).images[0])
    tiled = pixels(balanced.generate(image, **FAST).images[0])
    assert not np.array_equal(plain, tiled)  # 32 > 16: tiles were blended
    balanced.sd.vae.tile_latent_min_size, balanced.sd.vae.tile_sample_min_size = 64, 128  # one tile covers it
    sliced = pixels(balanced.generate(image, **FAST).images[0])
    default.sd.unet.set_attn_processor(AttnProcessor())
    assert np.array_equal(sliced, pixels(default.generate(image, **FAST).images[0]))
    assert np.abs(sliced.astype(int) - plain).max() <= 2

