"""Soak: many generations in one panel on the tiny preset, the way a class uses a demo for an hour.

Resident memory, threads, live widgets and the history must level off instead of growing with every run.
The bounds are generous (a loaded CI machine, allocator noise); a leak of one image, one widget tree or
one thread per run is far above them. The measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import gc
import threading

import ipywidgets
import pytest
from helpers import WAIT

from imageprompt_widgets import ImagePromptWidget
from imageprompt_widgets.widget import ThreadRunner

RUNS = 200
HISTORY = 48  # the panel's default history_size
WARM_UP = HISTORY + 6  # runs before the baseline: caches, allocator arenas and the history fill up first
#: RSS growth allowed from run WARM_UP to run RUNS. One 64x64 result kept per run would be ~2.5 MB of
#: pixels plus tensors; a leaked trace (latents, embeddings) or widget tree per run is far more.
RSS_GROWTH = 80 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def live_widgets() -> int:
    from ipywidgets.widgets import widget

    return len(getattr(widget, "_instances", None) or ipywidgets.Widget.widgets)


@pytest.mark.slow
def test_soak_many_generations_memory_threads_and_history_stay_bounded(tiny_pipe, image):
    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=ThreadRunner(), steps=1,
                               guidance_scale=1.0, height=64, width=64)
    widget.set_images(image)
    assert widget.history.max_items == HISTORY
    threads_before = threading.active_count()
    samples: dict[int, tuple[int, int, int]] = {}
    for run in range(1, RUNS + 1):
        widget.controls["seed"].value = run
        result = widget.generate().result(WAIT)
        assert result.images and result.settings.seed == run
        if run in (WARM_UP, RUNS // 2, RUNS):
            gc.collect()
            samples[run] = (rss_bytes(), threading.active_count(), live_widgets())
    (rss_warm, threads_warm, widgets_warm) = samples[WARM_UP]
    (rss_end, threads_end, widgets_end) = samples[RUNS]
    growth = rss_end - rss_warm
    print(
        f"soak: {RUNS} runs; RSS "
        f"{rss_warm / 2**20:.0f} -> {samples[RUNS // 2][0] / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB "
        f"(+{growth / 2**20:.1f} MiB after warm-up); threads {threads_before} -> {threads_end}; "
        f"live widgets {widgets_warm} -> {widgets_end}; history {len(widget.history)} items, "
        f"{widget.history.nbytes / 2**20:.1f} MiB"
    )
    assert growth < RSS_GROWTH, f"RSS grew {growth / 2**20:.0f} MiB over {RUNS - WARM_UP} runs"
    # The panel's one worker, plus tqdm's monitor thread (started once by diffusers' progress bar).
    assert threads_end == threads_warm <= threads_before + 2
    assert widgets_end == widgets_warm  # evicted history tiles are closed, not leaked
    assert len(widget.history) == HISTORY and len(widget.history.strip.children) == HISTORY
    assert [item.seed for item in widget.history.items] == list(range(RUNS, RUNS - HISTORY, -1))
    assert not widget.busy and widget.status.startswith("Done: 1 image")
    workers = [thread for thread in threading.enumerate() if thread.name.startswith("imageprompt")]
    assert len(workers) == 1
    widget.close()
    workers[0].join(WAIT)
    assert not workers[0].is_alive()  # close() ended the worker
