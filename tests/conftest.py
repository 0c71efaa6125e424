"""Shared fixtures: the tiny offline preset, a few small input images, no network."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub: tests must never reach for the network, and the tiny
# models are built once into a cache shared by test runs (the build is atomic, so parallel runs are safe).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("IMAGEPROMPT_CACHE_DIR", str(Path(tempfile.gettempdir()) / "imageprompt-test-cache"))
os.environ.pop("IMAGEPROMPT_MODEL", None)
# No bfloat16 CPU, for this process (cpu_only below) and the CLIs, kernels and accelerate workers it starts: a
# precision="auto" run computes in float32 everywhere, so their pixels equal the suite's.
os.environ["IMAGEPROMPT_CPU_BFLOAT16"] = "0"
# The tiny models gain nothing from a second thread, and on a busy 2-core machine two torch threads per
# process thrash: measured 0.7-1.0 s vs 11-14 s for a 10-step tiny run. Subprocesses (kernels) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests compare with torch.Generator("cpu") and float32 pixels, so they pin the engine to the CPU instead of
# assuming the machine has no GPU: kernels and CLI subprocesses see no CUDA device, and this process's
# device policy is patched below (session fixture ``cpu_only``).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch
from hypothesis import settings as hypothesis_settings
from PIL import Image

from imageprompt_widgets.loading.offline import sample_image

# Every property test draws the same examples on every run and machine (a failure reproduces; CI cannot flake
# on a new draw): the fuzzing is derandomized, and no example database carries state between runs.
hypothesis_settings.register_profile("derandomized", derandomize=True, database=None)
hypothesis_settings.load_profile("derandomized")


#: pytest-timeout's bound (pyproject.toml: 300 s a test) for the tests known to be long: whole notebooks, a
#: JupyterLab in Chromium, soak and fresh-process runs. Still a bound on a hang, never a timing assertion.
LONG_TEST_TIMEOUT = 900


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None and any(
            item.get_closest_marker(name) for name in ("slow", "notebooks", "browser")
        ):
            item.add_marker(pytest.mark.timeout(LONG_TEST_TIMEOUT))


@pytest.fixture(autouse=True, scope="session")
def cpu_only():
    """The engine's device policy sees no CUDA or MPS device, on any machine (tests that need a device
    name it: ``device="cpu"``, or patch these back), and no bfloat16 CPU: live runs stay in float32 (tests of
    bfloat16 autocast patch ``cpu_has_bfloat16`` back)."""
    from imageprompt_widgets.loading import cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(torch.backends.mps, "is_available", lambda: False)
        patch.setattr(cache, "cpu_has_bfloat16", lambda: False)
        yield


#: The session's shared tiny pipeline, once a test asked for it (the autouse check below looks after it).
_SHARED: list = []


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny preset, loaded through the same from_pretrained path as real weights."""
    from imageprompt_widgets import ImagePromptPipeline

    pipe = ImagePromptPipeline.from_preset("tiny")
    _SHARED[:] = [pipe]
    return pipe


@pytest.fixture(autouse=True)
def shared_pipe_left_clean():
    """Fails the test that leaves the shared tiny pipeline with a LoRA loaded or its run lock held: the tests
    after it would pass or fail by their order. A run still finishing on another thread gets WAIT seconds."""
    yield
    if not _SHARED:
        return
    import threading

    from helpers import WAIT

    pipe = _SHARED[0]
    assert not pipe.loras, f"the test left LoRAs loaded in the shared tiny pipeline: {pipe.loras}"
    free: list[bool] = []

    def try_the_lock() -> None:  # on a fresh thread: the lock is re-entrant for a thread that holds it
        free.append(pipe.lock.acquire(timeout=WAIT))
        if free[0]:
            pipe.lock.release()

    checker = threading.Thread(target=try_the_lock, name="shared-pipe-check")
    checker.start()
    checker.join(WAIT + 10)
    assert free == [True], "the test left the shared tiny pipeline's run lock held"


#: A deterministic, textured RGB test image: ``make_image(seed, size=(w, h))``. Test modules import
#: ``imageprompt_widgets.loading.offline.sample_image`` instead: ``from conftest import`` is ambiguous once
#: tests/browser/ has a conftest of its own.
make_image = sample_image


@pytest.fixture
def image() -> Image.Image:
    return make_image(0)


@pytest.fixture
def other_image() -> Image.Image:
    return make_image(1)
