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
# The tiny models gain nothing from a second thread, and on a busy 2-core machine two torch threads per
# process thrash: measured 0.7-1.0 s vs 11-14 s for a 10-step tiny run. Subprocesses (kernels) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests compare with torch.Generator("cpu") and float32 pixels, so they pin the engine to the CPU instead of
# assuming the machine has no GPU: kernels and CLI subprocesses see no CUDA device, and this process's
# device policy is patched below (session fixture ``cpu_only``).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch
from PIL import Image

from imageprompt_widgets.loading.offline import sample_image


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


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny preset, loaded through the same from_pretrained path as real weights."""
    from imageprompt_widgets import ImagePromptPipeline

    return ImagePromptPipeline.from_preset("tiny")


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
