"""Download progress while a model loads, offline: the Hub's own ``http_get`` against a local HTTP server.

The bytes pass through the same huggingface_hub code a real first load runs (its progress bar class, its
chunk loop), just from 127.0.0.1. Nothing here reaches the network.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import WAIT, local_server
from huggingface_hub import constants, file_download
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
from huggingface_hub.utils import tqdm as hub_tqdm

from imageprompt_widgets import ImagePromptPipeline, ImagePromptWidget
from imageprompt_widgets.engine.controller import Cancelled, Controller, Loading, Started
from imageprompt_widgets.engine.runners import InlineRunner
from imageprompt_widgets.loading.cache import translate_load_errors
from imageprompt_widgets.loading.downloads import DownloadCancelled, DownloadProgress, watch_downloads
from imageprompt_widgets.loading.offline import sample_image

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
CHUNK = 64 * 1024
FILE = "/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def hub(monkeypatch):
    """A local "Hub", read in 64 kB chunks, with the Hub's offline switch off for it."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only this process's requests to 127.0.0.1
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    with local_server() as server:
        yield server


@pytest.fixture
def url(hub):
    """The local Hub's one 1 MiB file, sent as fast as it goes."""
    return hub.serve(FILE, PAYLOAD, content_type="application/octet-stream")


@pytest.fixture
def hidden_bars():
    """What the loaders do while loading (loading/quiet.py): the Hub's bars are switched off."""
    disable_progress_bars()
    yield
    enable_progress_bars()


def download(url: str) -> io.BytesIO:
    """One file through the Hub's own downloader (what hf_hub_download runs for each file)."""
    buffer = io.BytesIO()
    file_download.http_get(url, buffer, expected_size=len(PAYLOAD))
    return buffer


def test_bytes_total_and_time_left_come_from_the_hubs_own_download_with_its_bars_hidden(url, hidden_bars):
    original = (hub_tqdm.__init__, hub_tqdm.update)
    seen: list[DownloadProgress] = []
    with watch_downloads(seen.append):
        assert download(url).getvalue() == PAYLOAD
    assert (hub_tqdm.__init__, hub_tqdm.update) == original  # the hook is gone outside the watch
    assert [p.done for p in seen] == list(range(0, len(PAYLOAD) + 1, CHUNK))
    assert {p.total for p in seen} == {len(PAYLOAD)}
    assert seen[-1].fraction == 1.0 and seen[-1].seconds_left in (None, 0.0)
    middle = seen[len(seen) // 2]
    assert middle.rate == middle.done / middle.seconds
    assert middle.seconds_left == pytest.approx((len(PAYLOAD) - middle.done) / middle.rate)
    seen.clear()
    download(url)  # no watch: nothing reports
    assert seen == []


def test_raising_download_cancelled_stops_at_the_next_chunk_through_the_loaders_error_handling(url, hidden_bars):
    seen: list[int] = []

    def stop_after_three_chunks(progress: DownloadProgress) -> None:
        seen.append(progress.done)
        if progress.done >= 3 * CHUNK:
            raise DownloadCancelled

    buffer = io.BytesIO()
    # translate_load_errors turns every Exception into a ModelLoadError: a cancel must pass through it.
    with pytest.raises(DownloadCancelled), watch_downloads(stop_after_three_chunks), \
            translate_load_errors("a/model", allow_pickle=False):
        file_download.http_get(url, buffer, expected_size=len(PAYLOAD))
    assert seen[-1] == 3 * CHUNK and buffer.tell() == 2 * CHUNK  # the third chunk was never written


def test_a_snapshots_aggregate_bar_counts_files_downloaded_on_other_threads(url, hidden_bars):
    """diffusers loads through snapshot_download: one aggregate byte bar (plus a ``.transfer`` twin that
    must not count twice) made in the loading thread, files downloaded by a thread pool feeding it, the
    total growing as each file starts. Mirrors huggingface_hub 2.4's ``_AggregatedTqdm``."""
    seen: list[DownloadProgress] = []
    with watch_downloads(seen.append):
        kwargs = {"unit": "B", "unit_scale": True, "total": 0, "initial": 0}
        transfer = hub_tqdm(name="huggingface_hub.snapshot_download.transfer", **kwargs)
        aggregate = hub_tqdm(name="huggingface_hub.snapshot_download", **kwargs)

        class Aggregated:
            def __init__(self, *args, total=None, initial=0, **kwargs):
                aggregate.total = (aggregate.total or 0) + total
                transfer.total = (transfer.total or 0) + total

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

            def update(self, n=1):
                aggregate.update(n)

            def update_transfer(self, n=1):
                transfer.update(n)

        def fetch(_: int) -> None:
            file_download.http_get(url, io.BytesIO(), expected_size=len(PAYLOAD), tqdm_class=Aggregated)

        with ThreadPoolExecutor(2) as pool:  # no context is copied into these threads
            list(pool.map(fetch, range(2)))
    assert seen[-1].done == seen[-1].total == 2 * len(PAYLOAD)
    assert max(p.done for p in seen) == 2 * len(PAYLOAD)  # the transfer bar was not counted too


def fake_first_load(tiny_pipe, url, loaded: list):
    """``from_preset`` as a first load sees it: the Hub downloads a file (for real, from 127.0.0.1), then
    the weights load."""

    def from_preset(cls, preset=None, *, on_status=None, on_progress=None, **options):
        with watch_downloads(on_progress):
            download(url)
        loaded.append(preset)
        return tiny_pipe

    return classmethod(from_preset)


def test_the_controller_reports_download_bytes_while_loading(tiny_pipe, url, hidden_bars, monkeypatch):
    loaded: list = []
    monkeypatch.setattr(ImagePromptPipeline, "from_preset", fake_first_load(tiny_pipe, url, loaded))
    controller = Controller("sd14", runner=InlineRunner(), progress_interval=0)
    events: list = []
    controller.subscribe(events.append)
    result = controller.submit(sample_image(0), steps=2).future.result(WAIT)
    assert result.images and loaded
    downloads = [e for e in events if isinstance(e, Loading) and e.download is not None]
    assert [e.download.done for e in downloads] == list(range(0, len(PAYLOAD) + 1, CHUNK))
    assert downloads[-1].message.startswith("Downloading 'sd14': 1.0 MB of 1.0 MB")
    assert events.index(downloads[-1]) < next(i for i, e in enumerate(events) if isinstance(e, Started))


def test_cancel_during_a_download_stops_it_and_the_next_press_starts_again(tiny_pipe, url, hidden_bars, monkeypatch):
    loaded: list = []
    monkeypatch.setattr(ImagePromptPipeline, "from_preset", fake_first_load(tiny_pipe, url, loaded))
    controller = Controller("sd14", runner=InlineRunner(), progress_interval=0)
    events: list = []
    controller.subscribe(events.append)
    controller.subscribe(lambda e: controller.cancel() if isinstance(e, Loading) and e.download
                         and e.download.done >= 2 * CHUNK else None)
    job = controller.submit(sample_image(0), steps=2)
    assert job.future.result(WAIT) is None
    done = [e.download.done for e in events if isinstance(e, Loading) and e.download is not None]
    assert done[-1] == 2 * CHUNK  # the next chunk stopped the download
    assert isinstance(events[-1], Cancelled) and events[-1].total is None
    assert loaded == [] and controller.pipeline is None  # nothing half-loaded is kept
    assert not any(isinstance(e, Started) for e in events)


@pytest.mark.parametrize("chunk_delay", [0.0, 0.006], ids=["fast", "slow-network"])
def test_the_panel_shows_download_bytes_in_its_bar_and_status(tiny_pipe, hub, chunk_delay, hidden_bars, monkeypatch):
    """However fast the bytes arrive (slow-network: 6 ms a 64 kB chunk, so several pass the 50 ms throttle)."""
    url = hub.serve(FILE, PAYLOAD, content_type="application/octet-stream", chunk=CHUNK, chunk_delay=chunk_delay)
    loaded: list = []
    monkeypatch.setattr(ImagePromptPipeline, "from_preset", fake_first_load(tiny_pipe, url, loaded))
    widget = ImagePromptWidget(model="sd14", runner=InlineRunner(), steps=2)
    widget.set_images(sample_image(0))
    bar: list[tuple[int, int]] = []
    widget.progress.observe(lambda change: bar.append((widget.progress.value, widget.progress.max)), names="value")
    statuses: list[str] = []
    widget.status_line.observe(lambda change: statuses.append(widget.status), names="value")
    widget.generate().result(WAIT)
    # Bytes while downloading (throttled: how many show depends on how fast they come; the last chunk always
    # shows), only forward and in whole chunks (each update zeroes the bar first, so that a new max never
    # clamps an old value), then the steps from zero.
    downloading = bar[:bar.index((len(PAYLOAD), len(PAYLOAD))) + 1]
    done = [value for value, total in downloading if value]
    assert all(total == len(PAYLOAD) for _, total in downloading), bar
    assert done == sorted(set(done)) and all(value % CHUNK == 0 for value in done), bar
    assert bar[-1] == (3, 3) and all(entry[1] == 3 for entry in bar[bar.index((1, 3)):]), bar
    assert any(status.startswith("Downloading 'sd14': 1.0 MB of 1.0 MB") for status in statuses)
    assert widget.status.startswith("Done: 1 image")
    widget.close()


def test_from_preset_reports_downloads_to_on_progress(tiny_pipe, url, hidden_bars, monkeypatch):
    from imageprompt_widgets.engine import pipeline
    from imageprompt_widgets.loading import cache as models
    from imageprompt_widgets.loading import components as loading

    def load_components(preset, device, dtype, **options):
        download(url)
        return loading.LoadedComponents(tiny_pipe.sd, tiny_pipe.image_encoder, tiny_pipe.image_processor, preset, 0.0)

    monkeypatch.setattr(pipeline, "MODEL_CACHE", models.ModelCache())  # a first load, without touching the real cache
    monkeypatch.setattr(pipeline, "load_components", load_components)
    seen: list[DownloadProgress] = []
    pipe = ImagePromptPipeline.from_preset("tiny", on_progress=seen.append)
    assert pipe.sd is tiny_pipe.sd and seen[-1].done == seen[-1].total == len(PAYLOAD)


def test_a_cancel_reported_on_xets_own_thread_aborts_its_session_and_ends_as_download_cancelled(monkeypatch):
    """Xet calls back from a thread its Rust library started, where raising stops nothing: the watch aborts
    the Xet session (what the Hub does on Ctrl-C) and turns the failure that follows into a cancel."""
    import _thread

    from huggingface_hub.utils import _xet

    aborted = threading.Event()
    monkeypatch.setattr(_xet, "abort_xet_session", aborted.set)
    reported = threading.Event()
    escaped: list[BaseException] = []

    def stop(progress: DownloadProgress) -> None:
        if progress.done:
            raise DownloadCancelled

    def xet_progress_thread(bar) -> None:  # like hf_xet's background progress thread
        try:
            bar.update(CHUNK)
        except BaseException as err:  # noqa: BLE001 - recorded: nothing may escape on this thread
            escaped.append(err)
        finally:
            reported.set()

    with pytest.raises(DownloadCancelled), watch_downloads(stop):
        bar = hub_tqdm(name="huggingface_hub.xet_get", unit="B", total=len(PAYLOAD), disable=True)
        _thread.start_new_thread(xet_progress_thread, (bar,))
        assert reported.wait(WAIT)
        raise RuntimeError("the Xet session was aborted")  # how the waiting download then fails
    assert aborted.is_set() and escaped == []
