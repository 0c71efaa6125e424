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

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny preset, loaded through the same from_pretrained path as real weights."""
    from imageprompt_widgets import ImagePromptPipeline

    return ImagePromptPipeline.from_preset("tiny")


def make_image(seed: int = 0, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A deterministic, textured RGB test image (smooth gradients plus noise)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, ((x + y) % 17) / 17], axis=-1) * 200
    noise = rng.integers(0, 55, size=(height, width, 3))
    return Image.fromarray((base + noise).astype(np.uint8), "RGB")


@pytest.fixture
def image() -> Image.Image:
    return make_image(0)


@pytest.fixture
def other_image() -> Image.Image:
    return make_image(1)
