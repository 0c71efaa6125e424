"""The suite's own helpers (tests/helpers.py) and its rules: what the other test files lean on must itself hold."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest
from helpers import WAIT, HeldPipeline, local_server, optional_module, pixels, png_bytes, same_pixels
from PIL import Image


def test_pixels_are_signed_and_stack_several_pictures(tmp_path):
    black, white = Image.new("RGB", (3, 2)), Image.new("RGB", (3, 2), (255, 255, 255))
    white.save(tmp_path / "white.png")
    assert pixels(black).shape == (2, 3, 3) and pixels(black).dtype == np.int16
    assert (pixels(black) - pixels(white)).min() == -255  # no uint8 wrap-around
    assert pixels([black, white]).shape == (2, 2, 3, 3)
    assert same_pixels(tmp_path / "white.png", white) and not same_pixels(black, white)


def test_a_missing_optional_dependency_skips_here_and_fails_where_required(monkeypatch):
    monkeypatch.delenv("IMAGEPROMPT_REQUIRE_OPTIONAL", raising=False)
    with pytest.raises(pytest.skip.Exception):
        optional_module("no_such_module_anywhere")
    monkeypatch.setenv("IMAGEPROMPT_REQUIRE_OPTIONAL", "1")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_anywhere is missing"):
        optional_module("no_such_module_anywhere")
    assert optional_module("numpy") is np


def test_the_local_server_sends_every_byte_also_slowly():
    body = png_bytes(Image.new("RGB", (40, 30), (10, 20, 30)))
    with local_server() as server:
        fast = server.serve("/fast.png", body)
        slow = server.serve("/slow.png", body, chunk=64, chunk_delay=0.001)
        for url in (fast, slow):
            with urllib.request.urlopen(url, timeout=WAIT) as answer:
                assert answer.read() == body
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server.url("/missing.png"), timeout=WAIT)


def test_the_held_pipeline_holds_once_fails_once_and_counts(tiny_pipe, image):
    held = HeldPipeline(tiny_pipe, hold_at=1)
    results = []
    run = threading.Thread(target=lambda: results.append(held.generate(image, steps=2, seed=3)))
    run.start()
    assert held.held.wait(WAIT) and held.active == 1 and not results
    held.release.set()
    run.join(WAIT)
    assert results and held.steps == [1, 2, 3] and held.runs == 1 and held.max_active == 1  # PNDM: a warm-up step
    held.fail_at, held.error = 1, RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        held.generate(image, steps=2)
    held.generate(image, steps=2)  # failed once only
    assert held.runs == 3 and held.seeds == [3, None, None] and held.worker is threading.current_thread()
