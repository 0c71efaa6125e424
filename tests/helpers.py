"""What the test modules share, written once: pixels, the same-pixels check, a solo run, the one-sentence
check, PNG bytes, the one wait policy, the hold-and-count pipeline wrapper and the local HTTP server.

Importable on its own (``from helpers import ...``: pytest puts tests/ on the path); it imports no fixture.
"""

from __future__ import annotations

import importlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

#: The one wait policy: every join, barrier, event, condition and future in the tests waits at most this many
#: seconds. It only bounds a deadlock (a healthy wait ends in about a second on a loaded 2-core machine), so
#: it is never a timing assertion; pytest-timeout's 300 s a test (pyproject.toml) is the net beneath it.
WAIT = 120


def optional_module(name: str) -> Any:
    """``pytest.importorskip(name)``, except where ``IMAGEPROMPT_REQUIRE_OPTIONAL=1`` (CI): there a missing
    optional dependency fails the tests that need it instead of skipping them without a word."""
    if os.environ.get("IMAGEPROMPT_REQUIRE_OPTIONAL") == "1":
        try:
            return importlib.import_module(name)
        except ImportError as err:
            pytest.fail(f"{name} is missing: {err} (IMAGEPROMPT_REQUIRE_OPTIONAL=1, so this is an error, "
                        "not a skip)", pytrace=False)
    return pytest.importorskip(name)


# -- pixels ---------------------------------------------------------------------------------------------


def pixels(source: Any) -> np.ndarray:
    """Pixels as int16, safe to subtract: a picture (a PIL image, an array or a file) gives H x W x 3;
    several (a list of pictures, or a result's ``.images``) give them stacked, N x H x W x 3."""
    images = getattr(source, "images", source)
    if isinstance(images, (list, tuple)):
        return np.stack([pixels(image) for image in images])
    if isinstance(images, (str, Path)):
        with Image.open(images) as opened:
            return np.asarray(opened.convert("RGB"), dtype=np.int16)
    return np.asarray(images, dtype=np.int16)


def same_pixels(a: Any, b: Any) -> bool:
    """Whether two pictures (or lists, or results) have exactly the same pixels."""
    return np.array_equal(pixels(a), pixels(b))


def assert_same_pixels(a: Any, b: Any) -> None:
    """As :func:`same_pixels`, with NumPy's report of where they differ when they do."""
    np.testing.assert_array_equal(pixels(a), pixels(b))


def assert_pixels_within(a: Any, b: Any, levels: int = 1) -> None:
    """Two pictures equal within ``levels`` of 255 everywhere: the project's bar for "the same computation by
    another path", where the two paths batch or order float operations differently (a CPU without AVX-512 rounds
    them apart by a level here and there)."""
    first, second = pixels(a), pixels(b)
    assert first.shape == second.shape, f"pictures of shapes {first.shape} and {second.shape}"
    difference = np.abs(first - second)
    assert difference.max() <= levels, f"largest pixel difference {difference.max()} > {levels}"


def bare_sdxl_images(pipe: Any, res: Any, *, steps: int, guidance: float = 5.0, seed: int = 0, scheduler: Any = None,
                     vae: Any = None, **kwargs: Any) -> list[Image.Image]:
    """Bare diffusers' ``StableDiffusionXLPipeline`` on ``pipe``'s components, fed ``res``'s traced tensors (tokens,
    pooled slot and their negatives; ``kwargs`` adds e.g. ``ip_adapter_image_embeds``), with its own CPU generator:
    what an SDXL route must equal."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    bare = StableDiffusionXLPipeline(**pipe.sd.components)
    if scheduler is not None:
        bare.scheduler = scheduler
    if vae is not None:  # diffusers' way to decode with TAESD(XL): vae=AutoencoderTiny(...)
        bare.vae = vae
    bare.set_progress_bar_config(disable=True)
    trace = res.trace
    return bare(
        prompt_embeds=trace.prompt_embeds, pooled_prompt_embeds=trace.pooled_prompt_embeds,
        negative_prompt_embeds=trace.negative_prompt_embeds,
        negative_pooled_prompt_embeds=trace.negative_pooled_prompt_embeds,
        num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), **kwargs,
    ).images


def png_bytes(image: Image.Image) -> bytes:
    """The image as a PNG file's bytes (what an upload or an HTTP server hands over)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- runs -----------------------------------------------------------------------------------------------


def solo(pipe: Any, images: Any, **settings: Any) -> Any:
    """The same run straight through the engine, alone: what every panel, controller or CLI run must equal."""
    from imageprompt_widgets import GenerationSettings

    return pipe.generate(images, GenerationSettings.from_kwargs(**settings))


def one_sentence(err: BaseException) -> str:
    """The error's text, checked to be one short line a user can read (no traceback, no repr dump)."""
    text = str(err)
    assert "\n" not in text and len(text) < 400, text
    return text


class HeldPipeline:
    """A pipeline seen through a proxy that holds a run at a step, fails one at a step, and counts.

    ``hold_at``: the first run to reach this step sets ``held`` and waits for ``release`` (once).
    ``fail_at`` / ``error``: the first run to reach this step raises ``error`` there (once).
    Counted: ``steps`` (every step of every run), ``seeds`` (one per run), ``runs``, ``max_active`` (the
    most runs at once: 1 on a shared pipeline), and ``worker`` (the last run's thread).
    """

    def __init__(self, pipe: Any, hold_at: int | None = None, fail_at: int | None = None,
                 error: BaseException | None = None):
        self._pipe = pipe
        self._generate = pipe.generate  # taken now, so that in_place can put this proxy's own in its place
        self.hold_at, self.fail_at, self.error = hold_at, fail_at, error
        self.held, self.release = threading.Event(), threading.Event()
        self.steps: list[int] = []
        self.seeds: list[int | None] = []
        self.active = self.max_active = self.runs = 0
        self.worker: threading.Thread | None = None
        self._count = threading.Lock()
        self._stepped = threading.Condition()
        self._stepped_runs: list[Any] = []  # the cancel events of runs that finished a step

    @classmethod
    def in_place(cls, pipe: Any, monkeypatch: Any, **options: Any) -> HeldPipeline:
        """Counts the runs of ``pipe`` itself (for code that finds the pipeline on its own, like batch)."""
        held = cls(pipe, **options)
        monkeypatch.setattr(pipe, "generate", held.generate)
        return held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def wait_for_a_step(self, future: Future, cancel: threading.Event) -> None:
        """Until the run with this cancel event finished a step, or its future resolved without one."""
        future.add_done_callback(lambda _: self._notify())
        with self._stepped:
            assert self._stepped.wait_for(
                lambda: any(event is cancel for event in self._stepped_runs) or future.done(), WAIT
            )

    def _notify(self) -> None:
        with self._stepped:
            self._stepped.notify_all()

    def generate(self, images: Any, settings: Any = None, *, on_step: Callable | None = None, cancel: Any = None,
                 **changes: Any) -> Any:
        with self._count:
            self.active += 1
            self.runs += 1
            self.max_active = max(self.max_active, self.active)
            self.seeds.append(settings.seed if settings is not None else changes.get("seed"))
        self.worker = threading.current_thread()

        def step(info: Any) -> None:
            self.steps.append(info.step)
            if on_step is not None:
                on_step(info)
            with self._stepped:
                self._stepped_runs.append(cancel)
                self._stepped.notify_all()
            if info.step == self.fail_at:
                self.fail_at = None  # fail once
                raise self.error
            if info.step == self.hold_at:
                self.hold_at = None  # hold once
                self.held.set()
                assert self.release.wait(WAIT)

        try:
            return self._generate(images, settings, on_step=step, cancel=cancel, **changes)
        finally:
            with self._count:
                self.active -= 1


# -- a local HTTP server ----------------------------------------------------------------------------------


@dataclass
class LocalServer:
    """An HTTP server on 127.0.0.1: ``routes`` maps a path to a handler; ``sent`` counts body bytes a handler
    recorded; ``finished`` is set when a request to that path was answered (or the client hung up)."""

    base: str
    routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    finished: dict[str, threading.Event] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return self.base + path

    def serve(self, path: str, body: bytes, status: int = 200, content_type: str = "image/png",
              chunk: int | None = None, chunk_delay: float = 0.0) -> str:
        """Answer ``path`` with ``body``; with ``chunk``, written ``chunk`` bytes at a time, ``chunk_delay``
        seconds apart (a slow network, for tests that must not depend on how fast bytes arrive)."""

        def handler(request: BaseHTTPRequestHandler) -> None:
            request.send_response(status)
            request.send_header("Content-Type", content_type)
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            step = chunk or max(len(body), 1)
            for start in range(0, len(body), step):
                if start and chunk_delay:
                    time.sleep(chunk_delay)
                request.wfile.write(body[start:start + step])
                request.wfile.flush()

        self.routes[path] = handler
        return self.url(path)


@contextmanager
def local_server() -> Iterator[LocalServer]:
    """A :class:`LocalServer` for the length of the ``with``; nothing leaves the machine."""
    state: dict[str, LocalServer] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            srv = state["server"]
            route = srv.routes.get(self.path)
            done = srv.finished.setdefault(self.path, threading.Event())
            try:
                if route is None:
                    self.send_error(404, "Not Found")
                else:
                    route(self)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up, as a loader should once a limit is reached
            finally:
                done.set()

        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    state["server"] = LocalServer(base=f"http://{host}:{port}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state["server"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(WAIT)
