"""What makes live feel live: the tiny decoder, stage timings, encodings reused across slider moves, bfloat16.

Speed itself is measured by ``python -m benchmarks.samplers --parts live``, never asserted here: these tests check
that each lever does what it says (the pixels it gives, the work it skips, the record it leaves).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from helpers import WAIT, pixels

from imageprompt_widgets import ImagePromptPipeline, SettingsError
from imageprompt_widgets.engine.pipeline import STAGES
from imageprompt_widgets.loading import cache
from imageprompt_widgets.loading.offline import ensure_tiny_models, ensure_tiny_taesd, sample_image

FAST = {"steps": 3, "seed": 5}


def test_a_tiny_decoder_run_equals_bare_diffusers_with_autoencoder_tiny(tiny_pipe, image):
    res = tiny_pipe.generate(image, decoder="tiny", guidance_scale=4.0, **FAST)
    bare = StableDiffusionPipeline.from_pretrained(ensure_tiny_models()[0], use_safetensors=True)
    bare.set_progress_bar_config(disable=True)
    bare.vae = AutoencoderTiny.from_pretrained(ensure_tiny_taesd(), use_safetensors=True)
    expected = bare(prompt_embeds=res.trace.prompt_embeds, negative_prompt_embeds=res.trace.negative_prompt_embeds,
                    num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.abs(pixels(res.images[0]) - pixels(expected)).max() <= 1
    full = tiny_pipe.generate(image, guidance_scale=4.0, **FAST)
    assert np.abs(pixels(full.images[0]) - pixels(res.images[0])).max() > 10  # another decoder: another picture
    assert res.recipe["settings"]["decoder"] == "tiny" and res.recipe["model"]["tiny_decoder"] == "tiny-taesd"
    assert full.recipe["settings"]["decoder"] == "full" and "tiny_decoder" not in full.recipe["model"]
    assert tiny_pipe.tiny_decoder() is tiny_pipe.tiny_decoder()  # held by the pipeline: loaded once


def test_a_model_without_a_tiny_decoder_says_so_before_any_work(image):
    toy = ImagePromptPipeline.from_preset("toy")
    with pytest.raises(SettingsError, match=r"^The 'toy' model has no tiny decoder .*: use decoder='full'\.$"):
        toy.generate(image, decoder="tiny", steps=1)
    with pytest.raises(SettingsError, match=r"decoder='small' is not one of full, tiny"):
        toy.generate(image, decoder="small")


def test_timings_name_every_stage_and_add_up_to_the_total(tiny_pipe, image):
    calls = []
    hook = tiny_pipe.sd.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        res = tiny_pipe.generate(image, negative_prompt="dark", guidance_scale=3.0, decoder="tiny", **FAST)
    finally:
        hook.remove()
    timings = res.timings
    assert {"encoding", "conditioning", "denoising", "decoding", "total"} <= set(timings)
    assert list(timings)[:-1] == [stage for stage in STAGES if stage in timings] and list(timings)[-1] == "total"
    assert all(seconds >= 0 for seconds in timings.values())
    parts = sum(seconds for stage, seconds in timings.items() if stage != "total")
    assert abs(parts - timings["total"]) <= 0.05 * timings["total"]
    assert res.unet_calls == len(calls) == 4  # PNDM: three steps and its warm-up, each one batched call
    cancelled = tiny_pipe.generate(image, **FAST, on_step=lambda info: None, cancel=_set_event())
    assert cancelled.cancelled and "total" in cancelled.timings


def _set_event():
    import threading

    event = threading.Event()
    event.set()
    return event


class CallCounter:
    """Counts forward calls of a module (a spy: the module still runs)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1


def test_a_live_rerun_with_unchanged_inputs_calls_neither_encoder(tiny_pipe):
    picture = sample_image(11)
    settings = {"mode": "blend", "prompt": "a boat at dawn", "negative_prompt": "fog", "guidance_scale": 3.0,
                "steps": 2, "seed": 1}
    image_spy, text_spy = CallCounter(tiny_pipe.image_encoder), CallCounter(tiny_pipe.sd.text_encoder)
    try:
        first = tiny_pipe.generate(picture, image_weight=0.3, **settings)
        assert image_spy.calls == 1 and text_spy.calls >= 2  # a new picture and two new texts: both encoders ran
        image_spy.calls = text_spy.calls = 0
        moved = tiny_pipe.generate(picture.copy(), image_weight=0.7, **settings)  # a slider moved; same inputs
        assert (image_spy.calls, text_spy.calls) == (0, 0)
        # The cached encodings are the ones a fresh pipeline computes.
        torch.testing.assert_close(moved.trace.negative_prompt_embeds, first.trace.negative_prompt_embeds)
        again = tiny_pipe.generate(picture, image_weight=0.3, **settings)
        assert np.array_equal(pixels(again.images[0]), pixels(first.images[0]))
        tiny_pipe.generate(picture, image_weight=0.7, **{**settings, "prompt": "a boat at dusk"})
        assert (image_spy.calls, text_spy.calls) == (0, 1)  # only the changed prompt is encoded
    finally:
        image_spy.handle.remove()
        text_spy.handle.remove()


def test_a_cut_prompt_is_noted_on_a_cached_rerun_too(tiny_pipe, image):
    long_prompt = " ".join(["red"] * 120)
    notes = [tiny_pipe.generate(image, mode="blend", prompt=long_prompt, **FAST).recipe.get("prompt_truncated")
             for _ in range(2)]
    assert notes[0] and notes[1] == notes[0]


def test_live_runs_autocast_to_bfloat16_where_the_cpu_has_it(monkeypatch, image):
    live = ImagePromptPipeline.from_preset("tiny-live")
    assert live.default_settings().precision == "auto"
    assert live.compute_dtype(live.default_settings()) == torch.float32  # conftest: a CPU without bfloat16
    monkeypatch.setattr(cache, "cpu_has_bfloat16", lambda: True)
    seen = []
    hook = live.sd.unet.register_forward_hook(lambda module, args, output: seen.append(output[0].dtype))
    try:
        fast = live.generate(image, seed=2)
        seen_fast, seen[:] = list(seen), []
        exact = live.generate(image, seed=2, precision="float32")  # how a user turns it off
    finally:
        hook.remove()
    assert set(seen_fast) == {torch.bfloat16} and set(seen) == {torch.float32}
    assert fast.recipe["compute_dtype"] == "bfloat16" and exact.recipe["compute_dtype"] == "float32"
    assert fast.recipe["settings"]["precision"] == "auto" and exact.recipe["dtype"] == "float32"
    difference = np.abs(pixels(fast.images[0]) - pixels(exact.images[0]))
    assert 0 < difference.mean() < 20  # the same picture, computed with fewer mantissa bits
    # The default run (30 steps) stays in float32: its pixels equal bare diffusers', as the contract says.
    assert live.compute_dtype(live.default_settings().replace(steps=30)) == torch.float32
    assert live.compute_dtype(live.default_settings().replace(steps=30, precision="bfloat16")) == torch.bfloat16


def test_the_command_line_says_where_the_time_went_when_verbose(tmp_path, capsys, image):
    from imageprompt_widgets.cli import main

    image.save(tmp_path / "in.png")
    code = main(["generate", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--model", "tiny", "--steps",
                 "2", "--decoder", "tiny", "--verbose"])
    err = capsys.readouterr().err
    assert code == 0
    (line,) = [text for text in err.splitlines() if text.startswith("time: ")]
    assert " s: " in line and "denoising" in line
    assert line.endswith("(3 UNet calls)")  # PNDM: two steps and its warm-up


def test_a_controller_run_that_loaded_the_model_counts_the_loading(image):
    from imageprompt_widgets.engine.controller import Controller
    from imageprompt_widgets.engine.runners import InlineRunner

    controller = Controller("tiny", runner=InlineRunner(), previews=False)
    first = controller.submit(image, controller.default_settings().replace(steps=1)).future.result(WAIT)
    second = controller.submit(image, controller.default_settings().replace(steps=1)).future.result(WAIT)
    assert next(iter(first.timings)) == "loading" and "loading" not in second.timings
    parts = sum(seconds for stage, seconds in first.timings.items() if stage != "total")
    assert abs(parts - first.timings["total"]) <= 0.05 * first.timings["total"]


def test_the_hyper_preset_is_fast_and_keeps_guidance(image, other_image):
    """Few steps that keep classifier-free guidance: every UNet call has the unconditional row, so a negative image
    still changes the picture; the pixels are bare diffusers' with the LoRA fused, DDIM on trailing timesteps and
    the tiny decoder."""
    from diffusers import DDIMScheduler

    from imageprompt_widgets.loading.offline import LORA_WEIGHT_NAME, ensure_tiny_lora

    hyper = ImagePromptPipeline.from_preset("tiny-hyper")
    settings = hyper.default_settings()
    assert (settings.scheduler, settings.steps, settings.guidance_scale, settings.decoder) == (
        "ddim_trailing", 8, 5.0, "tiny")
    rows = []
    hook = hyper.sd.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        res = hyper.generate(image, seed=3)
    finally:
        hook.remove()
    assert rows == [2] * 8  # eight calls, each with its unconditional row
    pushed = hyper.generate(image, seed=3, negative_image=other_image)
    assert np.abs(pixels(pushed.images[0]) - pixels(res.images[0])).mean() > 1  # the negative image acts

    bare = StableDiffusionPipeline.from_pretrained(ensure_tiny_models()[0], use_safetensors=True)
    bare.set_progress_bar_config(disable=True)
    bare.load_lora_weights(ensure_tiny_lora("tiny-hyper-lora"), weight_name=LORA_WEIGHT_NAME)
    bare.fuse_lora()
    bare.unload_lora_weights()
    bare.scheduler = DDIMScheduler.from_config(bare.scheduler.config, clip_sample=False, timestep_spacing="trailing")
    bare.vae = AutoencoderTiny.from_pretrained(ensure_tiny_taesd(), use_safetensors=True)
    expected = bare(prompt_embeds=res.trace.prompt_embeds, negative_prompt_embeds=res.trace.negative_prompt_embeds,
                    num_inference_steps=8, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(pixels(res.images[0]) - pixels(expected)).max() <= 1


def test_the_environment_can_say_float32_only_for_every_process_it_starts():
    """``IMAGEPROMPT_CPU_BFLOAT16=0`` (the suite sets it): a subprocess's precision "auto" stays float32 too."""
    import subprocess
    import sys

    code = "from imageprompt_widgets.loading.cache import cpu_has_bfloat16; print(cpu_has_bfloat16())"
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                          env={**os.environ, "IMAGEPROMPT_CPU_BFLOAT16": "0"})
    assert said.stdout.strip() == "False"


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_a_cut_prompt_is_noted_whatever_the_libraries_log_verbosity(preset, image):
    """The note came from diffusers' warning: a process that had turned diffusers' logging down to errors (CI's
    memory benchmark did) lost it; SDXL's pipeline warned from a logger the note did not listen to."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    pipe = ImagePromptPipeline.from_preset(preset)
    long_prompt = " ".join(["blue"] * 120)
    libraries = [(library, library.get_verbosity()) for library in (diffusers_logging, transformers_logging)]
    for library, _ in libraries:
        library.set_verbosity_error()  # (transformers also warns only once per tokenizer)
    try:
        notes = [pipe.generate(image, mode="text", prompt=long_prompt, **FAST).recipe.get("prompt_truncated")
                 for _ in range(2)]
    finally:
        for library, verbosity in libraries:
            library.set_verbosity(verbosity)
    assert notes[0] and notes[1] == notes[0]
    assert not pipe.generate(image, mode="text", prompt="a blue square", **FAST).recipe.get("prompt_truncated")
