"""Tests for ``imageprompt_widgets.images``: a corpus of awkward and hostile images, all generated here.

Every valid input must come back as the RGB pixels an independent computation
predicts; every bad one must raise ``ImageInputError`` quickly, with a message
that names the input.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import pathlib
import struct
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import pixels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from imageprompt_widgets.images import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    ImageInputError,
    describe_source,
    load_image,
    load_images,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def raw_png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG built chunk by chunk, so the header can claim anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png16(width: int, height: int, color_type: int, samples: list[int]) -> bytes:
    """A genuine 16-bit PNG (one scanline filter byte per row, big-endian samples)."""
    per_row = len(samples) // height
    rows = b"".join(
        b"\x00" + struct.pack(f">{per_row}H", *samples[r * per_row : (r + 1) * per_row])
        for r in range(height)
    )
    return raw_png(width, height, 16, color_type, zlib.compress(rows))


def png16_grey_trns(transparent: int, other: int) -> bytes:
    """A 2x1 16-bit grey PNG whose tRNS chunk makes the 16-bit value ``transparent`` see-through."""
    ihdr = struct.pack(">IIBBBBB", 2, 1, 16, 0, 0, 0, 0)
    rows = b"\x00" + struct.pack(">2H", transparent, other)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"tRNS", struct.pack(">H", transparent))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def assert_rgb(img: Image.Image, size: tuple[int, int] | None = None) -> None:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    if size is not None:
        assert img.size == size


def assert_px(img: Image.Image, xy: tuple[int, int], rgb: tuple[int, int, int], tol: int = 0) -> None:
    got = img.getpixel(xy)
    assert all(abs(g - e) <= tol for g, e in zip(got, rgb)), f"pixel {xy}: got {got}, expected {rgb} ±{tol}"


def assert_grey_row(img: Image.Image, values: list[int], tol: int = 0) -> None:
    got = pixels(img)[0]
    expected = np.array([[v, v, v] for v in values])
    assert np.abs(got - expected).max() <= tol, f"got {got.tolist()}, expected {expected.tolist()}"


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pattern(width: int = 2, height: int = 3) -> np.ndarray:
    """Distinct colour per pixel, so any rotation or flip is detectable."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    for y in range(height):
        for x in range(width):
            arr[y, x] = (40 * x + 10, 60 * y + 20, 200 - 30 * x - 20 * y)
    return arr


def with_exif_orientation(arr: np.ndarray, orientation: int, fmt: str = "PNG", **kw: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), fmt, exif=exif, **kw)


def animated(fmt: str, **kw: Any) -> bytes:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)


def palette_with_transparent_index(fmt: str) -> bytes:
    im = Image.new("P", (2, 1))
    im.putpalette([*RED, *GREEN] + [0, 0, 0] * 254)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    return encode(im, fmt, transparency=0)


def write(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


class Stream:
    """A non-seekable binary stream (e.g. a socket or HTTP response body): only ``read``."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)


# The independent expectation for each EXIF orientation: how to turn the stored
# pixel array into the one a viewer displays (EXIF 2.3, tag 0x0112).
ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise to display
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise to display
}


# --------------------------------------------------------------------------- valid corpus
#
# Each case: make(tmp_path) -> (source, load_image kwargs); check(result image).


def _pil_source(im: Image.Image) -> Callable[[pathlib.Path], tuple[object, dict[str, Any]]]:
    return lambda tmp: (im, {})


def _bytes_source(data_fn: Callable[[], bytes]) -> Callable[[pathlib.Path], tuple[object, dict[str, Any]]]:
    return lambda tmp: (data_fn(), {})


def _check_exact(expected: np.ndarray) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        assert_rgb(img, (expected.shape[1], expected.shape[0]))
        np.testing.assert_array_equal(np.asarray(img), expected)

    return check


def _check_solid(rgb: tuple[int, int, int], size: tuple[int, int] | None = None, tol: int = 0):
    def check(img: Image.Image) -> None:
        assert_rgb(img, size)
        got = pixels(img)
        assert np.abs(got - np.array(rgb)).max() <= tol, f"got {got.reshape(-1, 3)[:4].tolist()}, want {rgb}"

    return check


def _check_grey(values: list[int], tol: int = 0):
    def check(img: Image.Image) -> None:
        assert_rgb(img, (len(values), 1))
        assert_grey_row(img, values, tol)

    return check


def _check_pixels(expected: dict[tuple[int, int], tuple[int, int, int]], size=None, tol: int = 0):
    def check(img: Image.Image) -> None:
        assert_rgb(img, size)
        for xy, rgb in expected.items():
            assert_px(img, xy, rgb, tol)

    return check


def _ipyw8_entry(name: str, data: bytes) -> dict[str, Any]:
    return {
        "name": name,
        "type": "image/png",
        "size": len(data),
        "content": memoryview(data),
        "last_modified": dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc),
    }


def _ipyw7_entry(name: str, data: bytes) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "type": "image/png", "size": len(data), "lastModified": 1704153600000},
        "content": data,
    }


_PATTERN = pattern()
_HALF_RED = np.array([[[255, 0, 0, 128]]], dtype=np.uint8)


def _rgba_png(rgba: tuple[int, int, int, int]) -> bytes:
    return encode(Image.new("RGBA", (2, 2), rgba), "PNG")


def _one_bit(fmt: str) -> bytes:
    im = Image.new("1", (2, 1), 0)
    im.putpixel((1, 0), 1)
    return encode(im, fmt)


def _l_with_trns() -> bytes:
    im = Image.new("L", (2, 1), 0)
    im.putpixel((1, 0), 200)
    return encode(im, "PNG", transparency=0)


def _rgb_with_trns() -> bytes:
    im = Image.new("RGB", (2, 1), RED)
    im.putpixel((1, 0), GREEN)
    return encode(im, "PNG", transparency=RED)


def _big_orientation_jpeg() -> bytes:
    # 20 wide x 30 high: top-left 10x15 block red, the rest blue.
    arr = np.zeros((30, 20, 3), dtype=np.uint8)
    arr[...] = BLUE
    arr[:15, :10] = RED
    return with_exif_orientation(arr, 6, "JPEG", quality=95, subsampling=0)


def _path_case(name: str, data_fn: Callable[[], bytes]):
    return lambda tmp: (write(tmp, name, data_fn()), {})


def _str_path_case(name: str, data_fn: Callable[[], bytes]):
    return lambda tmp: (str(write(tmp, name, data_fn())), {})


def _open_file_case(name: str, data_fn: Callable[[], bytes]):
    def make(tmp: pathlib.Path):
        fp = open(write(tmp, name, data_fn()), "rb")  # noqa: SIM115 - closed by the finaliser below
        make.opened = fp  # type: ignore[attr-defined]
        return fp, {}

    return make


VALID = [
    # --- plain formats
    pytest.param(
        _bytes_source(lambda: encode(Image.fromarray(_PATTERN), "PNG")),
        _check_exact(_PATTERN),
        id="png-rgb-exact",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.fromarray(_PATTERN), "BMP")),
        _check_exact(_PATTERN),
        id="bmp-rgb-exact",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.fromarray(_PATTERN), "TIFF", compression="tiff_lzw")),
        _check_exact(_PATTERN),
        id="tiff-lzw-rgb-exact",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.fromarray(_PATTERN), "WEBP", lossless=True)),
        _check_exact(_PATTERN),
        id="webp-lossless-exact",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.new("RGB", (16, 16), (200, 30, 60)), "JPEG", quality=95)),
        _check_solid((200, 30, 60), (16, 16), tol=4),
        id="jpeg-rgb",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.new("RGB", (16, 16), (10, 200, 90)), "JPEG", progressive=True)),
        _check_solid((10, 200, 90), (16, 16), tol=6),
        id="jpeg-progressive",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.new("L", (16, 16), 77), "JPEG")),
        _check_solid((77, 77, 77), (16, 16), tol=2),
        id="jpeg-greyscale",
    ),
    # --- transparency composited on white
    pytest.param(
        _bytes_source(lambda: _rgba_png((255, 0, 0, 0))),
        _check_solid(WHITE, (2, 2)),
        id="rgba-fully-transparent-red",
    ),
    pytest.param(
        _bytes_source(lambda: _rgba_png((255, 0, 0, 255))), _check_solid(RED, (2, 2)), id="rgba-opaque-red"
    ),
    pytest.param(
        _bytes_source(lambda: _rgba_png((255, 0, 0, 128))),
        _check_solid((255, 127, 127), (2, 2), tol=1),
        id="rgba-half-transparent-red",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.new("RGBA", (4, 4), (0, 0, 255, 128)), "WEBP", lossless=True)),
        _check_solid((127, 127, 255), (4, 4), tol=1),
        id="webp-half-transparent-blue",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.new("LA", (2, 2), (0, 128)), "PNG")),
        _check_solid((127, 127, 127), (2, 2), tol=1),
        id="la-half-transparent-black",
    ),
    pytest.param(
        _bytes_source(lambda: palette_with_transparent_index("PNG")),
        _check_pixels({(0, 0): WHITE, (1, 0): GREEN}, (2, 1)),
        id="png-palette-transparent-index",
    ),
    pytest.param(
        _bytes_source(lambda: palette_with_transparent_index("GIF")),
        _check_pixels({(0, 0): WHITE, (1, 0): GREEN}, (2, 1)),
        id="gif-palette-transparent-index",
    ),
    pytest.param(
        _bytes_source(_l_with_trns),
        _check_pixels({(0, 0): WHITE, (1, 0): (200, 200, 200)}, (2, 1)),
        id="png-grey-trns",
    ),
    pytest.param(
        _bytes_source(_rgb_with_trns),
        _check_pixels({(0, 0): WHITE, (1, 0): GREEN}, (2, 1)),
        id="png-rgb-trns",
    ),
    pytest.param(
        _pil_source(Image.new("RGBa", (1, 1), (0, 0, 0, 0))), _check_solid(WHITE), id="pil-premultiplied-RGBa"
    ),
    pytest.param(_pil_source(Image.new("PA", (1, 1), (0, 0))), _check_solid(WHITE), id="pil-PA-transparent"),
    # --- 16 bit: scaled by 1/257, never clamped
    pytest.param(
        _bytes_source(
            lambda: encode(Image.fromarray(np.array([[65535, 32896, 0, 257, 32767]], np.uint16)), "PNG")
        ),
        _check_grey([255, 128, 0, 1, 127]),
        id="png-16bit-grey",
    ),
    pytest.param(
        _bytes_source(
            lambda: encode(Image.fromarray(np.array([[65535, 32896, 0, 257, 32767]], np.uint16)), "TIFF")
        ),
        _check_grey([255, 128, 0, 1, 127]),
        id="tiff-16bit-grey",
    ),
    pytest.param(
        _bytes_source(lambda: png16(2, 1, 2, [65535, 32896, 0, 0, 65535, 32896])),
        _check_pixels({(0, 0): (255, 128, 0), (1, 0): (0, 255, 128)}, (2, 1)),
        id="png-16bit-rgb",
    ),
    pytest.param(
        _bytes_source(lambda: png16(1, 1, 4, [0, 32896])),
        _check_solid((127, 127, 127), (1, 1), tol=1),
        id="png-16bit-grey-alpha",
    ),
    pytest.param(
        _bytes_source(lambda: png16(1, 1, 6, [65535, 0, 0, 0])),
        _check_solid(WHITE, (1, 1)),
        id="png-16bit-rgba-transparent",
    ),
    pytest.param(
        _bytes_source(lambda: png16_grey_trns(1000, 32896)),
        _check_pixels({(0, 0): WHITE, (1, 0): (128, 128, 128)}, (2, 1)),
        id="png-16bit-grey-trns",
    ),
    pytest.param(
        _pil_source(Image.frombytes("I;16B", (3, 1), struct.pack(">3H", 65535, 32896, 514))),
        _check_grey([255, 128, 2]),
        id="pil-I16B",
    ),
    pytest.param(
        _pil_source(Image.fromarray(np.array([[0, 65535, 32896]], np.int32))),
        _check_grey([0, 255, 128]),
        id="pil-I-16bit-range",
    ),
    pytest.param(
        _pil_source(Image.fromarray(np.array([[0, 100, 255]], np.int32))),
        _check_grey([0, 100, 255]),
        id="pil-I-8bit-range",
    ),
    pytest.param(
        _pil_source(Image.fromarray(np.array([[0.0, 127.6, 300.0, -5.0]], np.float32))),
        _check_grey([0, 128, 255, 0]),
        id="pil-F",
    ),
    # --- colour models
    pytest.param(
        _bytes_source(lambda: encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF")),
        _check_solid(RED, (4, 4)),
        id="tiff-cmyk",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)),
        _check_solid(RED, (16, 16), tol=8),
        id="jpeg-cmyk",
    ),
    pytest.param(
        _bytes_source(lambda: encode(Image.new("CMYK", (2, 2), (0, 0, 0, 255)), "TIFF")),
        _check_solid((0, 0, 0), (2, 2)),
        id="tiff-cmyk-black",
    ),
    pytest.param(_bytes_source(lambda: _one_bit("PNG")), _check_grey([0, 255]), id="png-1bit"),
    pytest.param(_bytes_source(lambda: _one_bit("BMP")), _check_grey([0, 255]), id="bmp-1bit"),
    pytest.param(_bytes_source(lambda: _one_bit("TIFF")), _check_grey([0, 255]), id="tiff-1bit"),
    pytest.param(
        _bytes_source(lambda: encode(Image.new("L", (3, 1), 90), "PNG")),
        _check_grey([90, 90, 90]),
        id="png-grey",
    ),
    pytest.param(
        _pil_source(Image.new("YCbCr", (2, 2), (76, 85, 255))), _check_solid(RED, tol=2), id="pil-YCbCr"
    ),
    # --- first frame of animations
    pytest.param(
        _bytes_source(lambda: animated("GIF")), _check_solid(RED, (8, 8)), id="gif-animated-first-frame"
    ),
    pytest.param(
        _bytes_source(lambda: animated("WEBP", lossless=True)),
        _check_solid(RED, (8, 8)),
        id="webp-animated-first-frame",
    ),
    pytest.param(_bytes_source(lambda: animated("PNG")), _check_solid(RED, (8, 8)), id="apng-first-frame"),
    pytest.param(
        _bytes_source(lambda: animated("MPO")), _check_solid(RED, (8, 8), tol=4), id="mpo-first-image"
    ),
    pytest.param(
        _bytes_source(lambda: animated("TIFF")), _check_solid(RED, (8, 8)), id="tiff-multipage-first-page"
    ),
    # --- EXIF orientation in other containers
    pytest.param(
        _bytes_source(_big_orientation_jpeg),
        _check_pixels({(27, 2): RED, (2, 17): BLUE, (27, 17): BLUE}, (30, 20), tol=40),
        id="jpeg-exif-orientation-6",
    ),
    pytest.param(
        _bytes_source(lambda: with_exif_orientation(_PATTERN, 8, "TIFF")),
        _check_exact(ORIENTATIONS[8](_PATTERN)),
        id="tiff-exif-orientation-8",
    ),
    pytest.param(
        _bytes_source(lambda: with_exif_orientation(_PATTERN, 6, "WEBP", lossless=True)),
        _check_exact(ORIENTATIONS[6](_PATTERN)),
        id="webp-exif-orientation-6",
    ),
    # --- source kinds
    pytest.param(
        _path_case("photo.png", lambda: encode(Image.fromarray(_PATTERN), "PNG")),
        _check_exact(_PATTERN),
        id="pathlib-path",
    ),
    pytest.param(
        _str_path_case("photo.png", lambda: encode(Image.fromarray(_PATTERN), "PNG")),
        _check_exact(_PATTERN),
        id="str-path",
    ),
    pytest.param(
        _path_case("wrong-extension.gif", lambda: encode(Image.fromarray(_PATTERN), "PNG")),
        _check_exact(_PATTERN),
        id="png-named-gif",
    ),
    pytest.param(
        _open_file_case("photo.png", lambda: encode(Image.fromarray(_PATTERN), "PNG")),
        _check_exact(_PATTERN),
        id="open-file-object",
    ),
    pytest.param(
        lambda tmp: (io.BytesIO(encode(Image.fromarray(_PATTERN), "PNG")), {}),
        _check_exact(_PATTERN),
        id="bytesio",
    ),
    pytest.param(
        lambda tmp: (Stream(encode(Image.fromarray(_PATTERN), "PNG")), {}),
        _check_exact(_PATTERN),
        id="non-seekable-stream",
    ),
    pytest.param(
        lambda tmp: (bytearray(encode(Image.fromarray(_PATTERN), "PNG")), {}),
        _check_exact(_PATTERN),
        id="bytearray",
    ),
    pytest.param(
        lambda tmp: (memoryview(encode(Image.fromarray(_PATTERN), "PNG")), {}),
        _check_exact(_PATTERN),
        id="memoryview",
    ),
    pytest.param(
        lambda tmp: (_ipyw8_entry("photo.png", encode(Image.fromarray(_PATTERN), "PNG")), {}),
        _check_exact(_PATTERN),
        id="ipywidgets8-entry",
    ),
    pytest.param(
        lambda tmp: ((_ipyw8_entry("photo.png", encode(Image.fromarray(_PATTERN), "PNG")),), {}),
        _check_exact(_PATTERN),
        id="ipywidgets8-value-one-file",
    ),
    pytest.param(
        lambda tmp: (_ipyw7_entry("photo.png", encode(Image.fromarray(_PATTERN), "PNG")), {}),
        _check_exact(_PATTERN),
        id="ipywidgets7-entry",
    ),
    pytest.param(
        lambda tmp: ({"photo.png": _ipyw7_entry("photo.png", encode(Image.fromarray(_PATTERN), "PNG"))}, {}),
        _check_exact(_PATTERN),
        id="ipywidgets7-value-one-file",
    ),
    pytest.param(_pil_source(Image.fromarray(_PATTERN)), _check_exact(_PATTERN), id="pil-rgb"),
    pytest.param(
        _pil_source(Image.fromarray(_PATTERN).convert("P", palette=Image.Palette.ADAPTIVE)),
        _check_exact(_PATTERN),
        id="pil-palette",
    ),
    pytest.param(
        lambda tmp: (Image.new("RGB", (10, 10), RED), {"max_pixels": 100}),
        _check_solid(RED, (10, 10)),
        id="exactly-max-pixels",
    ),
    # --- numpy arrays
    pytest.param(lambda tmp: (_PATTERN.copy(), {}), _check_exact(_PATTERN), id="np-uint8-rgb"),
    pytest.param(
        lambda tmp: (np.array([[0, 128, 255]], np.uint8), {}), _check_grey([0, 128, 255]), id="np-uint8-grey"
    ),
    pytest.param(
        lambda tmp: (np.array([[[7], [8]]], np.uint8), {}), _check_grey([7, 8]), id="np-uint8-hxwx1"
    ),
    pytest.param(
        lambda tmp: (_HALF_RED.copy(), {}), _check_solid((255, 127, 127), tol=1), id="np-uint8-rgba-half"
    ),
    pytest.param(
        lambda tmp: (np.array([[65535, 32896, 0, 257]], np.uint16), {}),
        _check_grey([255, 128, 0, 1]),
        id="np-uint16-grey",
    ),
    pytest.param(
        lambda tmp: (np.array([[65535, 32896, 0, 257]], np.dtype(">u2")), {}),
        _check_grey([255, 128, 0, 1]),
        id="np-uint16-big-endian",
    ),
    pytest.param(
        lambda tmp: (np.array([[[65535, 32896, 0]]], np.uint16), {}),
        _check_solid((255, 128, 0)),
        id="np-uint16-rgb",
    ),
    pytest.param(
        lambda tmp: (np.array([[0.0, 0.5, 1.0, 1.2, -0.1]], np.float32), {}),
        _check_grey([0, 128, 255, 255, 0]),
        id="np-float32-clipped",
    ),
    pytest.param(
        lambda tmp: (np.array([[[1.0, 0.0, 0.0, 0.0]]], np.float64), {}),
        _check_solid(WHITE),
        id="np-float64-rgba",
    ),
    pytest.param(lambda tmp: (np.array([[True, False]]), {}), _check_grey([255, 0]), id="np-bool"),
    pytest.param(
        lambda tmp: (np.array([[0, 17, 255]], np.int64), {}),
        _check_grey([0, 17, 255]),
        id="np-int64-in-range",
    ),
    pytest.param(
        lambda tmp: (np.ascontiguousarray(_PATTERN.transpose(1, 0, 2)).transpose(1, 0, 2), {}),
        _check_exact(_PATTERN),
        id="np-non-contiguous",
    ),
    pytest.param(lambda tmp: (_PATTERN[::-1], {}), _check_exact(_PATTERN[::-1]), id="np-negative-stride"),
]


@pytest.mark.parametrize(("make", "check"), VALID)
def test_valid_corpus_loads_right(tmp_path: pathlib.Path, make, check) -> None:
    src, kw = make(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # No stray Pillow or numpy warnings either.
            img = load_image(src, **kw)
    finally:
        opened = getattr(make, "opened", None)
        if opened is not None:
            opened.close()
    assert_rgb(img)
    img.getpixel((0, 0))  # Fully loaded, usable.
    assert not img.info, "metadata (ICC profile, transparency, EXIF) must not survive onto the RGB pixels"
    check(img)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS), ids=lambda o: f"orientation-{o}")
def test_exif_orientation_png(orientation: int) -> None:
    expected = np.ascontiguousarray(ORIENTATIONS[orientation](_PATTERN))
    img = load_image(with_exif_orientation(_PATTERN, orientation))
    assert img.size == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_orientation_6_moves_top_left_corner_to_top_right() -> None:
    arr = np.zeros((3, 2, 3), np.uint8)  # 2 wide, 3 high, black
    arr[0, 0] = RED  # stored top-left
    img = load_image(with_exif_orientation(arr, 6))
    assert img.size == (3, 2)
    assert img.getpixel((2, 0)) == RED  # displayed top-right after a clockwise quarter turn
    assert (np.asarray(img) == RED).all(axis=2).sum() == 1


def test_pil_input_is_not_mutated_or_returned() -> None:
    src = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    out = load_image(src)
    assert out is not src
    assert src.mode == "RGBA" and src.getpixel((0, 0)) == (255, 0, 0, 0)
    out.putpixel((0, 0), BLUE)
    rgb = Image.new("RGB", (2, 2), RED)
    copy = load_image(rgb)
    assert copy is not rgb
    copy.putpixel((0, 0), BLUE)
    assert rgb.getpixel((0, 0)) == RED


def test_caller_file_object_is_left_open(tmp_path: pathlib.Path) -> None:
    buf = io.BytesIO(animated("GIF"))
    load_image(buf)
    assert not buf.closed
    path = write(tmp_path, "a.png", encode(Image.new("RGB", (2, 2)), "PNG"))
    with open(path, "rb") as fp:
        load_image(fp)
        assert not fp.closed


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count file descriptors")
def test_no_file_handles_left_open(tmp_path: pathlib.Path) -> None:
    # Multi-frame files are the ones Pillow keeps open after load().
    paths = [
        write(tmp_path, "anim.gif", animated("GIF")),
        write(tmp_path, "anim.webp", animated("WEBP", lossless=True)),
        write(tmp_path, "pages.tiff", animated("TIFF")),
        write(tmp_path, "phone.jpg", animated("MPO")),
        write(tmp_path, "trunc.png", encode(noisy_rgb(32, 32), "PNG")[:300]),
    ]
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        for path in paths:
            try:
                load_image(path)
            except ImageInputError:
                pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_accepts_just_under_pillows_bomb_threshold_without_warning() -> None:
    """9500x9500 = 90.25 MP: Pillow warns (> 89.5 MP) but our default limit (100 MP) rules.

    The header is valid and the data is junk, so the error must be about the data, not the size,
    and no DecompressionBombWarning may escape.
    """
    data = raw_png(9500, 9500, 1, 0, zlib.compress(b"\x00" * 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageInputError, match="truncated or corrupt"):
            load_image(data, name="bomb-ish.png")


# --------------------------------------------------------------------------- bad corpus
#
# Each case: make(tmp_path) -> (source, kwargs); the message must contain every listed fragment.


def _truncated_png() -> bytes:
    data = encode(noisy_rgb(64, 64), "PNG")
    return data[: len(data) // 2]


def _truncated_jpeg() -> bytes:
    data = encode(noisy_rgb(64, 64), "JPEG")
    return data[: len(data) // 2]


def _truncated_gif() -> bytes:
    data = encode(noisy_rgb(64, 64).convert("P"), "GIF")
    return data[: len(data) // 2]


def _bad_crc_png() -> bytes:
    data = bytearray(encode(noisy_rgb(8, 8), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC... or just past: corrupt either way
    return bytes(data)


def _heic_header() -> bytes:
    return b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)


def _text_file(tmp: pathlib.Path):
    return write(tmp, "notes.txt", b"Shopping list:\n- eggs\n- a better prompt\n"), {}


def _missing(tmp: pathlib.Path):
    return tmp / "missing" / "cat.png", {}


def _directory(tmp: pathlib.Path):
    d = tmp / "photos"
    d.mkdir()
    return d, {}


def _text_mode_file(tmp: pathlib.Path):
    fp = open(write(tmp, "picture.png", encode(Image.new("RGB", (2, 2)), "PNG")), encoding="latin-1")  # noqa: SIM115
    _text_mode_file.opened = fp  # type: ignore[attr-defined]
    return fp, {}


BAD = [
    # (make, fragments that must appear in the message)
    pytest.param(lambda tmp: (b"", {}), ["empty"], id="empty-bytes"),
    pytest.param(lambda tmp: (write(tmp, "empty.png", b""), {}), ["'empty.png'", "empty"], id="empty-file"),
    pytest.param(lambda tmp: (io.BytesIO(), {}), ["empty"], id="empty-bytesio"),
    pytest.param(
        lambda tmp: (_ipyw8_entry("blank.jpg", b""), {}), ["'blank.jpg'", "empty"], id="empty-upload"
    ),
    pytest.param(
        lambda tmp: (np.random.default_rng(1).bytes(1000), {}),
        ["bytes (1000 bytes)", "PNG, JPEG"],
        id="random-bytes",
    ),
    pytest.param(_text_file, ["'notes.txt'", "text"], id="text-file"),
    pytest.param(
        lambda tmp: (write(tmp, "cut.png", _truncated_png()), {}),
        ["'cut.png'", "truncated"],
        id="truncated-png",
    ),
    pytest.param(
        lambda tmp: (write(tmp, "cut.jpg", _truncated_jpeg()), {}),
        ["'cut.jpg'", "truncated"],
        id="truncated-jpeg",
    ),
    pytest.param(
        lambda tmp: (write(tmp, "cut.gif", _truncated_gif()), {}), ["'cut.gif'"], id="truncated-gif"
    ),
    pytest.param(
        lambda tmp: (write(tmp, "crc.png", _bad_crc_png()), {}),
        ["'crc.png'", "PNG", "corrupt"],
        id="png-bad-crc",
    ),
    pytest.param(
        lambda tmp: (raw_png(1, 1, 8, 2, b"not zlib at all"), {}), ["bytes", "corrupt"], id="png-bad-zlib"
    ),
    pytest.param(
        lambda tmp: (write(tmp, "huge.png", raw_png(100_000, 100_000, 8, 2, zlib.compress(bytes(16)))), {}),
        ["'huge.png'", "too large"],
        id="png-header-100000x100000",
    ),
    pytest.param(
        lambda tmp: (raw_png(12_000, 9_000, 8, 2, zlib.compress(bytes(16))), {}),
        ["12000x9000", "108,000,000", "100,000,000", "max_pixels"],
        id="png-header-108MP-over-default-limit",
    ),
    pytest.param(
        lambda tmp: (write(tmp, "small.png", encode(Image.new("RGB", (11, 10)), "PNG")), {"max_pixels": 100}),
        ["'small.png'", "11x10", "110", "100 pixels"],
        id="over-custom-max-pixels",
    ),
    pytest.param(
        lambda tmp: (encode(Image.new("RGB", (11, 10)), "JPEG"), {"max_pixels": 100}),
        ["11x10"],
        id="jpeg-over-custom-max-pixels",
    ),
    pytest.param(
        lambda tmp: (Image.new("RGB", (11, 10)), {"max_pixels": 100}), ["11x10"], id="pil-over-max-pixels"
    ),
    pytest.param(
        lambda tmp: (np.zeros((10, 11, 3), np.uint8), {"max_pixels": 100}), ["11x10"], id="np-over-max-pixels"
    ),
    pytest.param(lambda tmp: (Image.new("RGB", (0, 0)), {}), ["no pixels"], id="pil-zero-size"),
    pytest.param(_directory, ["'photos'", "directory"], id="directory"),
    pytest.param(_missing, ["'cat.png'", "does not exist"], id="missing-path"),
    pytest.param(
        lambda tmp: ("ftp://example.com/cat.png", {}), ["'ftp://example.com/cat.png'", "http://"], id="ftp-url"
    ),
    pytest.param(lambda tmp: ("data:image/png;base64,AAAA", {}), ["data: URL"], id="data-url"),
    pytest.param(lambda tmp: ("", {}), ["empty string"], id="empty-string"),
    pytest.param(
        lambda tmp: (write(tmp, "scan.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"), {}),
        ["'scan.pdf'", "PDF"],
        id="pdf",
    ),
    pytest.param(
        lambda tmp: (
            write(tmp, "logo.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>'),
            {},
        ),
        ["'logo.svg'", "SVG"],
        id="svg",
    ),
    pytest.param(
        lambda tmp: (write(tmp, "cat.heic", _heic_header()), {}),
        ["'cat.heic'", "HEIC", "PNG or JPEG"],
        id="heic",
    ),
    pytest.param(
        lambda tmp: (_ipyw8_entry("IMG_0001.HEIC", _heic_header()), {}),
        ["'IMG_0001.HEIC'", "HEIC"],
        id="heic-upload",
    ),
    pytest.param(
        lambda tmp: (write(tmp, "favicon.ico", encode(Image.new("RGB", (16, 16)), "ICO")), {}),
        ["'favicon.ico'", "ICO", "not an allowed"],
        id="ico-not-allowed",
    ),
    pytest.param(
        lambda tmp: (write(tmp, "frame.ppm", encode(Image.new("RGB", (4, 4)), "PPM")), {}),
        ["'frame.ppm'", "PPM", "not an allowed"],
        id="ppm-not-allowed",
    ),
    pytest.param(
        lambda tmp: (encode(Image.new("RGB", (4, 4)), "PCX"), {}),
        ["PCX", "not an allowed"],
        id="pcx-not-allowed",
    ),
    pytest.param(
        lambda tmp: (write(tmp, "icon.eps", encode(Image.new("RGB", (4, 4)), "EPS")), {}),
        ["'icon.eps'", "EPS", "not an allowed"],
        id="eps-not-allowed-never-ghostscript",
    ),
    pytest.param(
        lambda tmp: (_ipyw7_entry("notes.txt", b"just some words, not pixels\n"), {}),
        ["'notes.txt'", "text"],
        id="ipywidgets7-text-upload",
    ),
    pytest.param(
        lambda tmp: ({"name": "x.png", "type": "image/png", "size": 0, "content": None}, {}),
        ["'x.png'", "NoneType"],
        id="upload-content-none",
    ),
    pytest.param(lambda tmp: ({"foo": 1}, {}), ["dict", "content"], id="dict-not-an-upload"),
    pytest.param(lambda tmp: ({}, {}), ["no image"], id="empty-dict"),
    pytest.param(
        lambda tmp: (
            {"a.png": _ipyw7_entry("a.png", b"x"), "b.png": _ipyw7_entry("b.png", b"y")},
            {},
        ),
        ["2 files", "load_images"],
        id="ipywidgets7-value-two-files",
    ),
    pytest.param(lambda tmp: (("a.png", "b.png"), {}), ["2 sources", "load_images"], id="tuple-of-two"),
    pytest.param(lambda tmp: ((), {}), ["no image"], id="empty-tuple"),
    pytest.param(_text_mode_file, ["'picture.png'", "text mode", "'rb'"], id="text-mode-file-object"),
    pytest.param(lambda tmp: (42, {}), ["int"], id="int"),
    pytest.param(lambda tmp: (None, {}), ["None"], id="none"),
    pytest.param(lambda tmp: (3.5, {}), ["float"], id="float"),
    pytest.param(lambda tmp: (object(), {}), ["object"], id="object"),
    # numpy
    pytest.param(lambda tmp: (np.zeros((2, 3, 7), np.uint8), {}), ["(2, 3, 7)", "HxWx3"], id="np-7-channels"),
    pytest.param(lambda tmp: (np.zeros((2, 3, 2), np.uint8), {}), ["(2, 3, 2)"], id="np-2-channels"),
    pytest.param(
        lambda tmp: (np.zeros((3, 8, 8), np.uint8), {}), ["(3, 8, 8)", "transpose"], id="np-channels-first"
    ),
    pytest.param(
        lambda tmp: (np.zeros((1, 8, 8, 3), np.uint8), {}), ["(1, 8, 8, 3)", "arr[0]"], id="np-batch-dim"
    ),
    pytest.param(lambda tmp: (np.zeros(12, np.uint8), {}), ["(12,)"], id="np-1d"),
    pytest.param(lambda tmp: (np.zeros((0, 5, 3), np.uint8), {}), ["(0, 5, 3)", "empty"], id="np-empty"),
    pytest.param(lambda tmp: (np.array([[0.5, np.nan]]), {}), ["NaN"], id="np-nan"),
    pytest.param(lambda tmp: (np.array([[0.5, np.inf]], np.float32), {}), ["infinite"], id="np-inf"),
    pytest.param(lambda tmp: (np.zeros((2, 2), np.complex64), {}), ["complex64"], id="np-complex"),
    pytest.param(
        lambda tmp: (np.array([[0, 300]], np.int64), {}),
        ["int64", "300", "uint8"],
        id="np-int64-out-of-range",
    ),
    pytest.param(lambda tmp: (np.array([[-1, 3]], np.int8), {}), ["int8", "-1"], id="np-int8-negative"),
    pytest.param(lambda tmp: (np.array([["a", "b"]], object), {}), ["object"], id="np-object"),
    pytest.param(
        lambda tmp: (Image.fromarray(np.array([[np.nan, 1.0]], np.float32)), {}), ["NaN"], id="pil-F-nan"
    ),
]


@pytest.mark.parametrize(("make", "fragments"), BAD)
def test_bad_input_raises_readable_error_fast(tmp_path: pathlib.Path, make, fragments: list[str]) -> None:
    src, kw = make(tmp_path)
    try:
        with pytest.raises(ImageInputError) as info:
            load_image(src, **kw)
    finally:
        opened = getattr(make, "opened", None)
        if opened is not None:
            opened.close()
    err = info.value
    assert isinstance(err, ValueError)
    message = str(err)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message and len(message) < 400
    assert "<_io." not in message and "object at 0x" not in message, message


def test_huge_header_png_fails_fast_without_allocating(tmp_path: pathlib.Path, monkeypatch) -> None:
    path = write(tmp_path, "huge.png", raw_png(100_000, 100_000, 8, 6, zlib.compress(bytes(64))))
    # Fast and small because nothing is decoded: the header alone refuses it. tracemalloc cannot see Pillow's C
    # allocations (40 GB if it decoded), so the decoder itself is watched.
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"decoded a {self.size} image"))
    tracemalloc.start()
    try:
        with pytest.raises(ImageInputError, match="too large"):
            load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_errors_chain_the_original_exception(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ImageInputError) as info:
        load_image(write(tmp_path, "cut.png", _truncated_png()))
    assert info.value.__cause__ is not None
    assert not isinstance(info.value.__cause__, ImageInputError)


def test_name_overrides_the_description() -> None:
    with pytest.raises(ImageInputError, match="'holiday.heic'"):
        load_image(_heic_header(), name="holiday.heic")


def test_global_pillow_settings_untouched(tmp_path: pathlib.Path) -> None:
    max_before, truncated_before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    for src in (_truncated_png(), raw_png(12_000, 9_000, 8, 2, zlib.compress(bytes(16))), animated("GIF")):
        try:
            load_image(src)
        except ImageInputError:
            pass
    assert Image.MAX_IMAGE_PIXELS == max_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is truncated_before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "100"], ids=repr)
def test_invalid_max_pixels_is_a_programming_error(bad: object) -> None:
    with pytest.raises(ValueError, match="max_pixels") as info:
        load_image(np.zeros((2, 2), np.uint8), max_pixels=bad)  # type: ignore[arg-type]
    assert not isinstance(info.value, ImageInputError)


def test_constants() -> None:
    assert DEFAULT_MAX_PIXELS == 100_000_000
    assert isinstance(ALLOWED_FORMATS, frozenset)
    assert {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"} <= ALLOWED_FORMATS
    assert not {"ICO", "PPM", "EPS", "PDF", "PSD"} & ALLOWED_FORMATS


# --------------------------------------------------------------------------- describe_source


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        pytest.param("/some/dir/cat.heic", "'cat.heic'", id="str-path"),
        pytest.param(pathlib.Path("/x/dog.png"), "'dog.png'", id="pathlib"),
        pytest.param(b"123456789012", "bytes (12 bytes)", id="bytes"),
        pytest.param(bytearray(1), "bytearray (1 byte)", id="bytearray"),
        pytest.param(memoryview(b"abc"), "memoryview (3 bytes)", id="memoryview"),
        pytest.param(np.zeros((2, 3, 7)), "numpy array of shape (2, 3, 7)", id="ndarray"),
        pytest.param(Image.new("LA", (4, 3)), "PIL image (LA, 4x3)", id="pil"),
        pytest.param(_ipyw8_entry("a.png", b""), "'a.png'", id="ipywidgets8"),
        pytest.param(_ipyw7_entry("b.jpg", b""), "'b.jpg'", id="ipywidgets7"),
        pytest.param(io.BytesIO(), "file object (BytesIO)", id="bytesio"),
        pytest.param(None, "None", id="none"),
        pytest.param(42, "object of type int", id="int"),
    ],
)
def test_describe_source(src: object, expected: str) -> None:
    assert describe_source(src) == expected


def test_describe_source_open_file_uses_its_name(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "pic.png", b"x")
    with open(path, "rb") as fp:
        assert describe_source(fp) == "'pic.png'"


# --------------------------------------------------------------------------- load_images


def _png(colour: tuple[int, int, int]) -> bytes:
    return encode(Image.new("RGB", (2, 2), colour), "PNG")


def test_load_images_list_of_mixed_sources(tmp_path: pathlib.Path) -> None:
    srcs = [_png(RED), write(tmp_path, "g.png", _png(GREEN)), np.zeros((2, 2, 3), np.uint8) + np.uint8(255)]
    images = load_images(srcs)
    assert [im.getpixel((0, 0)) for im in images] == [RED, GREEN, WHITE]


def test_load_images_ipywidgets8_value() -> None:
    value = (_ipyw8_entry("r.png", _png(RED)), _ipyw8_entry("b.png", _png(BLUE)))
    assert [im.getpixel((0, 0)) for im in load_images(value)] == [RED, BLUE]


def test_load_images_ipywidgets7_value() -> None:
    value = {"r.png": _ipyw7_entry("r.png", _png(RED)), "b.png": _ipyw7_entry("b.png", _png(BLUE))}
    assert [im.getpixel((0, 0)) for im in load_images(value)] == [RED, BLUE]


def test_load_images_ipywidgets7_value_names_bad_file_by_key() -> None:
    value = {"ok.png": {"content": _png(RED)}, "bad.png": {"content": b"junk junk junk"}}
    with pytest.raises(ImageInputError, match="'bad.png'"):
        load_images(value)


def test_load_images_single_sources() -> None:
    assert [im.getpixel((0, 0)) for im in load_images(_png(RED))] == [RED]
    assert [im.getpixel((0, 0)) for im in load_images(_ipyw8_entry("x.png", _png(BLUE)))] == [BLUE]


def test_load_images_passes_keywords() -> None:
    with pytest.raises(ImageInputError, match="11x10"):
        load_images([np.zeros((10, 11), np.uint8)], max_pixels=100)


@pytest.mark.parametrize("empty", [[], (), {}], ids=["list", "tuple", "dict"])
def test_load_images_empty(empty: object) -> None:
    with pytest.raises(ImageInputError, match="no images given"):
        load_images(empty)


def test_load_images_error_names_the_bad_entry() -> None:
    value = (_ipyw8_entry("good.png", _png(RED)), _ipyw8_entry("IMG_7.HEIC", _heic_header()))
    with pytest.raises(ImageInputError, match="'IMG_7.HEIC'"):
        load_images(value)


# --------------------------------------------------------------------------- fuzzing


def _check_fuzz_result(data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # Pillow may warn about odd EXIF/metadata; only exceptions matter.
            img = load_image(data, max_pixels=1_000_000)
    except ImageInputError as err:
        assert str(err)
        return
    assert img.mode == "RGB"
    assert img.width > 0 and img.height > 0
    img.getpixel((0, 0))


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_fuzz_result(data)


def _seeds() -> list[bytes]:
    small = Image.fromarray(pattern(5, 4))
    rgba = Image.fromarray(np.dstack([pattern(5, 4), np.full((4, 5), 100, np.uint8)]))
    return [
        encode(small, "PNG"),
        encode(rgba, "PNG"),
        palette_with_transparent_index("PNG"),
        png16(2, 1, 2, [65535, 32896, 0, 0, 65535, 32896]),
        encode(small, "JPEG"),
        encode(small.convert("P"), "GIF"),
        animated("GIF"),
        encode(small, "BMP"),
        encode(small, "TIFF"),
        encode(small, "WEBP", lossless=True),
        with_exif_orientation(pattern(5, 4), 6),
    ]


SEEDS = _seeds()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_images())
def test_fuzz_mutated_images(data: bytes) -> None:
    _check_fuzz_result(data)
