"""Hostile inputs for ``load_image``: structure-aware fuzzing and a replayed corpus of files.

tests/test_images.py already throws random bytes and byte-flipped images at ``load_image``; most of those
die at the first CRC or magic check. The generators here build inputs that get *past* those checks
(PNG chunks with correct CRCs, valid GIF/BMP/JPEG/TIFF/WebP files with their size fields set to boundary
values), so the decoders themselves run on hostile headers. Every call must end quickly with either an RGB
image no larger than the pixel limit or an ``ImageInputError``, decoding nothing larger (a hang ends at
pytest-timeout's bound); memory must stay flat over the whole run.

Runs are deterministic (``derandomize=True``, fixed ``max_examples``). Files in tests/corpus/ are replayed
against tests/corpus/expected.json; ``python tests/corpus/make_corpus.py`` rewrites the hand-made ones.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from imageprompt_widgets.images import ImageInputError, load_image

CORPUS = Path(__file__).parent / "corpus"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
#: The pixel limit the fuzz runs use (the default is 100 MP; a small one makes "too large" reachable).
LIMIT = 1_000_000
#: Python-heap peak per call (tracemalloc cannot see Pillow's C buffers: RSS is checked separately).
HEAP_PER_CALL = 32 * 2**20
#: RSS may grow this much over a whole fuzz run (imports and allocator arenas warm up; a leak of one
#: decoded image per call, or one decoded bomb, is far above it).
RSS_GROWTH = 96 * 2**20
EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BOUNDARY_32 = (0, 1, 2, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def rss_bytes() -> int:
    """Resident memory now (not the high-water mark: flat means it came back down)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def check_one(data: bytes) -> str:
    """Load ``data`` under the fuzz rules; returns ``"image"`` or ``"error"``. Anything else fails the test."""
    decoded: list[tuple[int, int]] = []  # what Pillow decodes: a bomb is slow because it is big, so its size tells
    real_load = ImageFile.ImageFile.load
    ImageFile.ImageFile.load = lambda self: decoded.append(self.size) or real_load(self)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd metadata; only exceptions matter
            image = load_image(data, max_pixels=LIMIT)
        outcome = "image"
        assert image.mode == "RGB" and 0 < image.width * image.height <= LIMIT, image
        image.getpixel((image.width - 1, image.height - 1))  # fully decoded, nothing lazy left
    except ImageInputError as err:
        outcome = "error"
        message = str(err)
        assert message and "\n" not in message and len(message) < 500, message
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        ImageFile.ImageFile.load = real_load
    assert all(width * height <= LIMIT for width, height in decoded), f"decoded {decoded} for {data[:32]!r}"
    assert peak < HEAP_PER_CALL, f"{peak / 2**20:.0f} MiB of Python heap for {data[:32]!r}"
    return outcome


# -- generators -------------------------------------------------------------------------------------


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


VALID_PNG_TYPES = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


@st.composite
def png_files(draw: st.DrawFn) -> bytes:
    """PNGs whose every chunk has a correct CRC: half consistent (small, right payload length, then one
    field or chunk spoiled), half with hostile IHDR values and payloads that inflate to megabytes."""
    if draw(st.booleans()):
        width, height = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        color_type = draw(st.sampled_from(sorted(VALID_PNG_TYPES)))
        bit_depth = draw(st.sampled_from(VALID_PNG_TYPES[color_type]))
        interlace = draw(st.sampled_from((0, 0, 1)))
        row = 1 + (width * CHANNELS[color_type] * bit_depth + 7) // 8
        raw = bytes(draw(st.binary(min_size=row * height, max_size=row * height)))
        if draw(st.booleans()):  # spoil one thing
            field = draw(st.sampled_from(("width", "height", "depth", "payload")))
            width = draw(st.sampled_from(BOUNDARY_32)) if field == "width" else width
            height = draw(st.sampled_from(BOUNDARY_32)) if field == "height" else height
            bit_depth = draw(st.sampled_from((3, 5, 32))) if field == "depth" else bit_depth
            raw = raw[: draw(st.integers(0, len(raw)))] if field == "payload" else raw
    else:
        width = draw(st.one_of(st.integers(0, 64), st.sampled_from(BOUNDARY_32)))
        height = draw(st.one_of(st.integers(0, 64), st.sampled_from(BOUNDARY_32)))
        bit_depth = draw(st.sampled_from((1, 2, 4, 8, 16, 0, 3, 255)))
        color_type = draw(st.sampled_from((0, 2, 3, 4, 6, 1, 7)))
        interlace = draw(st.sampled_from((0, 1, 2)))
        if draw(st.booleans()):  # a payload that inflates to far more than it weighs
            raw = b"\x00" * draw(st.integers(0, 4_000_000))
        else:
            raw = draw(st.binary(max_size=512))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    idat = zlib.compress(raw, 9)
    extra = b""
    if color_type == 3 and draw(st.integers(0, 3)):
        extra += chunk(b"PLTE", draw(st.binary(min_size=3, max_size=768)))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from((b"tRNS", b"iCCP", b"eXIf", b"acTL", b"fcTL", b"gAMA", b"sBIT", b"zTXt")))
        extra += chunk(kind, draw(st.binary(max_size=64)))
    chunks = [chunk(b"IHDR", ihdr), extra, chunk(b"IDAT", idat)]
    if draw(st.integers(0, 4)):
        chunks.append(chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _seed_files() -> dict[str, bytes]:
    small = Image.linear_gradient("L").resize((6, 5)).convert("RGB")
    return {
        "GIF": _encoded(small.convert("P"), "GIF"),
        "BMP": _encoded(small, "BMP"),
        "JPEG": _encoded(small, "JPEG"),
        "TIFF": _encoded(small, "TIFF"),
        "WEBP": _encoded(small, "WEBP", lossless=True),
    }


SEED_FILES = _seed_files()


def _size_fields(fmt: str, data: bytes) -> list[tuple[int, str]]:
    """Where each format keeps its dimensions (offset, struct format): the fields a bomb lies in."""
    if fmt == "GIF":
        return [(6, "<H"), (8, "<H")]
    if fmt == "BMP":
        return [(18, "<i"), (22, "<i"), (28, "<H"), (30, "<I")]  # width, height, bits, compression
    if fmt == "JPEG":
        sof = data.index(b"\xff\xc0")
        return [(sof + 5, ">H"), (sof + 7, ">H"), (sof + 2, ">H")]  # height, width, segment length
    if fmt == "TIFF":
        return [(4, "<I")] + [(offset, "<I") for offset in range(10, min(len(data) - 4, 130), 12)]
    return [(4, "<I"), (16, "<I"), (21, "<I")]  # RIFF size, VP8L chunk size, packed width/height


@st.composite
def header_fuzzed_files(draw: st.DrawFn) -> bytes:
    """A valid small image in an allowed format with its size fields set to boundary or random values."""
    fmt = draw(st.sampled_from(sorted(SEED_FILES)))
    data = bytearray(SEED_FILES[fmt])
    fields = _size_fields(fmt, bytes(data))
    for offset, layout in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3)):
        bits = struct.calcsize(layout) * 8
        value = draw(st.one_of(st.sampled_from(BOUNDARY_32), st.integers(0, 2**bits - 1))) % 2**bits
        if layout.endswith(("i", "h")) and value >= 2 ** (bits - 1):
            value -= 2**bits
        data[offset : offset + struct.calcsize(layout)] = struct.pack(layout, value)
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


# -- tests ------------------------------------------------------------------------------------------


class _Tally:
    """Counts outcomes across one hypothesis run, and RSS before/after it."""

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {"image": 0, "error": 0}
        self.rss_start = rss_bytes()


def _fuzz(strategy: st.SearchStrategy[bytes], label: str) -> dict[str, int]:
    tally = _Tally()

    @FUZZ
    @given(strategy)
    def run(data: bytes) -> None:
        tally.outcomes[check_one(data)] += 1

    run()
    growth = rss_bytes() - tally.rss_start
    print(f"{label}: {tally.outcomes} over {sum(tally.outcomes.values())} calls, RSS growth {growth / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH, f"RSS grew {growth / 2**20:.0f} MiB over the {label} fuzz run"
    return tally.outcomes


def test_fuzz_png_with_valid_crcs_only_raises_image_input_error():
    outcomes = _fuzz(png_files(), "png")
    # Both outcomes must occur, or the generator only ever tests one path (and the test proves little).
    assert outcomes["image"] > 0 and outcomes["error"] > 0, outcomes


def test_fuzz_size_fields_of_every_allowed_format_only_raises_image_input_error():
    outcomes = _fuzz(header_fuzzed_files(), "headers")
    assert outcomes["image"] > 0 and outcomes["error"] > 0, outcomes


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_gives_its_recorded_outcome(name):
    data = (CORPUS / name).read_bytes()
    assert len(data) < 8 * 2**10, "corpus files stay small"
    expected = EXPECTED[name]
    outcome = check_one(data)  # fast, bounded, only ImageInputError
    if "image" in expected:
        assert outcome == "image"
        assert list(load_image(data, max_pixels=LIMIT).size) == expected["image"]
        return
    assert outcome == "error"
    with pytest.raises(ImageInputError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own "Truncated File Read" on the cut-off TIFF
        load_image(CORPUS / name, max_pixels=LIMIT)
    assert expected["error"] in str(info.value)
    assert repr(name) in str(info.value)  # a path input is named in its message


def test_corpus_covers_every_file_in_the_folder():
    on_disk = {path.name for path in CORPUS.iterdir() if path.suffix not in (".py", ".json", ".md")}
    assert on_disk == set(EXPECTED), "every corpus file needs an expected outcome (and vice versa)"
