"""``load_image("http(s)://…")`` against a real HTTP server on 127.0.0.1, started here (no other network).

Each test names what a user pastes into a notebook and what they must get back: the same image as from
the file, or one ``ImageInputError`` sentence that names the URL. Limits are checked on the wire: the
byte cap while streaming (the server counts what it managed to send), the timeout against a server that
never answers and one that drips a byte at a time.
"""

from __future__ import annotations

import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from helpers import LocalServer as Server
from helpers import local_server, png_bytes
from PIL import Image

from imageprompt_widgets.images import (
    MAX_REDIRECTS,
    ImageInputError,
    describe_source,
    load_image,
    load_images,
)

#: Small enough that the timeout tests finish fast, large enough for a loaded 2-core CI machine.
TIMEOUT = 1.0
BIG_BODY = 128 * 2**20  # what the streaming server offers; the loader must stop long before
CAP = 256 * 1024


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(16))) + chunk(b"IEND", b"")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    # A proxy from the environment must not see requests to 127.0.0.1 (or the test would leave the machine).
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[Server]:
    with local_server() as started:
        yield started


@pytest.fixture
def picture(tmp_path: Path, image: Image.Image) -> Path:
    path = tmp_path / "picture.png"
    image.save(path)
    return path


def _assert_names(err: pytest.ExceptionInfo[ImageInputError], url: str, *fragments: str) -> None:
    """One line that starts with the URL (as typed) and holds every fragment."""
    message = str(err.value)
    assert message.startswith(repr(url) + " "), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


# --------------------------------------------------------------------------- images that load


def test_a_png_url_gives_the_same_image_as_the_file(server: Server, picture: Path) -> None:
    url = server.serve("/picture.png", picture.read_bytes(), content_type="application/octet-stream")
    from_url = load_image(url)
    assert from_url.mode == "RGB" and from_url.size == load_image(picture).size
    assert np.array_equal(np.asarray(from_url), np.asarray(load_image(picture)))


def test_a_redirect_is_followed(server: Server, picture: Path) -> None:
    server.serve("/final.png", picture.read_bytes())

    def redirect(request: BaseHTTPRequestHandler) -> None:
        request.send_response(302)
        request.send_header("Location", "/final.png")  # relative, as many servers send it
        request.send_header("Content-Length", "0")
        request.end_headers()

    server.routes["/moved"] = redirect
    assert np.array_equal(np.asarray(load_image(server.url("/moved"))), np.asarray(load_image(picture)))


def test_a_body_without_content_length_is_read_to_its_end(server: Server, picture: Path) -> None:
    body = picture.read_bytes()

    def close_delimited(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Connection", "close")
        request.end_headers()
        for start in range(0, len(body), 100):
            request.wfile.write(body[start : start + 100])
        request.close_connection = True

    server.routes["/stream.png"] = close_delimited
    assert np.array_equal(np.asarray(load_image(server.url("/stream.png"))), np.asarray(load_image(picture)))


def test_load_images_mixes_urls_and_paths(server: Server, picture: Path, other_image: Image.Image) -> None:
    url = server.serve("/other.png", png_bytes(other_image))
    loaded = load_images([url, picture])
    assert np.array_equal(np.asarray(loaded[0]), np.asarray(other_image))
    assert np.array_equal(np.asarray(loaded[1]), np.asarray(load_image(picture)))


# --------------------------------------------------------------------------- refusals, each naming the URL


def test_a_404_names_the_url_and_the_status(server: Server) -> None:
    url = server.url("/missing.png")
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    _assert_names(err, url, "404", "check the address")


def test_a_server_that_never_answers_times_out() -> None:
    # A socket that listens but never accepts: the connection is made by the kernel, then silence.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/never.png"
    try:
        with pytest.raises(ImageInputError) as err:
            load_image(url, timeout=TIMEOUT)
    finally:
        silent.close()
    _assert_names(err, url, f"did not answer within {TIMEOUT:g} seconds")


def test_a_closed_port_says_it_could_not_be_reached() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when this block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/cat.png"
    with pytest.raises(ImageInputError) as err:
        load_image(url, timeout=TIMEOUT)
    _assert_names(err, url, "could not be reached")


def test_a_slow_drip_is_stopped_at_the_timeout(server: Server) -> None:
    stop = threading.Event()

    def drip(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(10**6))
        request.end_headers()
        request.close_connection = True
        # One byte every 50 ms: every single read is quick, the whole download would take 14 hours.
        # (Gives up after 10 s, so that a loader without a deadline fails this test instead of hanging it.)
        for _ in range(200):
            if stop.wait(0.05):
                break
            request.wfile.write(b"\x89")
            request.wfile.flush()

    server.routes["/drip.png"] = drip
    url = server.url("/drip.png")
    try:
        with pytest.raises(ImageInputError) as err:
            load_image(url, timeout=TIMEOUT)
    finally:
        stop.set()
    _assert_names(err, url, f"did not finish downloading within {TIMEOUT:g} seconds")


def _socket_buffer_bound() -> int:
    """The most bytes the kernel can hold for a loopback connection the loader stopped reading."""
    try:
        receive = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
        send = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):  # not Linux: a generous bound that still proves the point
        receive = send = 8 * 2**20
    return receive + send


def _stream_big_body(server: Server, declare_length: bool) -> Callable[[BaseHTTPRequestHandler], None]:
    """A handler offering BIG_BODY bytes that records in ``server.sent`` how many it managed to send."""
    piece = bytes(64 * 1024)

    def handler(request: BaseHTTPRequestHandler) -> None:
        sent = 0
        request.send_response(200)
        if declare_length:
            request.send_header("Content-Length", str(BIG_BODY))
        else:
            request.send_header("Connection", "close")  # length unknown: the loader must count itself
        request.end_headers()
        request.close_connection = True
        try:
            while sent < BIG_BODY:
                request.wfile.write(piece)
                sent += len(piece)
        finally:
            server.sent[request.path] = sent

    return handler


@pytest.mark.parametrize("declare_length", [False, True], ids=["undeclared-length", "declared-length"])
def test_a_body_over_the_byte_cap_is_not_read_past_the_cap(server: Server, declare_length: bool) -> None:
    path = "/huge.png"
    server.routes[path] = _stream_big_body(server, declare_length)
    url = server.url(path)
    with pytest.raises(ImageInputError) as err:
        load_image(url, max_bytes=CAP)
    expected = f"{BIG_BODY:,} bytes, more than the download limit" if declare_length else "larger than the"
    _assert_names(err, url, expected, f"{CAP:,} bytes", "max_bytes")
    # The loader hung up: the server's writes failed long before the 128 MiB were out. What it got rid of
    # is at most what the loader read (CAP + 1) plus what the kernel buffers on both sides can hold.
    assert server.finished[path].wait(timeout=60), "the server never noticed that the loader hung up"
    assert server.sent[path] <= CAP + 1 + _socket_buffer_bound() + 64 * 1024
    assert server.sent[path] < BIG_BODY


@pytest.mark.parametrize(
    ("width", "height", "fragments"),
    [
        # Over our limit (100 MP) but under Pillow's own bomb guard: our check on the header says so.
        (12_000, 9_000, ["12000x9000 = 108,000,000 pixels", "more than the limit of 100,000,000 pixels"]),
        # Far over both: Pillow refuses while reading the header, as for a file.
        (100_000, 100_000, ["too large to decode safely", "downscale it first"]),
    ],
)
def test_a_header_claiming_a_huge_image_is_refused_before_decoding(
    server: Server, width: int, height: int, fragments: list[str]
) -> None:
    url = server.serve("/bomb.png", _png_claiming(width, height))
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    _assert_names(err, url, *fragments)


def test_the_pixel_limit_applies_to_urls_as_to_files(server: Server) -> None:
    url = server.serve("/small.png", png_bytes(Image.new("RGB", (11, 10))))
    with pytest.raises(ImageInputError) as err:
        load_image(url, max_pixels=100)
    _assert_names(err, url, "11x10 = 110 pixels", "limit of 100 pixels")
    assert load_image(url, max_pixels=110).size == (11, 10)


def test_an_html_page_is_refused_as_not_an_image(server: Server) -> None:
    page = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>"
    url = server.serve("/photo.jpg", page, content_type="image/jpeg")  # the header lies; the bytes decide
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    _assert_names(err, url, "HTML page", "not an allowed image format")


def test_an_empty_response_is_refused(server: Server) -> None:
    url = server.serve("/empty.png", b"")
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    _assert_names(err, url, "sent no data")


def test_a_redirect_loop_is_bounded(server: Server) -> None:
    hops: list[str] = []

    def loop(request: BaseHTTPRequestHandler) -> None:
        hops.append(request.path)
        request.send_response(302)
        request.send_header("Location", f"/hop{len(hops)}")  # a new address each time: no repeat to spot
        request.send_header("Content-Length", "0")
        request.end_headers()

    for i in range(50):
        server.routes[f"/hop{i}"] = loop
    url = server.url("/hop0")
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    _assert_names(err, url, f"more than {MAX_REDIRECTS} times")
    assert len(hops) == MAX_REDIRECTS + 1  # the first request, then MAX_REDIRECTS redirects followed


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/cat.png"])
def test_a_redirect_away_from_http_is_refused(server: Server, target: str) -> None:
    def redirect(request: BaseHTTPRequestHandler) -> None:
        request.send_response(301)
        request.send_header("Location", target)
        request.send_header("Content-Length", "0")
        request.end_headers()

    server.routes["/away"] = redirect
    url = server.url("/away")
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    _assert_names(err, url, f"redirects to {target!r}", "not an http(s) URL")


def test_a_server_error_names_the_status(server: Server) -> None:
    url = server.serve("/broken.png", b"oops", status=503, content_type="text/plain")
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    _assert_names(err, url, "answered 503")


@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("file:///tmp/cat.png", ["file:// URL", "pass the file's path instead"]),
        ("ftp://127.0.0.1/cat.png", ["ftp://", "only http:// and https:// URLs are downloaded"]),
        ("sftp://127.0.0.1/cat.png", ["sftp://", "only http:// and https:// URLs are downloaded"]),
        ("data:image/png;base64,iVBORw0KGgo=", ["data: URL", "decode its base64 payload"]),
    ],
)
def test_other_schemes_are_refused_with_a_sentence(url: str, fragments: list[str], monkeypatch) -> None:
    import urllib.request

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused scheme must not be opened")

    monkeypatch.setattr(urllib.request, "build_opener", no_network)
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    _assert_names(err, url, *fragments)


def test_credentials_in_a_url_are_never_sent_or_shown(server: Server, picture: Path) -> None:
    server.serve("/picture.png", picture.read_bytes())
    url = server.base.replace("http://", "http://student:hunter2@") + "/picture.png"
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    assert "hunter2" not in str(err.value) and "student" not in str(err.value)
    assert repr(server.url("/picture.png")) in str(err.value)
    assert "/picture.png" not in server.finished  # refused before any request


def test_the_name_argument_replaces_the_url_in_errors(server: Server) -> None:
    with pytest.raises(ImageInputError, match="^'cat photo' could not be downloaded: the server answered 404"):
        load_image(server.url("/nope.png"), name="cat photo")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": float("inf")}, "timeout must be a positive number"),
        ({"timeout": True}, "timeout must be a positive number"),
        ({"max_bytes": 0}, "max_bytes must be a positive integer"),
        ({"max_bytes": 1.5}, "max_bytes must be a positive integer"),
    ],
)
def test_invalid_download_limits_are_programming_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        load_image("http://127.0.0.1:9/cat.png", **kwargs)
    assert not isinstance(err.value, ImageInputError)


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("https://example.com/images/cat.png", "'https://example.com/images/cat.png'"),
        ("http://example.com:8080/cat.png", "'http://example.com:8080/cat.png'"),
        ("https://bucket.s3.amazonaws.com/cat.png?X-Amz-Signature=abc123", "'https://bucket.s3.amazonaws.com/cat.png?…'"),
        ("https://me:secret@example.com/cat.png", "'https://example.com/cat.png'"),
        (
            "https://example.com/" + "deep/" * 30 + "cat.png",
            "'https://example.com/deep/deep/deep/deep/deep…/deep/deep/deep/deep/deep/cat.png'",
        ),
        ("data:image/png;base64," + "A" * 200, "'data:image/png;base64,AAAAAAAAAAAAAAAAA…'"),
        ("HTTPS://Example.com/cat.png", "'https://Example.com/cat.png'"),
        ("C://photos/cat.png", "'cat.png'"),  # a Windows drive letter is a path, not a URL scheme
    ],
)
def test_describe_source_names_urls_sensibly(src: str, expected: str) -> None:
    assert describe_source(src) == expected
