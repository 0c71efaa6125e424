"""Reliability of the panel and the engine: cancel storms, concurrency, lifecycle, faults, hostile uploads.

Nothing lost, nothing stuck: every future resolves (within generous timeouts, never sleeps), no exception
escapes a thread, the panel ends idle with its buttons and status consistent, earlier results survive a
failure, and the next Generate gives exactly the pixels of a solo run with the same settings.
The soak test (many generations in one panel) lives in tests/test_reliability_soak.py.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import threading
import weakref
import zlib
from concurrent.futures import Future, wait
from pathlib import Path

import ipywidgets
import pytest
import torch
from helpers import WAIT, HeldPipeline, assert_same_pixels, png_bytes, solo
from PIL import Image, ImageFile

from imageprompt_widgets import ImagePromptPipeline, ImagePromptWidget
from imageprompt_widgets.engine.pipeline import NonFiniteImageError
from imageprompt_widgets.engine.results import recipe_from_png
from imageprompt_widgets.loading.offline import sample_image
from imageprompt_widgets.widget import InlineRunner, ThreadRunner
from imageprompt_widgets.widget.inputs import uploaded_files

IPYWIDGETS_8 = int(ipywidgets.__version__.split(".")[0]) >= 8
FAST = {"steps": 2, "guidance_scale": 7.5}
CORPUS = Path(__file__).parent / "corpus"


# -- helpers ----------------------------------------------------------------------------------------


@pytest.fixture
def thread_errors(monkeypatch):
    """Every exception that escapes a thread during the test (the test fails if there is any)."""
    escaped: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    yield escaped
    assert not escaped, [f"{args.exc_type.__name__}: {args.exc_value} in {args.thread}" for args in escaped]


def browser_upload(upload: ipywidgets.FileUpload, files: list[tuple[str, bytes]], declared: int | None = None) -> None:
    """What the front end sends when files are picked, in the installed ipywidgets' wire format."""
    if IPYWIDGETS_8:
        value = [{"name": name, "type": "image/png", "size": declared or len(content), "content": memoryview(content),
                  "last_modified": 1_700_000_000_000} for name, content in files]
        upload.set_state({"value": value})
    else:  # ipywidgets 7.x: metadata and data lists plus a counter that makes the kernel rebuild .value
        metadata = [{"name": name, "type": "image/png", "size": declared or len(content), "lastModified": 0}
                    for name, content in files]
        upload.set_state(
            {"metadata": metadata, "data": [memoryview(c) for _, c in files], "_counter": upload._counter + len(files)}
        )


def wait_until_idle(widget: ImagePromptWidget) -> None:
    """Wait until the panel's controller has no run left and has said its last word (button clicks hand no
    future back)."""
    assert widget.controller.join(WAIT), "a run never ended"


def cancel_event_of(widget: ImagePromptWidget, future: Future) -> threading.Event | None:
    """The cancel event of the run behind ``future`` (None once it has ended)."""
    return next((job.cancel for job in widget.controller.jobs if job.future is future), None)


def assert_idle(widget: ImagePromptWidget, pipe) -> None:
    """What a user sees when nothing runs: Generate enabled, Cancel disabled, no run pending, lock free."""
    assert not widget.busy
    assert widget.cancel_button.disabled and not widget.generate_button.disabled
    assert widget.status != "Cancelling…", "the status must not claim a cancel is in progress when none is"
    assert pipe.lock.acquire(timeout=WAIT), "the pipeline's lock was left held"
    pipe.lock.release()


# -- cancel storms ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_cancel_storm_resolves_every_future_and_the_next_run_is_exact(tiny_pipe, image, thread_errors):
    """100 rounds of Generate then Cancel: mid-step, at once while busy, after a double press, Cancel twice,
    and at once on an idle worker."""
    counting = HeldPipeline(tiny_pipe)
    # guidance 1 runs one UNet batch per step instead of two: the same storm at half the cost
    widget = ImagePromptWidget(pipeline=counting, runner=ThreadRunner(), preview_interval=0, steps=2,
                               guidance_scale=1.0)
    widget.set_images(image)
    futures: list[Future] = []
    for press in range(100):
        widget.controls["steps"].value = 2 + press % 2
        pattern = press % 5
        if pattern == 4:  # Cancel a run that starts on an idle worker, before or during its first step
            wait_until_idle(widget)
        futures.append(widget.generate())
        if pattern == 0:  # Cancel once the run is really denoising
            cancel = cancel_event_of(widget, futures[-1])
            if cancel is not None:
                counting.wait_for_a_step(futures[-1], cancel)
        elif pattern == 2:  # a double press, then Cancel
            futures.append(widget.generate())
        widget.cancel()
        if pattern == 3:
            widget.cancel()
    _, stuck = wait(futures, timeout=WAIT)
    assert not stuck, f"{len(stuck)} of {len(futures)} futures never resolved"
    outcomes = {"never ran": 0, "stopped": 0, "finished": 0}
    for future in futures:
        if future.cancelled():
            outcomes["never ran"] += 1
            continue
        assert future.exception() is None, future.exception()
        result = future.result(WAIT)
        outcomes["stopped" if result is None or result.cancelled else "finished"] += 1
    print(f"{len(futures)} Generate presses, 100 Cancel rounds: {outcomes}; {counting.runs} reached the engine")
    assert outcomes["stopped"] >= 20  # every fifth round was cancelled mid-run
    assert outcomes["finished"] <= 1  # a cancel lands within one step; at most a run that beat the click
    assert counting.max_active == 1  # never two runs on the shared pipeline at once
    wait_until_idle(widget)
    assert_idle(widget, tiny_pipe)
    assert widget.status.startswith(("Cancelled", "Done")), widget.status
    widget.controls["steps"].value = 3
    result = widget.generate().result(WAIT)
    assert_same_pixels(result.images[0], solo(tiny_pipe, image, weights=(1.0,), steps=3, guidance_scale=1.0).images[0])
    assert widget.status.startswith("Done: 1 image") and widget.result is result
    assert_idle(widget, tiny_pipe)
    widget.close()


def test_cancel_ends_on_cancelled_even_when_the_run_stops_before_the_click_returns(tiny_pipe, image, thread_errors):
    """The worker can finish its last words before the Cancel handler returns; the status must still end
    truthful. Forced here by letting each cancelled job end inside ``cancel()``."""
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=ThreadRunner(), **FAST)
    widget.set_images(image)
    controller = widget.controller
    cancel = controller.cancel

    def cancel_and_let_them_end():
        jobs = controller.jobs
        cancel()
        wait([job.future for job in jobs], timeout=WAIT)

    controller.cancel = cancel_and_let_them_end
    future = widget.generate()
    widget.cancel()
    assert future.cancelled() or future.result(WAIT) is None or future.result(WAIT).cancelled
    wait_until_idle(widget)
    assert widget.status.startswith("Cancelled"), widget.status
    assert_idle(widget, tiny_pipe)
    widget.close()


@pytest.mark.slow
def test_double_clicked_generate_runs_twice_in_order_with_identical_pixels(tiny_pipe, image, thread_errors):
    counting = HeldPipeline(tiny_pipe)
    widget = ImagePromptWidget(pipeline=counting, runner=ThreadRunner(), **FAST)
    widget.set_images(image)
    button = widget.generate_button
    button.click()
    button.click()  # the second press queues behind the first, it does not run beside it
    assert widget.status == "Queued: starts when the current run ends." or not widget.busy
    wait_until_idle(widget)
    assert counting.runs == 2 and counting.max_active == 1
    first, second = widget.history.items[1], widget.history.items[0]
    expected = solo(tiny_pipe, image, weights=(1.0,), **FAST).images[0]
    assert_same_pixels(first.image, expected)
    assert_same_pixels(second.image, expected)
    assert widget.status.startswith("Done: 1 image")
    assert_idle(widget, tiny_pipe)
    widget.close()


@pytest.mark.slow
def test_cancel_while_weights_load_stops_before_any_step_and_keeps_the_loaded_model(
    tiny_pipe, image, monkeypatch, thread_errors
):
    loading, finish_loading = threading.Event(), threading.Event()

    def slow_load(cls, preset=None, **options):
        loading.set()
        assert finish_loading.wait(WAIT)
        return tiny_pipe

    monkeypatch.setattr(ImagePromptPipeline, "from_preset", classmethod(slow_load))
    widget = ImagePromptWidget(model="tiny", runner=ThreadRunner(), **FAST)
    widget.set_images(image)
    steps_seen: list[int] = []
    widget.progress.observe(lambda change: steps_seen.append(change["new"]), names="value")
    future = widget.generate()
    assert loading.wait(WAIT)
    assert widget.status.startswith("Loading model 'tiny'")
    widget.cancel()
    assert widget.status == "Cancelling…" and widget.busy
    finish_loading.set()
    result = future.result(WAIT)
    assert result is None or result.cancelled
    assert [step for step in steps_seen if step > 0] == []  # not one denoising step ran
    assert widget.status.startswith("Cancelled"), widget.status
    assert widget.pipeline is tiny_pipe  # the load is not thrown away: the next press starts at once
    assert widget.result is None and len(widget.history) == 0
    assert_idle(widget, tiny_pipe)
    again = widget.generate().result(WAIT)
    assert_same_pixels(again.images[0], solo(tiny_pipe, image, weights=(1.0,), **FAST).images[0])
    widget.close()


def test_cancel_while_waiting_for_another_widgets_run_never_steps(tiny_pipe, image, thread_errors):
    """Cancel pressed while this panel's run waits for the shared pipeline another panel is using."""
    other = HeldPipeline(tiny_pipe, hold_at=1)
    busy_widget = ImagePromptWidget(pipeline=other, runner=ThreadRunner(), **FAST)
    busy_widget.set_images(image)
    holding = busy_widget.generate()
    assert other.held.wait(WAIT)  # the pipeline's lock is now taken by busy_widget's run
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=ThreadRunner(), **FAST)
    widget.set_images(image)
    waiting = widget.generate()
    widget.cancel()
    other.release.set()
    assert holding.result(WAIT).images
    stopped = waiting.result(WAIT)
    assert stopped is None or (stopped.cancelled and not stopped.images and not stopped.trace.timesteps)
    assert widget.status.startswith("Cancelled"), widget.status
    assert_idle(widget, tiny_pipe)
    assert_idle(busy_widget, tiny_pipe)
    widget.close()
    busy_widget.close()


# -- concurrency ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_widgets_on_one_cached_pipeline_each_equal_their_solo_run(tiny_pipe, image, other_image, thread_errors):
    runs = [  # different seeds, step counts (scheduler timesteps) and modes, so shared state would show
        {"seed": 1, "steps": 2},
        {"seed": 2, "steps": 3},
        {"seed": 3, "steps": 2, "mode": "single"},
        {"seed": 4, "steps": 3, "guidance_scale": 1.0},
    ]
    inputs = [image, other_image, image, other_image]
    expected = [solo(tiny_pipe, img, weights=(1.0,), **run).images[0] for img, run in zip(inputs, runs)]
    counting = HeldPipeline(tiny_pipe)
    widgets = [ImagePromptWidget(pipeline=counting, runner=ThreadRunner(), **run) for run in runs]
    for widget, img in zip(widgets, inputs):
        widget.set_images(img)
    futures = [widget.generate() for widget in widgets]  # all four pressed at once
    results = [future.result(WAIT) for future in futures]
    assert counting.max_active == 1 and counting.runs == 4  # they took turns on the shared scheduler
    for result, want in zip(results, expected):
        assert_same_pixels(result.images[0], want)
    # And once more in the opposite order: no run leaves state behind that changes the next one.
    futures = [widget.generate() for widget in reversed(widgets)]
    for future, want in zip(futures, reversed(expected)):
        assert_same_pixels(future.result(WAIT).images[0], want)
    for widget in widgets:
        assert_idle(widget, tiny_pipe)
        widget.close()


def test_engine_threads_generating_at_once_match_their_solo_runs(tiny_pipe, image, thread_errors):
    seeds = [5, 6, 7]
    expected = {seed: solo(tiny_pipe, image, seed=seed, **FAST).images[0] for seed in seeds}
    got: dict[int, Image.Image] = {}
    start = threading.Barrier(len(seeds))

    def run(seed: int) -> None:
        start.wait(WAIT)
        got[seed] = tiny_pipe.generate(image, seed=seed, **FAST).images[0]

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    for seed in seeds:
        assert_same_pixels(got[seed], expected[seed])


# -- lifecycle --------------------------------------------------------------------------------------


def test_close_mid_run_stops_the_worker_and_frees_the_panel(tiny_pipe, image, thread_errors):
    counting = HeldPipeline(tiny_pipe, hold_at=1)
    widget = ImagePromptWidget(pipeline=counting, runner=ThreadRunner(), preview_interval=0, steps=20)
    widget.set_images(image)
    future = widget.generate()
    assert counting.held.wait(WAIT)
    job = weakref.ref(widget.controller.jobs[0])
    panel = weakref.ref(widget)
    worker = counting.worker
    widget.close()
    counting.release.set()
    result = future.result(WAIT)
    assert result.cancelled and not result.images  # stopped after the step it was in, nothing decoded
    worker.join(WAIT)
    assert not worker.is_alive(), "the panel's worker thread outlived close()"
    del widget, result, future
    gc.collect()
    assert job() is None, "the finished job is still referenced after close()"
    assert panel() is None, "the closed panel is still referenced (it would keep its images alive)"
    assert tiny_pipe.lock.acquire(timeout=WAIT)
    tiny_pipe.lock.release()


def displayed(widget: ipywidgets.Widget, monkeypatch) -> dict:
    """The mime bundle a notebook gets from ``display(widget)``, under ipywidgets 7 and 8."""
    from IPython.core.formatters import DisplayFormatter

    if callable(getattr(widget, "_ipython_display_", None)):  # ipywidgets 7 publishes it itself
        published: list[dict] = []
        monkeypatch.setattr(ipywidgets.widgets.widget, "display", lambda data, **_: published.append(data))
        widget._ipython_display_()
        return published[-1]
    return DisplayFormatter().format(widget)[0]


def test_redisplaying_works_and_a_closed_panel_says_so(tiny_pipe, image, monkeypatch):
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), **FAST)
    widget.set_images(image)
    first = displayed(widget, monkeypatch)
    widget.generate().result(WAIT)
    second = displayed(widget, monkeypatch)  # the same panel shown again, in another cell
    view = "application/vnd.jupyter.widget-view+json"
    assert first[view]["model_id"] == second[view]["model_id"] == widget.model_id
    assert widget.comm is not None and len(widget.history) == 1  # the same live panel, its history intact
    assert len(first["text/plain"]) < 200  # a readable line where widgets cannot render, not a tree dump
    widget.close()
    closed = displayed(widget, monkeypatch)
    assert view not in closed
    assert "closed" in closed["text/plain"] and "ImagePromptWidget(" in closed["text/plain"]


SUBPROCESS_REGENERATE = """
import hashlib, json, sys
import numpy as np
from PIL import Image
from imageprompt_widgets import GenerationSettings, ImagePromptPipeline
from imageprompt_widgets.engine.results import recipe_from_png

saved, input_path = sys.argv[1], sys.argv[2]
recipe = recipe_from_png(saved)
image = Image.open(input_path).convert("RGB")
digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
digest.update(image.tobytes())
assert recipe["inputs"] == [digest.hexdigest()[:16]], "the recipe names a different input"
pipe = ImagePromptPipeline.from_preset(recipe["model"]["preset"])
result = pipe.generate(image, GenerationSettings.from_kwargs(**recipe["settings"]))
same = np.array_equal(np.asarray(result.images[recipe["index"]]), np.asarray(Image.open(saved).convert("RGB")))
print(json.dumps({"same": same, "seed": recipe["settings"]["seed"]}))
"""


@pytest.mark.slow
def test_a_saved_png_regenerates_identically_after_a_kernel_restart(tiny_pipe, image, tmp_path):
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), seed=21, num_images=2, **FAST)
    widget.history.save_dir = tmp_path
    widget.set_images(image)
    widget.generate().result(WAIT)
    second = next(item for item in widget.history.items if item.index == 1)  # the batch's second image
    widget.history.select(second)
    saved = widget.history.save_selected()
    widget.close()
    input_path = tmp_path / "input.png"
    image.save(input_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the conftest's cache folder is inherited
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_REGENERATE, str(saved), str(input_path)],
        capture_output=True, text=True, timeout=WAIT, env=env, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"same": True, "seed": 21}
    assert recipe_from_png(saved)["index"] == 1


# -- faults -----------------------------------------------------------------------------------------


def _unet_raises(error: BaseException):
    def hook(module, args, kwargs):
        raise error
    return lambda pipe: pipe.sd.unet.register_forward_pre_hook(hook, with_kwargs=True)


def _vae_decodes_nan_in_float16(pipe):
    """What an overflowing float16 VAE gives: NaN everywhere in the decoded image."""
    def hook(module, args, output):
        return torch.full_like(output, float("nan"), dtype=torch.float16)
    return pipe.sd.vae.decoder.register_forward_hook(hook)


FAULTS = {
    "cuda-out-of-memory": (
        _unet_raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
        "Out of memory: try fewer images at once or a smaller size (images already generated are kept).",
    ),
    "cpu-memory-error": (
        _unet_raises(MemoryError()),
        "Out of memory: try fewer images at once or a smaller size (images already generated are kept).",
    ),
    "step-raises": (
        _unet_raises(RuntimeError("boom in the UNet")),
        "Generation failed (RuntimeError: boom in the UNet); details below, and the panel is still usable.",
    ),
    "nan-decoded": (
        _vae_decodes_nan_in_float16,
        ("The VAE (float16) decoded NaN values, so the images would come out black: load the model with "
         "dtype='float32' (a float32 VAE does not overflow) or try a smaller size."),
    ),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # numpy on the NaN decode
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.slow
def test_a_fault_is_one_sentence_with_a_suggestion_and_nothing_is_lost(tiny_pipe, image, fault, thread_errors):
    install, sentence = FAULTS[fault]
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=ThreadRunner(), **FAST)
    widget.set_images(image)
    good = widget.generate().result(WAIT)
    handle = install(tiny_pipe)
    try:
        failed = widget.generate()
        assert failed.exception(WAIT) is not None
    finally:
        handle.remove()
    assert widget.status == sentence
    assert "Traceback" in widget.details_text.value and widget.details.layout.display != "none"
    assert widget.result is good and len(widget.history) == 1 and widget.history.items[0].image is good.images[0]
    assert_idle(widget, tiny_pipe)
    again = widget.generate().result(WAIT)  # the panel is still usable, and exact
    assert_same_pixels(again.images[0], good.images[0])
    assert len(widget.history) == 2
    widget.close()


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_engine_refuses_to_return_black_images_from_a_nan_decode(tiny_pipe, image):
    def nan_float32(module, args, output):
        return output * float("nan")

    handle = tiny_pipe.sd.vae.decoder.register_forward_hook(nan_float32)
    try:
        with pytest.raises(NonFiniteImageError, match=r"^The VAE \(float32\) decoded NaN values") as info:
            tiny_pipe.generate(image, **FAST)
    finally:
        handle.remove()
    assert isinstance(info.value, ValueError)
    assert "lower scale or guidance_scale" in str(info.value)
    # The watch changes nothing when the decode is fine: same pixels as without it, run by hand.
    result = tiny_pipe.generate(image, **FAST)
    bare = tiny_pipe.sd(
        prompt_embeds=result.trace.prompt_embeds, negative_prompt_embeds=result.trace.negative_prompt_embeds,
        num_inference_steps=FAST["steps"], guidance_scale=FAST["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    assert_same_pixels(result.images[0], bare)


# -- offline ----------------------------------------------------------------------------------------


def test_offline_missing_weights_are_one_sentence_naming_the_model_every_time(tmp_path, monkeypatch, image):
    """tests/test_models.py proves the engine's sentence; this is the panel: no skip, no stuck state, and a
    second press answers the same way (a failed load is not cached as a broken pipeline)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    widget = ImagePromptWidget(model="sd14", runner=ThreadRunner(), **FAST)
    widget.set_images(image)
    for _ in range(2):
        assert widget.generate().exception(WAIT) is not None
        assert widget.status.startswith("Model 'CompVis/stable-diffusion-v1-4' is not in the local Hugging Face cache")
        assert "HF_HUB_OFFLINE=1" in widget.status and widget.status.count(". ") == 0
        assert widget.pipeline is None and not widget.busy and widget.cancel_button.disabled
    widget.close()


# -- uploads ----------------------------------------------------------------------------------------


def _bomb_png(side: int) -> bytes:
    """A real, valid grey PNG of side x side pixels that weighs little (zeros compress ~1000:1)."""
    row = b"\x00" * (1 + side)
    idat = zlib.compressobj(9)
    payload = b"".join(idat.compress(row) for _ in range(side)) + idat.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", payload) + chunk(b"IEND", b"")


UPLOADS = {
    "empty": ("photo.jpg", lambda: b"", None, "'photo.jpg' arrived empty"),
    "text": ("notes.png", lambda: b"just some notes\n", None, "'notes.png' is a text file, not an image"),
    "heic": ("IMG_0001.HEIC", lambda: (CORPUS / "heic-iphone.heic").read_bytes(), None,
             "'IMG_0001.HEIC' is a HEIC/HEIF image (the iPhone photo format)"),
    "huge-header": ("huge.png", lambda: (CORPUS / "png-huge-claimed-dimensions.png").read_bytes(), None,
                    "'huge.png' is too large to decode safely"),
    "over-the-limit": ("scan.png", lambda: _bomb_png(10_240), None,
                       "'scan.png' is 10240x10240 = 104,857,600 pixels, more than the limit of 100,000,000"),
    "cut-off-in-transit": ("big.jpg", lambda: png_bytes(sample_image(3))[:1000], 12 * 2**20,
                           "'big.jpg' (12.0 MB) arrived cut off (1,000 of 12,582,912 bytes)"),
}


@pytest.mark.parametrize("case", sorted(UPLOADS))
@pytest.mark.slow
def test_a_hostile_upload_is_a_status_sentence_and_nothing_changes(panel_with_result, case, monkeypatch):
    widget, good = panel_with_result
    name, make, declared, says = UPLOADS[case]
    content = make()
    inputs_before, history_before = list(widget.inputs.images), len(widget.history)
    decoded: list[tuple[int, int]] = []  # the size of every picture Pillow decodes from here on
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    browser_upload(widget.upload, [(name, content)], declared=declared)
    assert says in widget.status, widget.status
    assert widget.status_line.value.count("#b00020") == 1  # shown as an error
    assert widget.inputs.images == inputs_before and len(widget.history) == history_before
    assert not any(file.content for file in uploaded_files(widget.upload.value))  # the bytes are dropped
    # Nothing was decoded beyond the pixel limit (the 100 MP bomb would take 100+ MB and seconds to decode):
    # refusing is a look at the header, or at most a decode of the few bytes that arrived.
    assert all(width * height <= 100_000_000 for width, height in decoded), decoded
    assert widget.generate().result(WAIT).images[0].size == good.images[0].size  # still usable


@pytest.fixture
def panel_with_result(tiny_pipe, image):
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), **FAST)
    widget.set_images(image)
    good = widget.generate().result(WAIT)
    yield widget, good
    widget.close()


def test_set_images_with_a_decompression_bomb_refuses_it_before_decoding(tiny_pipe, tmp_path, image):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(10_240))
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), **FAST)
    widget.set_images(image)
    with pytest.raises(ValueError, match="more than the limit"):
        widget.set_images(str(path))
    assert widget.status.startswith("'bomb.png' is 10240x10240")
    assert len(widget.inputs.items) == 1  # the inputs it had stay
    widget.close()


def test_fingerprint_used_by_the_restart_check_matches_the_engine(tiny_pipe, image):
    """The subprocess check above recomputes the recipe's input fingerprint by hand; pin that it is right."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    assert solo(tiny_pipe, image, steps=1).recipe["inputs"] == [digest.hexdigest()[:16]]
