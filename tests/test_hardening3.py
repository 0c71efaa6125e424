"""Hardening, round three (issue 27): the newer surfaces against hostile input.

URLs, FIFOs, JSON settings, recipes in PNGs, embeddings files, batch manifests, LoRA names and terminal
output. Each test states what a user relies on: one ``ValueError`` subclass (or one line on the command line)
naming the input and what to do, nothing written half, finished batch rows kept, and time and memory
bounded before any work the input controls. Local HTTP servers listen on 127.0.0.1 only (the server of
test_image_urls.py) and stop by themselves; times are bounded by structure (a deadline the code enforces
against a server that would hold it far longer), never measured.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest
import test_image_urls
from PIL import Image
from test_image_urls import Server, _socket_buffer_bound

from imageprompt_widgets.images import MAX_REDIRECTS, ImageInputError, load_image
from imageprompt_widgets.loading.offline import sample_image

TIMEOUT = 1.0
CAP = 256 * 1024
#: What a hostile server offers: far beyond the loader's budget (the cap plus its 1 MiB for headers).
FLOOD = 24 * 2**20

#: test_image_urls' server on 127.0.0.1 (a fixture) and its autouse fixture keeping proxies away from it.
server = test_image_urls.server
_no_proxy = test_image_urls._no_proxy


def png_bytes(image: Image.Image | None = None) -> bytes:
    buffer = io.BytesIO()
    (image or sample_image(0, size=(32, 32))).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_one_sentence_naming(err: pytest.ExceptionInfo[BaseException], name: str, *fragments: str) -> None:
    message = str(err.value)
    assert name in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


# -- 1. URL limits cover the whole request -------------------------------------------------------------


def test_a_status_line_dripped_byte_by_byte_is_stopped_at_the_deadline(server: Server) -> None:
    stop = threading.Event()

    def drip_head(request) -> None:
        request.close_connection = True
        # One header byte every 0.1 s for up to 20 s: each read is quick, the answer never completes in time.
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: " + b"a" * 200:
            if stop.wait(0.1):
                return
            request.wfile.write(bytes([byte]))
            request.wfile.flush()

    server.routes["/drip-head.png"] = drip_head
    url = server.url("/drip-head.png")
    try:
        with pytest.raises(ImageInputError) as err:
            load_image(url, timeout=TIMEOUT)
    finally:
        stop.set()
    assert_one_sentence_naming(err, repr(url), f"did not answer within {TIMEOUT:g} seconds", "larger timeout")


def _flood(server: Server, head: bytes, piece: bytes, path: str) -> None:
    """A route that sends ``head`` then ``piece`` again and again, FLOOD bytes at most, counting what went out."""

    def handler(request) -> None:
        request.close_connection = True
        sent = 0
        try:
            request.wfile.write(head)
            while sent < FLOOD:
                request.wfile.write(piece)
                sent += len(piece)
        finally:
            server.sent[path] = sent

    server.routes[path] = handler


def test_a_flood_of_100_continue_replies_is_cut_at_the_byte_budget(server: Server) -> None:
    _flood(server, b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 512, "/continue.png")
    url = server.url("/continue.png")
    with pytest.raises(ImageInputError) as err:
        load_image(url, max_bytes=CAP)
    assert_one_sentence_naming(err, repr(url), "sent more than", "max_bytes")
    assert server.finished["/continue.png"].wait(timeout=60)
    assert server.sent["/continue.png"] <= CAP + 2**20 + _socket_buffer_bound() + 2**16


def test_an_endless_trailer_after_a_chunked_png_is_counted(server: Server) -> None:
    body = png_bytes()
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n")
    _flood(server, head, b"X-Trailer: " + b"t" * 1000 + b"\r\n", "/trailer.png")
    url = server.url("/trailer.png")
    with pytest.raises(ImageInputError) as err:
        load_image(url, max_bytes=CAP)
    assert_one_sentence_naming(err, repr(url), "sent more than", "max_bytes")
    assert server.finished["/trailer.png"].wait(timeout=60)
    assert server.sent["/trailer.png"] <= CAP + 2**20 + _socket_buffer_bound() + 2**16


def test_slow_redirect_hops_share_one_deadline(server: Server) -> None:
    # MAX_REDIRECTS hops and the picture, each answering after 0.6 s: each is well within the timeout,
    # all together are three times past it.
    def hop(number: int):
        def handler(request) -> None:
            time.sleep(0.6)
            if number == MAX_REDIRECTS:
                server.routes["/picture.png"](request)
                return
            request.send_response(302)
            request.send_header("Location", f"/hop{number + 1}")
            request.send_header("Content-Length", "0")
            request.end_headers()

        return handler

    server.serve("/picture.png", png_bytes())
    for number in range(MAX_REDIRECTS + 1):
        server.routes[f"/hop{number}"] = hop(number)
    url = server.url("/hop0")
    with pytest.raises(ImageInputError) as err:
        load_image(url, timeout=TIMEOUT * 1.5)
    assert_one_sentence_naming(err, repr(url), "did not answer within 1.5 seconds")
    assert f"/hop{MAX_REDIRECTS}" not in server.finished  # the deadline ended the chain before its last hop


def test_a_fast_redirect_chain_still_loads(server: Server) -> None:
    picture = png_bytes()
    server.serve("/picture.png", picture)

    def redirect(request) -> None:
        request.send_response(302)
        request.send_header("Location", "/picture.png")
        request.send_header("Content-Length", "0")
        request.end_headers()

    server.routes["/go"] = redirect
    loaded = load_image(server.url("/go"), timeout=10)
    assert loaded.tobytes() == Image.open(io.BytesIO(picture)).convert("RGB").tobytes()


# -- 2. a redirect to a URL with credentials ---------------------------------------------------------


def test_a_redirect_to_a_url_with_credentials_is_refused_without_showing_them(server: Server) -> None:
    server.serve("/picture.png", png_bytes())
    target = server.base.replace("http://", "http://student:hunter2@") + "/picture.png"

    def redirect(request) -> None:
        request.send_response(302)
        request.send_header("Location", target)
        request.send_header("Content-Length", "0")
        request.end_headers()

    server.routes["/login"] = redirect
    url = server.url("/login")
    with pytest.raises(ImageInputError) as err:
        load_image(url)
    assert_one_sentence_naming(err, repr(url), "user name or password", "download the image yourself")
    assert "hunter2" not in str(err.value) and "student" not in str(err.value)
    assert "/picture.png" not in server.finished  # never followed


# -- 3. a FIFO is not a file -------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
@pytest.mark.timeout(120)
def test_a_fifo_is_refused_instead_of_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[BaseException | object] = []

    def load() -> None:
        try:
            outcome.append(load_image(fifo))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():  # blocked in open(): a writer releases it, then the test fails
        with open(fifo, "wb"):
            pass
        worker.join(timeout=30)
        pytest.fail("load_image blocked on a FIFO")
    (err,) = outcome
    assert isinstance(err, ImageInputError), err
    assert "'pipe.png' is not a regular file" in str(err)
