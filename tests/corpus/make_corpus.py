"""Write the hand-made part of the hostile-input corpus (``python tests/corpus/make_corpus.py``).

Every file here is small (a few KB at most) and is replayed by ``tests/test_reliability_fuzz.py``,
which checks each against ``expected.json``: either the exact size of the RGB image it loads as, or
that it raises ``ImageInputError`` with the given words in its message. Inputs the fuzzer finds
interesting later are added as files next to these, with an entry in ``expected.json``.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, idat: bytes, bit_depth: int = 8, color_type: int = 0, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def corpus() -> dict[str, tuple[bytes, dict]]:
    small = Image.new("RGB", (5, 4), (10, 200, 30))
    bomb_rows = zlib.compress(b"\x00" * (1 + 2000) * 2000, 9)  # 2000x2000 grey in ~4 KB: 4 MP claimed
    jpeg = encoded(small, "JPEG")
    sof = jpeg.index(b"\xff\xc0")
    huge_jpeg = jpeg[: sof + 5] + struct.pack(">HH", 65500, 65500) + jpeg[sof + 9 :]
    gif = encoded(small.convert("P"), "GIF")
    huge_gif = gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:]
    bmp = encoded(small, "BMP")
    huge_bmp = bmp[:18] + struct.pack("<ii", 60000, -60000) + bmp[26:]
    tiff = encoded(small, "TIFF")
    webp = encoded(small, "WEBP", lossless=True)
    # A TIFF whose first IFD says "next IFD is me": a reader that follows it without a guard never ends.
    looping_tiff = b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 1) + struct.pack("<HHII", 256, 4, 1, 5) + struct.pack("<I", 8)
    bad_crc = bytearray(encoded(small, "PNG"))
    bad_crc[29] ^= 0xFF  # inside IHDR's CRC
    apng_many = png(1, 1, zlib.compress(b"\x00\x00"), extra=chunk(b"acTL", struct.pack(">II", 2**31 - 1, 0)))
    cases = {
        "png-huge-claimed-dimensions.png": (png(65535, 65535, zlib.compress(b"\x00\x00")), {"error": "too large"}),
        "png-zero-width.png": (png(0, 5, zlib.compress(b"\x00")), {"error": "corrupt"}),
        "png-decompression-bomb.png": (png(2000, 2000, bomb_rows), {"error": "more than the limit"}),
        "png-bad-crc.png": (bytes(bad_crc), {"error": "PNG"}),
        "png-apng-2g-frames.png": (apng_many, {"image": [1, 1]}),
        "png-ok-5x4.png": (encoded(small, "PNG"), {"image": [5, 4]}),
        "jpeg-huge-sof.jpg": (huge_jpeg, {"error": "too large"}),
        "jpeg-header-only.jpg": (jpeg[:200], {"error": "JPEG"}),
        "gif-huge-logical-screen.gif": (huge_gif, {"error": "too large"}),
        "bmp-huge-top-down.bmp": (huge_bmp, {"error": "too large"}),
        "tiff-ifd-loop.tif": (looping_tiff, {"error": "TIFF"}),
        "tiff-truncated.tif": (tiff[: len(tiff) // 2], {"error": "TIFF"}),
        "webp-truncated.webp": (webp[:30], {"error": "corrupt"}),
        "heic-iphone.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, {"error": "HEIC"}),
        "svg-drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', {"error": "SVG"}),
        "html-failed-download.png": (b"<!DOCTYPE html><html><body>404</body></html>", {"error": "HTML"}),
        "zip-archive.png": (b"PK\x03\x04" + b"\x00" * 40, {"error": "ZIP"}),
        "ico-not-allowed.ico": (encoded(small, "ICO"), {"error": "not an allowed image format"}),
        "psd-like-text.txt": (b"8BPS is not enough to be a Photoshop file\n", {"error": "text file"}),
        "empty.png": (b"", {"error": "empty"}),
    }
    return cases


def main() -> None:
    expected = {}
    for name, (data, outcome) in corpus().items():
        (HERE / name).write_bytes(data)
        expected[name] = outcome
    path = HERE / "expected.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known.update(expected)
    path.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")


if __name__ == "__main__":
    main()
