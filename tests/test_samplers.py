"""Schedulers (samplers): each equals bare diffusers with the same scheduler and generator, the shared pipeline
keeps its own scheduler, and the planned number of UNet steps is exact."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from helpers import WAIT, pixels

from imageprompt_widgets import GenerationSettings, SettingsError
from imageprompt_widgets.engine.pipeline import unet_step_count
from imageprompt_widgets.engine.samplers import scheduler_for
from imageprompt_widgets.settings import SCHEDULERS


def expected_scheduler(name: str, config) -> object:
    """diffusers' documented swap, written out by hand: ``Class.from_config(pipe.scheduler.config)``. The tiny
    model's config, like one saved without the key, does not say ``clip_sample``; SD never clips x0."""
    return {
        "pndm": lambda: PNDMScheduler.from_config(config),
        "ddim": lambda: DDIMScheduler.from_config(config, clip_sample=False),
        "euler": lambda: EulerDiscreteScheduler.from_config(config),
        "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(config),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(config),
        "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True),
        "unipc": lambda: UniPCMultistepScheduler.from_config(config),
        "lcm": lambda: LCMScheduler.from_config(config, clip_sample=False),
        "ddim_trailing": lambda: DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing="trailing"),
    }[name]()


def test_every_scheduler_the_settings_offer_is_one_written_out_by_hand_here():
    """Against this file's own table (samplers.py checks its table against the settings at import)."""
    config = PNDMScheduler().config
    built = {name: expected_scheduler(name, config) for name in SCHEDULERS}  # a KeyError names an unknown one
    assert len(built) == len(SCHEDULERS) == 9
    assert SCHEDULERS[0] == GenerationSettings().scheduler == "pndm"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_scheduler_is_built_from_the_models_own_config(tiny_pipe, name):
    base = tiny_pipe.sd.scheduler
    built = scheduler_for(name, base)
    reference = expected_scheduler(name, base.config)
    assert type(built) is type(reference) and built is not base
    assert dict(built.config) == dict(reference.config)
    assert built.config.beta_schedule == base.config.beta_schedule == "scaled_linear"
    assert getattr(built.config, "use_karras_sigmas", False) == (name == "dpmpp_2m_karras")


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.slow
def test_images_equal_bare_diffusers_with_the_same_scheduler_and_generator(tiny_pipe, image, name):
    guidance = 1.0 if name == "lcm" else 5.0  # lcm is the live mode's sampler: no unconditional pass
    totals = []
    res = tiny_pipe.generate(image, scheduler=name, steps=4, seed=3, guidance_scale=guidance,
                             on_step=lambda info: totals.append(info.total))
    components = {**tiny_pipe.sd.components, "scheduler": expected_scheduler(name, tiny_pipe.sd.scheduler.config)}
    bare = StableDiffusionPipeline(**components)
    bare.set_progress_bar_config(disable=True)
    calls = []
    hook = bare.unet.register_forward_hook(lambda *args: calls.append(1))
    expected = bare(
        prompt_embeds=res.trace.prompt_embeds,
        negative_prompt_embeds=res.trace.negative_prompt_embeds,
        num_inference_steps=4,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    hook.remove()
    assert np.array_equal(pixels(res.images[0]), pixels(expected))
    assert res.recipe["settings"]["scheduler"] == name
    # The planned total is exact: the progress bar's max equals the UNet steps that ran.
    planned = unet_step_count(tiny_pipe.sd.scheduler, res.settings)
    assert set(totals) == {planned} and len(totals) == len(res.trace.timesteps) == len(calls) == planned


def test_other_schedulers_give_other_pictures(tiny_pipe, image):
    first = {name: pixels(tiny_pipe.generate(image, scheduler=name, steps=4, seed=0).images[0])
             for name in ("pndm", "ddim", "euler_a")}
    assert not np.array_equal(first["pndm"], first["ddim"])
    assert not np.array_equal(first["ddim"], first["euler_a"])


@pytest.mark.parametrize(("name", "steps", "strength"), [("pndm", 10, 0.5), ("dpmpp_2m_karras", 7, 0.6),
                                                          ("euler_a", 5, 0.75), ("lcm", 4, 0.5)])
def test_planned_steps_stay_exact_for_img2img(tiny_pipe, image, name, steps, strength):
    totals = []
    res = tiny_pipe.generate(image, scheduler=name, steps=steps, strength=strength, structure="img2img",
                             guidance_scale=1.0 if name == "lcm" else 7.5,
                             on_step=lambda info: totals.append(info.total))
    planned = unet_step_count(tiny_pipe.sd.scheduler, res.settings)
    assert totals == [planned] * planned == [len(res.trace.timesteps)] * len(totals)


def test_the_shared_scheduler_is_never_changed_or_seen_by_a_run(tiny_pipe, image):
    original = tiny_pipe.sd.scheduler
    config = dict(original.config)
    seen = []
    res = tiny_pipe.generate(image, scheduler="dpmpp_2m_karras", steps=3,
                             on_step=lambda info: seen.append(tiny_pipe.sd.scheduler))
    assert seen == [original] * len(res.trace.timesteps)  # not even during the run
    assert tiny_pipe.sd.scheduler is original and dict(original.config) == config
    assert tiny_pipe.structure_pipeline("img2img").scheduler is original


@pytest.mark.slow
def test_concurrent_runs_with_different_schedulers_each_get_their_own(tiny_pipe, image):
    alone = {name: pixels(tiny_pipe.generate(image, scheduler=name, steps=4, seed=5).images[0])
             for name in ("ddim", "euler_a", "unipc")}
    together: dict[str, np.ndarray] = {}
    barrier = threading.Barrier(3)

    def run(name: str) -> None:
        barrier.wait(WAIT)
        together[name] = pixels(tiny_pipe.generate(image, scheduler=name, steps=4, seed=5).images[0])

    threads = [threading.Thread(target=run, args=(name,)) for name in alone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert set(together) == set(alone)
    for name, picture in alone.items():
        assert np.array_equal(together[name], picture), name


def test_lcm_refuses_more_steps_than_its_schedule_has():
    with pytest.raises(SettingsError, match=r"^scheduler='lcm' runs at most 50 steps .* not 60: use 2 to 8"):
        GenerationSettings(scheduler="lcm", steps=60)
    with pytest.raises(SettingsError, match=r"^scheduler='heun' is not one of pndm, ddim, euler"):
        GenerationSettings(scheduler="heun")


def test_recipe_with_a_scheduler_reruns_to_the_same_pixels(tiny_pipe, image):
    res = tiny_pipe.generate(image, scheduler="euler_a", steps=4, seed=9)
    rerun = tiny_pipe.generate(image, GenerationSettings(**res.recipe["settings"]))
    assert rerun.settings.scheduler == "euler_a"
    assert np.array_equal(pixels(res.images[0]), pixels(rerun.images[0]))


@pytest.mark.parametrize("name", ["pndm", "euler", "dpmpp_2m_karras"])
@pytest.mark.slow
def test_x0_replays_equal_the_live_previews_for_every_kind_of_scheduler(tiny_pipe, image, name):
    """The inspector's replay of a traced latent gives what the live preview showed one step later (Euler's
    latents carry its sigma scaling, Karras sigmas are not those of the rounded timesteps)."""
    live = []
    res = tiny_pipe.generate(image, scheduler=name, steps=6, seed=1, trace_latents=True,
                             on_step=lambda info: live.append(info.x0().cpu()))
    snapshots = list(range(len(live) - 1))
    replayed = tiny_pipe.replay_x0(res, snapshots)
    for snapshot in snapshots:
        assert torch.allclose(replayed[snapshot], live[snapshot + 1][0], atol=1e-4, rtol=1e-4), snapshot


def test_the_controllers_step_plan_counts_the_chosen_scheduler(tiny_pipe):
    from imageprompt_widgets.engine.controller import Controller

    assert Controller.step_plan(tiny_pipe, GenerationSettings(steps=4)).total == 5  # PNDM's warm-up step
    plan = Controller.step_plan(tiny_pipe, GenerationSettings(steps=4, scheduler="dpmpp_2m"))
    assert (plan.total, plan.reason) == (4, "")
