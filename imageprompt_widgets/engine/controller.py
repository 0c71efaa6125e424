"""The headless controller every face drives: one pipeline, a queue of one, cancel, throttled events.

The panel, the command line and scripts all need the same things around :meth:`ImagePromptPipeline.generate`:
load the model on first use (telling what it does, download bytes included), run one job at a time with
at most one waiting (a newer press replaces the waiting one), cancel while waiting, loading or stepping,
report progress and previews a few times a second rather than on every step, and hand back the result.
A :class:`Controller` does exactly that and reports through small event dataclasses delivered to
subscribed callbacks; the faces only render them. It never imports ipywidgets.

Events of one job arrive in order: ``Queued`` (only when it has to wait for this controller's current
job), ``Loading`` (first use), ``Waiting`` (another controller is running on the same cached pipeline),
``Started``, ``Step``/``Preview`` (throttled; the last step always), then exactly one of ``Finished``,
``Cancelled`` or ``Failed``. ``Cancelling`` (when :meth:`Controller.cancel` stops something) and
``BusyChanged`` are about the controller as a whole. Delivery happens on the thread the job runs on (the
runner's worker, or the caller with :class:`~imageprompt_widgets.engine.runners.InlineRunner`); a subscriber
that raises is reported (``SubscriberFailed`` and the log) and the job goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..loading.availability import Availability, availability, loading_message
from ..loading.downloads import DownloadCancelled, DownloadProgress, watch_downloads
from ..loading.lora import describe
from ..presets import Preset, resolve_preset
from ..settings import GenerationSettings
from .concurrency import CancelEvent
from .runners import Runner, default_runner
from .samplers import scheduler_for
from .schedule import StepPlan, planned_steps

logger = logging.getLogger(__name__)

#: Seconds between preview images (a few per second: Jupyter drops output above ~1000 messages/s).
PREVIEW_INTERVAL = 0.25
#: Seconds between progress events (steps, download bytes): at most ~20 a second.
PROGRESS_INTERVAL = 1 / 20


class JobCancelled(Exception):
    """Raised by :meth:`TaskContext.check` inside a task to stop it; the job ends as ``Cancelled``."""


@dataclass(eq=False)
class Job:
    """One submitted piece of work: a generation (``kind="generate"``) or a task (``kind`` = its label).

    What a generation runs is frozen at submission (``settings``, ``images``, …). ``step``/``total``/
    ``seconds`` follow the run; ``future`` resolves with the result (or ``None`` when stopped before it
    began), or is cancelled when the job was dropped from the queue.
    """

    kind: str
    settings: GenerationSettings | None = None
    images: list[Any] = field(default_factory=list)
    negatives: list[Any] = field(default_factory=list)
    structure_image: Any = None
    adapter_images: Any = None  # per IP-Adapter image lists (None: the inputs for every adapter)
    trace_latents: bool = False
    trace_attention: bool = False
    task: Callable[[TaskContext], Any] | None = None
    on_end: Callable[[Event], None] | None = None  # called with the job's last event, before join() returns
    cancel: CancelEvent = field(default_factory=CancelEvent)
    future: Future | None = None
    id: int = field(default_factory=itertools.count(1).__next__)
    step: int = 0
    total: int | None = None
    seconds: float = 0.0
    began: bool = False  # the runner started it
    ended: bool = False  # its last event is on its way (it no longer makes the controller busy)

    @property
    def steps_per_second(self) -> float:
        return self.step / self.seconds if self.seconds > 0 else 0.0

    def __repr__(self) -> str:
        return f"Job(#{self.id} {self.kind}, step {self.step}/{self.total}, ended={self.ended})"


# -- events ------------------------------------------------------------------------------------------


class Event:
    """Base of everything a controller reports."""


@dataclass(frozen=True)
class Queued(Event):
    """``job`` waits for this controller's current job; ``replaced`` is the waiting job it pushed out."""

    job: Job
    replaced: Job | None = None


@dataclass(frozen=True)
class Loading(Event):
    """A sentence about loading the model; ``download`` while the Hub downloads its files."""

    job: Job
    message: str
    download: DownloadProgress | None = None


@dataclass(frozen=True)
class Waiting(Event):
    """``job`` waits for another run on the same cached pipeline (another panel, a script)."""

    job: Job


@dataclass(frozen=True)
class Started(Event):
    """The job holds the pipeline; ``total_steps`` is what will run, fixed for the whole run.

    ``reason`` is one sentence when it differs from the ``requested_steps`` (PNDM's warm-up, img2img).
    """

    job: Job
    total_steps: int
    requested_steps: int
    reason: str = ""


@dataclass(frozen=True)
class Step(Event):
    """Progress (throttled; the last step always arrives)."""

    job: Job
    step: int
    total: int
    seconds: float

    @property
    def steps_per_second(self) -> float:
        return self.step / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Preview(Event):
    """JPEG bytes of the current clean-image estimate (x0), one per image in the batch (throttled)."""

    job: Job
    step: int
    total: int
    jpegs: tuple[bytes, ...]


@dataclass(frozen=True)
class Finished(Event):
    """The job's result (a ``GenerationResult`` for generations, the task's return value otherwise)."""

    job: Job
    result: Any
    idle: bool  # no other job of this controller is pending


@dataclass(frozen=True)
class Cancelled(Event):
    """Stopped: after ``step`` of ``total`` steps (``total`` is None when it never started stepping).

    ``ran`` is False for a job dropped from the queue before it began; ``interrupted`` is the kernel's
    stop button (``KeyboardInterrupt``) rather than :meth:`Controller.cancel`.
    """

    job: Job
    step: int
    total: int | None
    idle: bool
    ran: bool = True
    interrupted: bool = False


@dataclass(frozen=True)
class Failed(Event):
    """The job raised ``error`` (its future raises it too)."""

    job: Job
    error: BaseException
    idle: bool


@dataclass(frozen=True)
class Cancelling(Event):
    """:meth:`Controller.cancel` is stopping these jobs; each still ends with its own last event."""

    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class BusyChanged(Event):
    """The controller went from idle to busy or back (delivered in order, so a face can enable buttons)."""

    busy: bool


@dataclass(frozen=True)
class SubscriberFailed(Event):
    """A subscriber raised ``error`` while handling ``event``; the job went on."""

    error: BaseException
    event: Event
    details: str


Subscriber = Callable[[Event], None]


# -- tasks -------------------------------------------------------------------------------------------


class TaskContext:
    """What a task submitted with :meth:`Controller.submit_task` gets: the pipeline, cancel, progress."""

    def __init__(self, controller: Controller, job: Job, pipeline: Any) -> None:
        self._controller = controller
        self.job = job
        self.pipeline = pipeline
        self.cancel = job.cancel
        self._progress = controller._throttle(controller.progress_interval)
        self._started_at = controller._clock()

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the job was cancelled (call it between units of work)."""
        if self.cancel.is_set():
            raise JobCancelled

    def start(self, total: int) -> None:
        """Announce ``total`` units of work (e.g. UNet steps over all images): the ``Started`` event."""
        self.job.total = total
        self._controller._emit(Started(self.job, total, total))

    def advance(self, done: int) -> None:
        """``done`` units finished (throttled ``Step`` events; the last one always)."""
        job = self.job
        job.step, job.seconds = done, self._controller._clock() - self._started_at
        total = job.total if job.total is not None else done
        if self._progress(done >= total):
            self._controller._emit(Step(job, done, total, job.seconds))

    def step_callback(self, offset: int = 0) -> Callable[[Any], None]:
        """An ``on_step`` for ``pipe.generate`` inside the task: its steps count from ``offset``."""
        return lambda info: self.advance(offset + info.step)

    @contextlib.contextmanager
    def unet_steps(self, total: int) -> Iterator[None]:
        """Count the pipeline's UNet calls in this block as ``total`` steps, and stop at the next call once
        cancelled: progress and cancel for replays that call the UNet themselves (one call per step,
        classifier-free guidance batched into one), without threading callbacks through them."""
        done = [0]

        def before(module: Any, args: Any) -> None:
            self.check()

        def after(module: Any, args: Any, output: Any) -> None:
            done[0] += 1
            self.advance(min(done[0], total))

        self.start(total)
        unet = self.pipeline.sd.unet
        handles = [unet.register_forward_pre_hook(before), unet.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def say(self, message: str) -> None:
        """A sentence about what the task does now (a ``Loading`` event: faces show it in their status)."""
        self._controller._emit(Loading(self.job, message))


# -- the controller ----------------------------------------------------------------------------------


def preset_availability(preset: Preset) -> Availability:
    """What this machine has of a preset (downloaded, built, shipped with the package): the faces ask here,
    never the loader."""
    return availability(preset)


class Controller:
    """Owns one pipeline — a preset or folder loaded on first use, or a given ``ImagePromptPipeline`` —
    and runs generations and tasks on it, one at a time, with at most one waiting.

    ``runner``: where jobs run (a worker thread by default, inline on Colab; tests pass ``InlineRunner``).
    ``previews``: whether steps produce ``Preview`` events (``preview`` is ``"auto"``, ``"linear"`` or
    ``"taesd"``, ``taesd`` a local AutoencoderTiny folder). ``clock`` drives the throttling (tests inject
    one). ``device``/``dtype``/``safety_checker``/``allow_pickle`` are passed to the loader.
    """

    def __init__(
        self,
        model: str | Preset | None = None,
        *,
        pipeline: Any = None,
        runner: Runner | None = None,
        previews: bool = True,
        preview: str = "auto",
        taesd: str | None = None,
        preview_interval: float = PREVIEW_INTERVAL,
        progress_interval: float = PROGRESS_INTERVAL,
        device: Any = None,
        dtype: Any = None,
        safety_checker: bool | None = None,
        allow_pickle: bool = False,
        memory: str | None = None,
        loras: Sequence[tuple[str, float]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from .preview import PREVIEW_KINDS

        if preview not in PREVIEW_KINDS:
            raise ValueError(f"preview={preview!r} is not one of {', '.join(PREVIEW_KINDS)}.")
        self._preset = None if pipeline is not None else resolve_preset(model)  # unknown names fail here, at once
        self._pipeline = pipeline
        self._load_options = {"device": device, "dtype": dtype, "safety_checker": safety_checker,
                              "allow_pickle": allow_pickle, **({"memory": memory} if memory else {})}
        self._loras = tuple(loras)  # (source, weight) loaded into the pipeline right after it loads
        self.runner = runner or default_runner()
        self.previews, self.preview_kind, self.taesd = previews, preview, taesd
        self.preview_interval, self.progress_interval = preview_interval, progress_interval
        self._clock = clock
        self._decoder: tuple[Any, Any] | None = None  # (pipeline, its preview decoder)
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._pending: list[Job] = []  # submission order: the running job first, then at most one waiting
        self._subscribers: list[Subscriber] = []
        self._closed = False

    # -- state ------------------------------------------------------------------------------------

    @property
    def pipeline(self) -> Any:
        """The pipeline in use; ``None`` until the first job loads it."""
        return self._pipeline

    @property
    def preset(self) -> Preset | None:
        """The preset it loads (or the given pipeline's)."""
        return self._preset if self._preset is not None else getattr(self._pipeline, "preset", None)

    def loras_line(self) -> str | None:
        """The loaded model's LoRAs in one line (``"LoRA: style 0.8"``), ``None`` when it has none."""
        loras = list(getattr(self._pipeline, "loras", ()) or ())
        return describe(loras) if loras else None

    @property
    def background(self) -> bool:
        """Whether jobs run off the caller's thread (``submit`` returns before they end)."""
        return bool(getattr(self.runner, "background", False))

    @property
    def busy(self) -> bool:
        """Whether a job is running or waiting (one whose last event is on its way no longer counts)."""
        with self._lock:
            return self._busy()

    @property
    def jobs(self) -> tuple[Job, ...]:
        """The pending jobs: the running one (or the next to run) first."""
        with self._lock:
            return tuple(job for job in self._pending if not job.ended)

    def default_settings(self) -> GenerationSettings:
        """The library defaults with the preset's own applied (e.g. the variations model's ``single``/``zeros``)."""
        preset = self.preset
        return GenerationSettings.from_kwargs(**dict(preset.defaults if preset else ()))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every event from now on; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is pending and every last event was delivered; False if ``timeout`` passed."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    # -- submitting -------------------------------------------------------------------------------

    def submit(
        self,
        images: Any,
        settings: GenerationSettings | None = None,
        *,
        negative_image: Any = None,
        structure_image: Any = None,
        adapter_images: Any = None,
        trace_latents: bool = False,
        trace_attention: bool = False,
        **changes: Any,
    ) -> Job:
        """Queue a generation and return its :class:`Job` at once (``job.future`` resolves with the result).

        Settings are checked here, in the caller's thread: a bad value raises ``SettingsError`` before
        anything is queued. Keyword ``changes`` apply on top of ``settings`` (default: :meth:`default_settings`).
        """
        settings = settings or self.default_settings()
        if changes:
            settings = settings.replace(**changes)
        negatives = [] if negative_image is None else list(negative_image) if isinstance(negative_image, (list, tuple)) \
            else [negative_image]
        job = Job("generate", settings=settings, images=images, negatives=negatives,
                  structure_image=structure_image, adapter_images=adapter_images, trace_latents=trace_latents,
                  trace_attention=trace_attention)
        return self._enqueue(job)

    def submit_task(
        self, task: Callable[[TaskContext], Any], *, label: str = "task",
        on_end: Callable[[Event], None] | None = None,
    ) -> Job:
        """Queue ``task(context)``: engine work on this controller's pipeline, runner and queue.

        The task runs with the pipeline loaded and its run lock held. It reports with ``context.start(total)``
        and ``context.advance(done)`` (or ``context.step_callback()`` as a generation's ``on_step``, or
        ``context.unet_steps(total)`` around code that calls the UNet), passes ``context.cancel`` to what it
        calls and calls ``context.check()`` between units. Its return value is the job's result (a cancelled
        task's future still gets what it returned). ``on_end`` gets the job's last event (``Finished``,
        ``Cancelled`` or ``Failed``) right after the subscribers, on the job's thread.
        """
        return self._enqueue(Job(label, task=task, on_end=on_end))

    def cancel(self) -> None:
        """Stop the running job within one step (or before its first), and drop the waiting one."""
        with self._lock:
            jobs = [job for job in self._pending if not job.ended]
            if not jobs:
                return
            self._emit(Cancelling(tuple(jobs)))  # under the lock: before any of their own last events
            for job in jobs:
                self._drop(job)

    def close(self) -> None:
        """Cancel everything and stop the runner (its worker thread ends); the pipeline stays cached."""
        with self._lock:
            self._closed = True
        self.cancel()
        self.runner.shutdown()

    # -- the queue --------------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise RuntimeError("This controller is closed: create a new one.")
            ahead = [queued for queued in self._pending if not queued.ended]
            was_busy = bool(ahead)
            self._pending.append(job)
            if not was_busy:
                self._emit(BusyChanged(True))
            replaced = None
            for waiting in ahead[1:]:  # the one that was waiting: never two waiting
                self._drop(waiting)
                replaced = waiting
            if ahead:
                self._emit(Queued(job, replaced))
        job.future = self.runner.submit(lambda: self._run(job))
        return job

    def _drop(self, job: Job) -> None:
        """Cancel ``job``; one that never began is removed at once and reported (its future is cancelled)."""
        job.cancel.set()
        with self._lock:
            if job.future is not None and not job.began and job.future.cancel():
                self._ended(job)
                event = Cancelled(job, 0, None, idle=not self._busy(), ran=False)
                self._emit(event)
                if job.on_end is not None:
                    self._deliver(job.on_end, event)
                self._forget(job)

    def _busy(self) -> bool:
        return any(not job.ended for job in self._pending)

    def _ended(self, job: Job) -> None:
        """Mark ``job`` done (under the lock); the controller stops being busy with it."""
        job.ended = True
        if not self._busy():
            self._emit(BusyChanged(False))

    def _forget(self, job: Job) -> None:
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
            if not self._pending:
                self._idle.notify_all()

    def _end(self, job: Job, make_event: Callable[[bool], Event]) -> None:
        with self._lock:
            self._ended(job)
            idle = not self._busy()
        event = make_event(idle)
        try:
            self._emit(event)
            if job.on_end is not None:
                self._deliver(job.on_end, event)
        finally:
            self._forget(job)

    # -- running ----------------------------------------------------------------------------------

    def _run(self, job: Job) -> Any:
        job.began = True
        value: Any = None
        try:
            if job.cancel.is_set():
                self._end(job, lambda idle: Cancelled(job, 0, None, idle))
                return None
            loading_started, loaded_before = self._clock(), self._pipeline is not None
            pipe = self._load(job)
            loading = 0.0 if loaded_before else self._clock() - loading_started
            if job.cancel.is_set():  # cancelled while loading: the loaded model is kept
                self._end(job, lambda idle: Cancelled(job, 0, None, idle))
                return None
            with watch_downloads(self._download_reporter(job)):  # e.g. the ControlNet of a first edges run
                if not pipe.lock.acquire(job.cancel, on_wait=lambda: self._emit(Waiting(job))):
                    self._end(job, lambda idle: Cancelled(job, 0, None, idle))
                    return None
                try:
                    if job.task is not None:
                        value = job.task(TaskContext(self, job, pipe))
                        stopped = job.cancel.is_set()
                    else:
                        value = self._generate(job, pipe)
                        stopped = value.cancelled
                        if loading and value.timings:  # this run waited for the model to load: part of its time
                            loads = loading + value.timings.get("loading", 0.0)
                            value.timings = {"loading": loads, **value.timings,
                                             "total": value.timings["total"] + loading}
                finally:
                    pipe.lock.release()
        except (KeyboardInterrupt, DownloadCancelled, JobCancelled) as stop:
            interrupted = isinstance(stop, KeyboardInterrupt)
            self._end(job, lambda idle: Cancelled(job, job.step, job.total, idle, interrupted=interrupted))
            return value
        except BaseException as err:
            self._end(job, lambda idle, error=err: Failed(job, error, idle))
            raise
        if stopped:
            self._end(job, lambda idle: Cancelled(job, job.step, job.total, idle))
        else:
            self._end(job, lambda idle: Finished(job, value, idle))
        return value

    def _load(self, job: Job) -> Any:
        with self._lock:
            pipe = self._pipeline
        if pipe is not None:
            return pipe
        from .pipeline import ImagePromptPipeline

        preset = self._preset
        self._emit(Loading(job, loading_message(preset)))
        pipe = ImagePromptPipeline.from_preset(
            preset, **self._load_options, on_status=lambda message: self._emit(Loading(job, message)),
            on_progress=self._download_reporter(job),
        )
        for source, weight in self._loras:
            if not any(info.source == source for info in pipe.loras):
                self._emit(Loading(job, f"Loading the LoRA {source!r} at weight {weight:g}…"))
                pipe.load_lora(source, weight)
        with self._lock:
            self._pipeline = pipe
        return pipe

    def _download_reporter(self, job: Job) -> Callable[[DownloadProgress], None]:
        ready = self._throttle(self.progress_interval)
        name = self.preset.name if self.preset else "the model"

        def report(progress: DownloadProgress) -> None:
            if job.cancel.is_set():
                raise DownloadCancelled
            if ready(progress.total is not None and progress.done >= progress.total):
                self._emit(Loading(job, f"Downloading {name!r}: {progress.describe()}", progress))

        return report

    def _generate(self, job: Job, pipe: Any) -> Any:
        # A first structure run loads its ControlNets and estimators: before Started, not in it.
        pipe.load_structure(job.settings, on_status=lambda message: self._emit(Loading(job, message)))
        plan = self.step_plan(pipe, job.settings)
        job.total = plan.total
        self._emit(Started(job, plan.total, plan.requested, plan.reason))
        return pipe.generate(
            job.images,
            job.settings,
            negative_image=job.negatives or None,
            structure_image=job.structure_image,
            adapter_images=job.adapter_images,
            on_step=self._step_reporter(job, pipe),
            cancel=job.cancel,
            trace_latents=job.trace_latents,
            trace_attention=job.trace_attention,
        )

    @staticmethod
    def step_plan(pipe: Any, settings: GenerationSettings) -> StepPlan:
        """The UNet steps a run with ``settings`` takes on ``pipe`` (known before its first step)."""
        return planned_steps(scheduler_for(settings.scheduler, pipe.sd.scheduler), settings.steps,
                             structure=settings.structure, strength=settings.strength)

    def _step_reporter(self, job: Job, pipe: Any) -> Callable[[Any], None]:
        progress = self._throttle(self.progress_interval)
        previews = self._throttle(self.preview_interval)

        def on_step(info: Any) -> None:
            job.step, job.seconds = info.step, info.seconds
            last = info.step >= info.total
            if progress(last):
                self._emit(Step(job, info.step, info.total, info.seconds))
            if self.previews and not job.cancel.is_set() and previews():
                from .preview import preview_jpegs

                jpegs = preview_jpegs(info.x0(), self._preview_decoder(pipe))
                self._emit(Preview(job, info.step, info.total, tuple(jpegs)))

        return on_step

    def _preview_decoder(self, pipe: Any) -> Any:
        # Chosen again once the pipeline holds a tiny decoder (after its first decoder="tiny" run): previews use it.
        key = (pipe, getattr(pipe, "tiny_decoder_loaded", None))
        if self._decoder is None or self._decoder[0] != key:
            from .preview import decoder_for

            self._decoder = (key, decoder_for(pipe, self.preview_kind, self.taesd))
        return self._decoder[1]

    def _throttle(self, interval: float) -> Callable[..., bool]:
        """``ready(force=False)``: True at most once per ``interval`` of the controller's clock (the first
        call, and any call with ``force``, always)."""
        next_at = [float("-inf")]

        def ready(force: bool = False) -> bool:
            now = self._clock()
            if not force and now < next_at[0]:
                return False
            next_at[0] = now + interval
            return True

        return ready

    # -- delivery ---------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            self._deliver(callback, event)

    def _deliver(self, callback: Subscriber, event: Event) -> None:
        try:
            callback(event)
        except Exception as err:  # noqa: BLE001 - a face's bug must not kill the job
            details = traceback.format_exc()
            logger.error("An imageprompt subscriber failed on %s: %s", type(event).__name__, details)
            if not isinstance(event, SubscriberFailed):
                self._emit(SubscriberFailed(err, event, details))
