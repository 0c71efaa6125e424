"""The headless controller every face drives: the queue of one, cancel in every phase, events in order,
throttling, a subscriber that raises, tasks, the honest step total, and two controllers on one pipeline.

No sleeps and no timed assertions: runs are held at a step with events, clocks are injected, and every
wait has a generous bound that only a deadlock reaches.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from helpers import WAIT, HeldPipeline, same_pixels, solo

from imageprompt_widgets import GenerationSettings, ImagePromptPipeline
from imageprompt_widgets.engine.controller import (
    BusyChanged,
    Cancelled,
    Cancelling,
    Controller,
    Failed,
    Finished,
    JobCancelled,
    Loading,
    Preview,
    Queued,
    Started,
    Step,
    SubscriberFailed,
    Waiting,
)
from imageprompt_widgets.engine.runners import InlineRunner, ThreadRunner
from imageprompt_widgets.engine.schedule import planned_steps
from imageprompt_widgets.loading.offline import sample_image

FAST = {"steps": 2, "guidance_scale": 7.5}


class Recorder(list):
    """A subscriber that keeps every event."""

    def __call__(self, event):
        self.append(event)

    def of(self, kind, job=None):
        return [e for e in self if isinstance(e, kind) and (job is None or getattr(e, "job", None) is job)]

    def names(self, job):
        return [type(e).__name__ for e in self if getattr(e, "job", None) is job]


@pytest.fixture
def image():
    return sample_image(0)


# -- events of one run --------------------------------------------------------------------------------


def test_a_run_reports_in_order_with_the_total_fixed_from_the_start(tiny_pipe, image):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner(), preview_interval=0, progress_interval=0)
    events = Recorder()
    controller.subscribe(events)
    job = controller.submit(image, steps=3, seed=5)
    result = job.future.result(WAIT)
    assert same_pixels(result.images[0], solo(tiny_pipe, image, steps=3, seed=5).images[0])
    names = events.names(job)
    assert names[0] == "Started" and names[-1] == "Finished"
    assert set(names[1:-1]) == {"Step", "Preview"}
    (started,) = events.of(Started)
    steps = events.of(Step)
    # PNDM runs one warm-up step more than asked; the total says so before the first step and never changes.
    assert (started.total_steps, started.requested_steps) == (4, 3)
    assert started.reason == "the PNDM scheduler adds 1 warm-up step to the 3 asked for."
    assert [s.step for s in steps] == [1, 2, 3, 4] and {s.total for s in steps} == {4}
    assert len(events.of(Preview)) == 4 and all(p.jpegs[0][:2] == b"\xff\xd8" for p in events.of(Preview))
    assert [e.busy for e in events.of(BusyChanged)] == [True, False]
    assert events.index(events.of(BusyChanged)[-1]) < events.index(events.of(Finished)[0])
    assert events.of(Finished)[0].result is result and events.of(Finished)[0].idle
    assert not controller.busy and controller.join(0)


def test_throttling_follows_the_injected_clock_and_the_last_step_always_arrives(tiny_pipe, image):
    """The clock advances 0.02 s per reading, and each step reads it twice (progress, then preview): step k
    is at 0.04 (k - 1) s. Progress every 0.05 s is every other step, previews every 0.1 s every third; the
    final step (PNDM's 9th for 8 asked) is always reported."""
    ticks = iter(range(10_000))
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner(), preview_interval=0.1,
                            progress_interval=0.05, clock=lambda: next(ticks) * 0.02)
    events = Recorder()
    controller.subscribe(events)
    controller.submit(image, steps=8, guidance_scale=1.0).future.result(WAIT)
    assert [s.step for s in events.of(Step)] == [1, 3, 5, 7, 9]
    assert [p.step for p in events.of(Preview)] == [1, 4, 7]
    quiet = Controller(pipeline=tiny_pipe, runner=InlineRunner(), preview_interval=3600, progress_interval=3600)
    events = Recorder()
    quiet.subscribe(events)
    quiet.submit(image, steps=8, guidance_scale=1.0).future.result(WAIT)
    assert [s.step for s in events.of(Step)] == [1, 9]  # the first, then the last one always
    assert [p.step for p in events.of(Preview)] == [1]
    silent = Controller(pipeline=tiny_pipe, runner=InlineRunner(), previews=False)
    events = Recorder()
    silent.subscribe(events)
    silent.submit(image, **FAST).future.result(WAIT)
    assert events.of(Preview) == []


def test_a_subscriber_that_raises_is_reported_and_the_run_goes_on(tiny_pipe, image, caplog):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner(), progress_interval=0)
    events = Recorder()

    def broken(event):
        if isinstance(event, Step):
            raise ZeroDivisionError("a face's bug")

    controller.subscribe(broken)
    controller.subscribe(events)
    with caplog.at_level(logging.ERROR, logger="imageprompt_widgets.engine.controller"):
        result = controller.submit(image, **FAST).future.result(WAIT)
    assert same_pixels(result.images[0], solo(tiny_pipe, image, **FAST).images[0])
    failures = events.of(SubscriberFailed)
    assert len(failures) == len(events.of(Step)) == 3
    assert all(isinstance(f.event, Step) and str(f.error) == "a face's bug" for f in failures)
    assert "a face's bug" in failures[0].details and "a face's bug" in caplog.text
    assert isinstance(events[-1], Finished)


def test_a_failing_run_reports_failed_and_its_future_raises(tiny_pipe, image):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner())
    events = Recorder()
    controller.subscribe(events)
    handle = tiny_pipe.sd.unet.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        job = controller.submit(image, **FAST)
    finally:
        handle.remove()
    assert str(job.future.exception()) == "boom"
    (failed,) = events.of(Failed)
    assert failed.job is job and str(failed.error) == "boom" and failed.idle
    assert not controller.busy and not tiny_pipe.lock.locked()
    assert same_pixels(controller.submit(image, **FAST).future.result(WAIT).images[0], solo(tiny_pipe, image, **FAST).images[0])


def test_bad_settings_fail_at_submit_and_nothing_is_queued(tiny_pipe, image):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner())
    with pytest.raises(ValueError, match="steps=0 is outside its range"):
        controller.submit(image, steps=0)
    assert not controller.busy


def test_the_presets_own_defaults_are_the_starting_settings():
    assert Controller("tiny-variations").default_settings() == GenerationSettings(mode="single", negative="zeros")
    assert Controller("tiny").default_settings() == GenerationSettings()
    with pytest.raises(ValueError, match="Unknown model 'sd99'"):
        Controller("sd99")


# -- the queue of one ---------------------------------------------------------------------------------


def test_a_newer_submit_replaces_the_waiting_one_whose_future_is_cancelled(tiny_pipe, image):
    held = HeldPipeline(tiny_pipe, hold_at=1)
    controller = Controller(pipeline=held, runner=ThreadRunner(), previews=False)
    events = Recorder()
    controller.subscribe(events)
    first = controller.submit(image, seed=1, **FAST)
    assert held.held.wait(WAIT)
    second = controller.submit(image, seed=2, **FAST)
    third = controller.submit(image, seed=3, **FAST)
    assert second.future.cancelled()
    assert [(e.job, e.replaced) for e in events.of(Queued)] == [(second, None), (third, second)]
    (dropped,) = events.of(Cancelled, second)
    assert (dropped.ran, dropped.idle, dropped.total) == (False, False, None)
    assert controller.jobs == (first, third)
    held.release.set()
    assert first.future.result(WAIT).settings.seed == 1
    assert third.future.result(WAIT).settings.seed == 3
    assert controller.join(WAIT) and held.max_active == 1 and held.runs == 2
    assert same_pixels(third.future.result(WAIT).images[0], solo(tiny_pipe, image, seed=3, **FAST).images[0])
    controller.close()


def test_cancel_stops_the_running_job_within_a_step_and_drops_the_waiting_one(tiny_pipe, image):
    held = HeldPipeline(tiny_pipe, hold_at=2)
    controller = Controller(pipeline=held, runner=ThreadRunner(), previews=False, progress_interval=0)
    events = Recorder()
    controller.subscribe(events)
    running = controller.submit(image, steps=5, guidance_scale=1.0)
    assert held.held.wait(WAIT)
    waiting = controller.submit(image, steps=5, guidance_scale=1.0)
    controller.cancel()
    (cancelling,) = events.of(Cancelling)
    assert cancelling.jobs == (running, waiting)
    assert waiting.future.cancelled()
    held.release.set()
    result = running.future.result(WAIT)
    assert result.cancelled and not result.images and held.steps == [1, 2]  # stopped after the step it was in
    (stopped,) = events.of(Cancelled, running)
    assert (stopped.step, stopped.total, stopped.ran, stopped.idle) == (2, 6, True, True)
    # "Cancelling" comes before each job's own last word.
    assert events.index(cancelling) < events.index(stopped)
    assert controller.join(WAIT) and not controller.busy and not tiny_pipe.lock.locked()
    controller.close()


def test_cancel_with_nothing_running_says_nothing(tiny_pipe):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner())
    events = Recorder()
    controller.subscribe(events)
    controller.cancel()
    assert events == []


def test_cancel_while_loading_stops_before_the_first_step_and_keeps_the_model(tiny_pipe, image, monkeypatch):
    loading, finish = threading.Event(), threading.Event()

    def slow_load(cls, preset=None, *, on_status=None, **options):
        on_status("Loading Stable Diffusion…")
        loading.set()
        assert finish.wait(WAIT)
        return tiny_pipe

    monkeypatch.setattr(ImagePromptPipeline, "from_preset", classmethod(slow_load))
    controller = Controller("tiny", runner=ThreadRunner())
    events = Recorder()
    controller.subscribe(events)
    job = controller.submit(image, **FAST)
    assert loading.wait(WAIT)
    assert [e.message for e in events.of(Loading)] == [
        "Loading model 'tiny' (built on this machine, random weights)…",  # tiny_pipe built it already
        "Loading Stable Diffusion…",
    ]
    controller.cancel()
    finish.set()
    assert job.future.result(WAIT) is None
    assert events.of(Started) == [] and events.of(Step) == []
    (cancelled,) = events.of(Cancelled)
    assert (cancelled.step, cancelled.total, cancelled.ran) == (0, None, True)
    assert controller.pipeline is tiny_pipe  # the load is kept: the next run starts at once
    again = controller.submit(image, **FAST).future.result(WAIT)
    assert same_pixels(again.images[0], solo(tiny_pipe, image, **FAST).images[0])
    controller.close()


def test_cancel_while_waiting_for_another_controllers_run_never_steps(tiny_pipe, image):
    held = HeldPipeline(tiny_pipe, hold_at=1)
    busy = Controller(pipeline=held, runner=ThreadRunner(), previews=False)
    holding = busy.submit(image, **FAST)
    assert held.held.wait(WAIT)  # the pipeline's run lock is now held by the other controller's run
    controller = Controller(pipeline=tiny_pipe, runner=ThreadRunner())
    events = Recorder()
    waited = threading.Event()
    controller.subscribe(events)
    controller.subscribe(lambda event: waited.set() if isinstance(event, Waiting) else None)
    job = controller.submit(image, **FAST)
    assert waited.wait(WAIT)
    controller.cancel()
    assert job.future.result(WAIT) is None  # left the wait at once, while the other run still holds the lock
    assert held.active == 1 and events.names(job) == ["Waiting", "Cancelled"]
    held.release.set()
    assert same_pixels(holding.future.result(WAIT).images[0], solo(tiny_pipe, image, **FAST).images[0])
    for each in (busy, controller):
        assert each.join(WAIT)
        each.close()
    assert not tiny_pipe.lock.locked()


@pytest.mark.slow
def test_two_controllers_on_one_cached_pipeline_take_turns_and_equal_their_solo_runs(tiny_pipe, image):
    other = sample_image(1)
    runs = [({"seed": 1, "steps": 2}, image), ({"seed": 2, "steps": 3, "mode": "single"}, other)]
    expected = [solo(tiny_pipe, img, **settings).images[0] for settings, img in runs]
    held = HeldPipeline(tiny_pipe)
    controllers = [Controller(pipeline=held, runner=ThreadRunner(), preview_interval=0) for _ in runs]
    for _ in range(2):  # and again, so a run leaves no state behind that changes the next one
        jobs = [c.submit(img, **settings) for c, (settings, img) in zip(controllers, runs)]
        for job, want in zip(jobs, expected):
            assert same_pixels(job.future.result(WAIT).images[0], want)
    assert held.max_active == 1 and held.runs == 4
    for controller in controllers:
        controller.close()


# -- tasks --------------------------------------------------------------------------------------------


def test_a_task_reports_progress_and_stops_when_cancelled(tiny_pipe):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner(), progress_interval=0)
    events = Recorder()
    controller.subscribe(events)
    controller.subscribe(lambda e: controller.cancel() if isinstance(e, Step) and e.step == 2 else None)
    done: list[int] = []

    def count(task):
        assert task.pipeline is tiny_pipe and tiny_pipe.lock.locked()  # it runs holding the pipeline
        task.start(5)
        for unit in range(1, 6):
            task.check()
            done.append(unit)
            task.advance(unit)
        return "finished"

    job = controller.submit_task(count, label="Counting")
    assert job.future.result(WAIT) is None and done == [1, 2]
    assert events.names(job) == ["Started", "Step", "Step", "Cancelled"]
    assert events.of(Cancelling)[0].jobs == (job,)
    assert (events.of(Cancelled)[0].step, events.of(Cancelled)[0].total) == (2, 5)
    assert job.kind == "Counting" and not tiny_pipe.lock.locked()
    plain = controller.submit_task(lambda task: 42)
    assert plain.future.result(WAIT) == 42 and events.of(Finished)[-1].result == 42


def test_unet_steps_count_a_replays_unet_calls_and_cancel_lands_within_one(tiny_pipe, image):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner(), progress_interval=0)
    events = Recorder()
    controller.subscribe(events)
    total = Controller.step_plan(tiny_pipe, GenerationSettings(steps=3)).total

    def replay(task):
        with task.unet_steps(2 * total):
            return [tiny_pipe.sd(prompt_embeds=torch.zeros(1, 77, 32), num_inference_steps=3, guidance_scale=1.0,
                                 output_type="latent").images for _ in range(2)]

    job = controller.submit_task(replay, label="Replay")
    assert len(job.future.result(WAIT)) == 2
    assert [s.step for s in events.of(Step, job)] == list(range(1, 2 * total + 1))
    stop_at = 3
    controller.subscribe(lambda e: controller.cancel() if isinstance(e, Step) and e.step == stop_at else None)
    calls = []
    handle = tiny_pipe.sd.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        stopped = controller.submit_task(replay, label="Replay")
    finally:
        handle.remove()
    assert stopped.future.result(WAIT) is None and len(calls) == stop_at  # the next UNet call never ran
    assert events.of(Cancelled, stopped)[0].step == stop_at


# -- the honest total ---------------------------------------------------------------------------------


def _steps_seen(pipe, image, **settings):
    controller = Controller(pipeline=pipe, runner=InlineRunner(), previews=False, progress_interval=0)
    events = Recorder()
    controller.subscribe(events)
    structure = settings.pop("structure_image", None)
    controller.submit(image, structure_image=structure, **settings).future.result(WAIT)
    (started,) = events.of(Started)
    return started, [(s.step, s.total) for s in events.of(Step)]


@pytest.mark.parametrize(
    "settings, total",
    [
        ({"steps": 3}, 4),  # PNDM: a warm-up step more
        ({"steps": 4, "structure": "img2img", "strength": 0.5}, 3),  # the last 2 of 4, plus the warm-up
        ({"steps": 5, "structure": "img2img", "strength": 0.75}, 4),  # int(5 * 0.75) = 3, plus the warm-up
        ({"steps": 3, "structure": "edges"}, 4),
    ],
)
def test_the_total_is_what_runs(tiny_pipe, image, settings, total):
    started, seen = _steps_seen(tiny_pipe, image, guidance_scale=1.0, **settings)
    assert started.total_steps == total
    assert seen == [(step, total) for step in range(1, total + 1)]


@pytest.mark.parametrize("preset", ["tiny-variations", "tiny-ip-adapter", "tiny-caption"])
def test_the_total_is_what_runs_for_every_offline_method(preset, image):
    pipe = ImagePromptPipeline.from_preset(preset)
    started, seen = _steps_seen(pipe, image, steps=3, guidance_scale=1.0)
    assert seen == [(step, started.total_steps) for step in range(1, started.total_steps + 1)]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_schedulers_without_a_warm_up_run_exactly_the_steps_asked(tiny_pipe, image, scheduler):
    from imageprompt_widgets.engine.samplers import scheduler_for

    started, seen = _steps_seen(tiny_pipe, image, steps=3, guidance_scale=1.0, scheduler=scheduler)
    assert (started.total_steps, started.reason) == (3, "")
    assert seen == [(1, 3), (2, 3), (3, 3)]
    img2img = planned_steps(scheduler_for(scheduler, tiny_pipe.sd.scheduler), 10, structure="img2img", strength=0.35)
    assert (img2img.total, img2img.reason) == (3, "img2img with strength 0.35 runs the last 3 of 10 steps.")


def test_a_closed_controller_refuses_new_jobs(tiny_pipe, image):
    controller = Controller(pipeline=tiny_pipe, runner=ThreadRunner())
    controller.close()
    with pytest.raises(RuntimeError, match="closed"):
        controller.submit(image, **FAST)


def test_job_cancelled_is_what_check_raises(tiny_pipe):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner())
    seen = []

    def task(context):
        context.cancel.set()
        try:
            context.check()
        except JobCancelled:
            seen.append("raised")
            raise

    assert controller.submit_task(task).future.result(WAIT) is None and seen == ["raised"]


def test_a_structure_run_loads_its_controlnets_before_started_and_adapter_images_reach_the_engine(
    tiny_pipe, image, monkeypatch
):
    loads, seen = [], {}
    real_load = tiny_pipe.load_structure

    def load_structure(settings, on_status=None):
        loads.append(settings.structure)
        on_status("Loading the ControlNet…")
        real_load(settings, on_status)

    monkeypatch.setattr(tiny_pipe, "load_structure", load_structure)
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner())
    events = Recorder()
    controller.subscribe(events)
    job = controller.submit(image, steps=1, structure="edges")
    assert job.future.result(WAIT).images
    names = events.names(job)
    assert loads == ["edges"] and names.index("Loading") < names.index("Started")

    class Recording(HeldPipeline):
        def generate(self, images, settings=None, **kwargs):
            seen.update(kwargs)
            return super().generate(images, settings, **{**kwargs, "adapter_images": None})

    controller = Controller(pipeline=Recording(tiny_pipe), runner=InlineRunner())
    controller.submit(image, steps=1, adapter_images=[[image]]).future.result(WAIT)
    assert seen["adapter_images"] == [[image]]  # handed to the engine as given; generate() checks it


def test_traced_attention_and_latents_are_asked_for_through_the_controller(tiny_pipe, image):
    controller = Controller(pipeline=tiny_pipe, runner=InlineRunner())
    result = controller.submit(image, steps=2, trace_attention=True, trace_latents=True).future.result(WAIT)
    assert result.trace.attention_maps is not None and result.trace.latents is not None
    plain = controller.submit(image, steps=2).future.result(WAIT)
    assert plain.trace.attention_maps is None and plain.trace.latents is None
