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
import json
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import test_image_urls
from helpers import assert_same_pixels, optional_module, png_bytes
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_image_urls import Server, _socket_buffer_bound

from imageprompt_widgets import settings as settings_module
from imageprompt_widgets.batch.manifest import read_manifest
from imageprompt_widgets.cli import main
from imageprompt_widgets.engine.results import (
    MAX_METADATA_CHARS,
    Provenance,
    recipe_from_png,
    recipe_of,
    save_png,
)
from imageprompt_widgets.images import MAX_REDIRECTS, ImageInputError, load_image
from imageprompt_widgets.loading.offline import sample_image
from imageprompt_widgets.settings import MAX_CONTROL_UNITS, ControlUnit, GenerationSettings, SettingsError
from imageprompt_widgets.widget.recipe import RecipeError, read_recipe

TIMEOUT = 1.0
CAP = 256 * 1024
#: What a hostile server offers: far beyond the loader's budget (the cap plus its 1 MiB for headers).
FLOOD = 24 * 2**20

#: test_image_urls' server on 127.0.0.1 (a fixture) and its autouse fixture keeping proxies away from it.
server = test_image_urls.server
_no_proxy = test_image_urls._no_proxy


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
    body = png_bytes(sample_image(0, size=(32, 32)))
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

    server.serve("/picture.png", png_bytes(sample_image(0, size=(32, 32))))
    for number in range(MAX_REDIRECTS + 1):
        server.routes[f"/hop{number}"] = hop(number)
    url = server.url("/hop0")
    with pytest.raises(ImageInputError) as err:
        load_image(url, timeout=TIMEOUT * 1.5)
    assert_one_sentence_naming(err, repr(url), "did not answer within 1.5 seconds")
    assert f"/hop{MAX_REDIRECTS}" not in server.finished  # the deadline ended the chain before its last hop


def test_a_fast_redirect_chain_still_loads(server: Server) -> None:
    picture = png_bytes(sample_image(0, size=(32, 32)))
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
    server.serve("/picture.png", png_bytes(sample_image(0, size=(32, 32))))
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


# -- 4. JSON settings nested thousands deep, too many units, huge numbers ---------------------------------

DEEP = 50_000


def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "settings",
    [
        {"structure": "edges", "control_units": "[" * DEEP + "]" * DEEP},
        {"structure": "edges", "control_units": "[" * 5_000 + "]" * 5_000},
        {"adapter_block_scales": '{"up": ' * 5_000 + "1" + "}" * 5_000},
        {"structure": "edges", "control_units": nested_list(DEEP)},
        {"adapter_block_scales": {"up": nested_list(DEEP)}},
    ],
    ids=["units-text-long", "units-text", "block-scales-text", "units-object", "block-scales-object"],
)
def test_deeply_nested_json_settings_are_one_settings_error(settings: dict) -> None:
    name = next(key for key in settings if key != "structure")
    with pytest.raises(SettingsError) as err:
        GenerationSettings(**settings)
    assert_one_sentence_naming(err, name)
    assert len(str(err.value)) < 300


def test_a_number_of_thousands_of_digits_names_its_setting() -> None:
    with pytest.raises(SettingsError) as err:
        GenerationSettings(structure="edges", control_units='[{"kind": "depth", "canny_low": ' + "7" * 5_000 + "}]")
    assert_one_sentence_naming(err, "control_units", "write it like")


@pytest.mark.parametrize("as_text", [False, True], ids=["objects", "json-text"])
def test_too_many_units_are_counted_before_any_is_checked(monkeypatch, as_text: bool) -> None:
    checked: list[dict] = []
    real = ControlUnit.from_kwargs.__func__

    def counting(cls, **kwargs):
        checked.append(kwargs)
        return real(cls, **kwargs)

    monkeypatch.setattr(ControlUnit, "from_kwargs", classmethod(counting))
    units = [{"kind": "depth"}] * (1_000 if as_text else 100_000)
    with pytest.raises(SettingsError, match=f"at most {MAX_CONTROL_UNITS} ControlNets"):
        GenerationSettings(structure="edges", control_units=json.dumps(units) if as_text else units)
    assert checked == []


def test_block_scales_beyond_any_use_are_refused_up_front() -> None:
    with pytest.raises(SettingsError) as err:
        GenerationSettings(adapter_block_scales={"down": 1e308})
    assert_one_sentence_naming(err, "adapter_block_scales", "1e+308", f"{settings_module.MAX_BLOCK_SCALE:g}")
    assert GenerationSettings(adapter_block_scales={"down": -10.0}).block_scales() == {"down": -10.0}


def test_the_command_line_says_one_line_for_nested_json(tmp_path: Path, capsys) -> None:
    photo = tmp_path / "photo.png"
    sample_image(0).save(photo)
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny", "--structure", "edges",
                 "--control-units", "[" * DEEP + "]" * DEEP])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "control_units" in err, err
    assert not (tmp_path / "out").exists()


def test_a_batch_row_nested_thousands_deep_fails_alone(tmp_path: Path, capsys) -> None:
    sample_image(0).save(tmp_path / "good.png")
    rows = [json.dumps({"image": "good.png"}),
            '{"image": "good.png", "control_units": ' + "[" * DEEP + "]" * DEEP + "}",
            '{"image": "good.png", "structure": "edges", "control_units": "' + "[" * 5_000 + "]" * 5_000 + '"}']
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = main(["batch", str(listing), "-o", str(out), "--model", "tiny", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert [row["input"] for row in read_manifest(out)] == ["good.png"]
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [failure["input"] for failure in failed] == ["list.jsonl line 2", "good.png"]
    assert "Traceback" not in err


# -- 5. one recipe reader: chunks before the pixels, for the panel too ---------------------------------


def png_with_recipe(recipe: dict, size: tuple[int, int] = (8, 8)) -> bytes:
    info = PngInfo()
    info.add_text("imageprompt", json.dumps(recipe))
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def claiming(png: bytes, width: int, height: int) -> bytes:
    """``png`` with an IHDR that claims ``width`` x ``height`` (CRC fixed): a decompression bomb's header."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


RECIPE = {"settings": {"seed": 5, "steps": 3}, "model": {"preset": "tiny"}}


def test_both_readers_give_the_recipe_of_a_png_claiming_20000_squared(tmp_path: Path) -> None:
    bomb = claiming(png_with_recipe(RECIPE), 20_000, 20_000)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(Image.DecompressionBombError):  # the header really claims it: Pillow refuses to open it
        Image.open(path)
    assert recipe_from_png(path) == RECIPE
    assert read_recipe(bomb, "bomb.png") == RECIPE
    assert read_recipe(path) == RECIPE


def test_the_panels_reader_never_decodes_the_pixels(tmp_path: Path, monkeypatch) -> None:
    data = png_with_recipe(RECIPE, size=(600, 600))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the pixels were decoded"))
    assert read_recipe(data, "big.png") == RECIPE
    assert read_recipe(io.BytesIO(data), "big.png") == RECIPE


def test_a_truncated_png_whose_recipe_is_intact_reads_in_both(tmp_path: Path) -> None:
    data = png_with_recipe(RECIPE, size=(64, 64))
    cut = data[: data.index(b"IDAT") + 20]
    path = tmp_path / "cut.png"
    path.write_bytes(cut)
    assert recipe_from_png(path) == RECIPE == read_recipe(cut, "cut.png")


def test_nested_json_in_an_uploaded_recipe_is_a_recipe_error() -> None:
    info = PngInfo()
    info.add_text("imageprompt", "[" * 200_000 + "]" * 200_000)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    with pytest.raises(RecipeError) as err:
        read_recipe(buffer.getvalue(), "deep.png")
    assert_one_sentence_naming(err, "'deep.png'", "nested too deeply")


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "is not a PNG with a recipe"),
        (b"\x89PNG\r\n\x1a\n", "carries no imageprompt recipe"),
        (b"\x89PNG\r\n\x1a\n" + b"\xff" * 8, "carries no imageprompt recipe"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x10tEXtimageprompt\x00{", "is not valid JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x10zTXtimageprompt\x00\x00junk", "damaged"),
        (b"\x89PNG\r\n\x1a\n\xff\xff\xff\xfftEXtimageprompt\x00", "far more than any saved run"),
    ],
    ids=["empty", "signature-only", "garbage-chunk", "cut-json", "bad-zlib", "4gb-chunk"],
)
def test_hostile_recipe_bytes_are_one_recipe_error(data: bytes, says: str) -> None:
    with pytest.raises(RecipeError) as err:
        read_recipe(data, "upload.png")
    assert_one_sentence_naming(err, "'upload.png'", says)


def test_a_compressed_recipe_bomb_is_cut_at_the_limit() -> None:
    info = PngInfo()
    info.add_text("imageprompt", json.dumps({"x": "y" * 50 * 2**20}), zip=True)  # 50 MB inflating from 50 KB
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    with pytest.raises(RecipeError, match="far more than any saved run"):
        read_recipe(buffer.getvalue(), "zbomb.png")


# -- 8. what is accepted can be read back --------------------------------------------------------------


def test_a_million_character_negative_prompt_is_refused_up_front() -> None:
    with pytest.raises(SettingsError) as err:
        GenerationSettings(negative_prompt="x" * 1_100_000)
    assert_one_sentence_naming(err, "negative_prompt", "shorten")


def test_the_largest_accepted_settings_save_a_png_that_reads_back(tmp_path: Path) -> None:
    # Astral characters take 12 characters each in the saved JSON: the worst case per typed character.
    def fits(count: int) -> bool:
        settings = {"prompt": "😀" * count, "negative_prompt": "😀" * count}
        return len(json.dumps(settings)) <= MAX_METADATA_CHARS // 2 - 2_000  # half the reader's limit

    count = 1
    while fits(count * 2):
        count *= 2
    settings = GenerationSettings(prompt="😀" * count, negative_prompt="😀" * count)
    provenance = Provenance(method="blend", model={"preset": "tiny"})
    path = save_png(sample_image(0, size=(16, 16)), tmp_path, recipe_of(settings, provenance))
    assert recipe_from_png(path)["settings"] == settings.to_dict()
    with pytest.raises(SettingsError, match="shorten prompt or negative_prompt"):
        GenerationSettings(prompt="😀" * count * 2, negative_prompt="😀" * count * 2)


# -- 7. structure images are counted before any is decoded ---------------------------------------------


def test_too_many_structure_images_are_refused_before_decoding(tiny_pipe, monkeypatch) -> None:
    import imageprompt_widgets.engine.pipeline as pipeline_module

    decoded: list[object] = []
    real = pipeline_module.load_images
    monkeypatch.setattr(pipeline_module, "load_images", lambda srcs, **kw: decoded.append(srcs) or real(srcs, **kw))
    pictures = [sample_image(index % 3, size=(64, 64)) for index in range(150)]
    with pytest.raises(SettingsError, match="150 structure images for 1 ControlNet unit"):
        tiny_pipe.generate(sample_image(0), structure="edges", structure_image=pictures, steps=1)
    assert all(srcs is not pictures for srcs in decoded)


# -- 9. a LoRA file name that is not a file ---------------------------------------------------------------


def test_a_missing_safetensors_lora_is_refused_before_the_model_loads(tmp_path: Path, capsys) -> None:
    photo = tmp_path / "photo.png"
    sample_image(0).save(photo)
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny",
                 "--lora", "nothere.safetensors=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "'nothere.safetensors' does not exist" in err and "hf download" not in err
    assert "imageprompt_widgets.engine.pipeline" not in sys.modules or not (tmp_path / "out").exists()


# -- 10-14. batch runs: hostile manifests, odd names, OUT around INPUT, two runs at once ---------------

BATCH = ["--model", "tiny", "--steps", "1"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    sample_image(0, size=(64, 64)).save(folder / "a.png")
    sample_image(1, size=(64, 64)).save(folder / "b.png")
    return folder


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "bad",
    [b'"index": "notanint"', b'"index": null', b'"file": 5', b'"file": "../../elsewhere.png"', b'"seed": 1.5'],
    ids=["index-text", "index-null", "file-number", "file-outside", "seed-float"],
)
def test_a_bad_manifest_row_is_one_warning_and_the_rest_resumes(photos: Path, tmp_path: Path, capsys, bad) -> None:
    out = tmp_path / "out"
    assert main(["batch", str(photos), "-o", str(out), *BATCH]) == 0
    good = manifest_lines(out)
    first = json.dumps(good[0]).encode()
    field = bad.split(b":")[0]
    start = first.index(field + b": ")
    end = first.index(b", ", start)
    broken = first[:start] + bad + first[end:]
    (out / "manifest.jsonl").write_bytes(broken + b"\n\xff\xfe not utf-8\n" + json.dumps(good[1]).encode() + b"\n")
    capsys.readouterr()
    assert main(["batch", str(photos), "-o", str(out), *BATCH]) == 0
    err = capsys.readouterr().err
    assert "manifest.jsonl line 1 " in err and "manifest.jsonl line 2 is not UTF-8" in err and "Traceback" not in err
    assert manifest_lines(out) == good  # the broken row's item ran again (same key, same file), the other was kept
    assert not (out / ".imageprompt-parts").exists()


def test_a_folder_named_manifest_jsonl_is_refused_before_any_work(photos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    (out / "manifest.jsonl").mkdir(parents=True)
    code = main(["batch", str(photos), "-o", str(out), *BATCH])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "manifest.jsonl" in err, err
    assert not list(out.glob("*.png")) and not (out / "manifest.jsonl.tmp").exists()


def test_names_with_invalid_utf8_bytes_go_into_a_parquet_manifest(tmp_path: Path, capsys) -> None:
    optional_module("pyarrow")
    folder = tmp_path / "photos"
    folder.mkdir()
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    sample_image(0, size=(64, 64)).save(folder / odd)
    out = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(out), *BATCH, "--manifest", "parquet"]) == 0
    import pyarrow.parquet as pq

    (row,) = pq.read_table(out / "manifest.parquet").to_pylist()
    assert row["input"] == "caf\\xe9.png" and (out / row["file"]).is_file()
    capsys.readouterr()
    assert main(["batch", str(folder), "-o", str(out), *BATCH, "--manifest", "parquet"]) == 0
    assert "0 generated" in capsys.readouterr().err  # the rerun knows it
    assert len(pq.read_table(out / "manifest.parquet").to_pylist()) == 1


@pytest.mark.parametrize("where", ["inside", "same"])
def test_input_inside_out_is_listed(photos: Path, capsys, where: str) -> None:
    out = photos.parent if where == "inside" else photos
    assert main(["batch", str(photos), "-o", str(out), *BATCH]) == 0
    assert sorted(row["input"] for row in manifest_lines(out)) == ["a.png", "b.png"]
    capsys.readouterr()
    assert main(["batch", str(photos), "-o", str(out), *BATCH]) == 0  # its own PNGs are not new inputs
    assert "0 generated" in capsys.readouterr().err and len(manifest_lines(out)) == 2


def test_control_characters_in_names_print_as_one_inert_line(tmp_path: Path, capsys) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text('image\n"no\x1b[2Jsuch\nfile.png"\n')
    code = main(["batch", str(listing), "-o", str(tmp_path / "out"), *BATCH])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("imageprompt: skipped")]
    assert "\x1b" not in err and "no\\x1b[2Jsuch\\nfile.png" in line


@pytest.mark.timeout(600)
def test_a_second_batch_into_the_same_out_refuses_while_the_first_runs(photos: Path, tmp_path: Path, capsys) -> None:
    from imageprompt_widgets.batch.run import run_batch
    from imageprompt_widgets.engine.controller import Started

    out = tmp_path / "out"
    started, release = threading.Event(), threading.Event()

    def hold(event) -> None:
        if isinstance(event, Started):
            started.set()
            release.wait(timeout=60)  # a second run that is not refused waits this long for the pipeline

    reports: list[object] = []
    first = threading.Thread(
        target=lambda: reports.append(run_batch(photos, out, settings={"steps": 1}, model="tiny", progress=False,
                                                on_event=hold)),
        daemon=True,
    )
    first.start()
    try:
        assert started.wait(timeout=300)
        code = main(["batch", str(photos), "-o", str(out), *BATCH])
        err = capsys.readouterr().err
    finally:
        release.set()
        first.join(timeout=300)
    assert code == 2 and "being written by another batch run" in err and f"process {os.getpid()}" in err, err
    (report,) = reports
    assert report.ok and report.images == 2
    assert sorted(row["input"] for row in manifest_lines(out)) == ["a.png", "b.png"]
    assert len(list(out.glob("*.png"))) == 2


# -- 6. embeddings files: one EmbeddingFileError, never a raw error or a misaligned table ----------------


def write_safetensors(path: Path, tensors: dict, metadata: dict | None) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.as_tensor(value) for name, value in tensors.items()}, str(path), metadata=metadata)
    return path


EMBEDDINGS = {
    "trace-file": ({"image_embeds": [[0.0, 1.0]], "prompt_embeds": [[[0.0]]]},
                   {"imageprompt": json.dumps({"recipe": {}, "latent_steps": []})}, "no inputs"),
    "nested-metadata": ({"image_embeds": [[0.0, 1.0]]}, {"imageprompt": "[" * 100_000 + "]" * 100_000},
                        "nested too deeply"),
    "one-input-two-rows": ({"image_embeds": [[0.0, 1.0], [1.0, 0.0]]},
                           {"imageprompt": json.dumps({"inputs": ["a.png"], "fingerprints": ["ab"]})},
                           "lists 1 inputs and 1 fingerprints for 2 embedding rows"),
    "inputs-not-names": ({"image_embeds": [[0.0, 1.0]]},
                         {"imageprompt": json.dumps({"inputs": [5], "fingerprints": ["ab"]})}, "not a list of names"),
    "no-embeds": ({"other": [1.0]}, {"imageprompt": json.dumps({"inputs": [], "fingerprints": []})}, "no image_embeds"),
}


@pytest.mark.parametrize("case", sorted(EMBEDDINGS))
def test_a_hostile_embeddings_file_is_one_embedding_file_error(tmp_path: Path, case: str) -> None:
    from imageprompt_widgets.batch.embed import EmbeddingFileError, load_embeddings

    tensors, metadata, says = EMBEDDINGS[case]
    path = write_safetensors(tmp_path / f"{case}.safetensors", tensors, metadata)
    with pytest.raises(EmbeddingFileError) as err:
        load_embeddings(path)
    assert_one_sentence_naming(err, str(path), says)


@pytest.mark.parametrize("junk", [b"\xff" * 64, (2**40).to_bytes(8, "little") + b"{}", b"", b"\x08\x00" + b"\x00" * 6])
def test_junk_with_an_embeddings_suffix_is_one_embedding_file_error(tmp_path: Path, junk: bytes) -> None:
    from imageprompt_widgets.batch.embed import EmbeddingFileError, load_embeddings

    for suffix in (".safetensors", ".parquet"):
        if suffix == ".parquet":
            optional_module("pyarrow")
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(junk)
        with pytest.raises(EmbeddingFileError) as err:
            load_embeddings(path)
        assert_one_sentence_naming(err, str(path))


def test_embeddings_of_names_with_invalid_utf8_save_as_parquet(tmp_path: Path) -> None:
    optional_module("pyarrow")
    import torch

    from imageprompt_widgets.batch.embed import EmbeddingTable, load_embeddings

    odd = os.fsdecode(b"caf\xe9.png")
    table = EmbeddingTable([odd], ["ab"], torch.ones(1, 4))
    loaded = load_embeddings(table.save(tmp_path / "x.parquet"))
    assert loaded.inputs == ["caf\\xe9.png"] and torch.equal(loaded.image_embeds, table.image_embeds)
    assert load_embeddings(table.save(tmp_path / "x.safetensors")).inputs == [odd]  # JSON keeps it exactly
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.parquet", "x.safetensors"]


# -- also seen: a NaN decode is one sentence, without numpy's warning before it ----------------------------


def test_a_nan_decode_prints_no_numpy_warning(tiny_pipe) -> None:
    import warnings

    from imageprompt_widgets.engine.pipeline import NonFiniteImageError

    handle = tiny_pipe.sd.vae.decoder.register_forward_hook(lambda module, args, output: output * float("nan"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(NonFiniteImageError):
                tiny_pipe.generate(sample_image(0), steps=1, seed=0)
    finally:
        handle.remove()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_a_lora_whose_shapes_do_not_fit_is_one_sentence(tiny_pipe, tmp_path):
    """A LoRA made for another model (here: one layer's rank doubled) said only "You set
    `ignore_mismatched_sizes` to `False` ... look at the above report!"; now it says what is wrong."""
    import torch
    from safetensors.torch import load_file, save_file

    from imageprompt_widgets.loading.lora import LoraError
    from imageprompt_widgets.loading.offline import ensure_tiny_lora, sample_image

    tensors = load_file(next(Path(ensure_tiny_lora()).glob("*.safetensors")))
    name = next(key for key in sorted(tensors) if "lora_A" in key)
    tensors[name] = torch.zeros(tensors[name].shape[0] * 2, *tensors[name].shape[1:])
    save_file(tensors, tmp_path / "other_model.safetensors")
    before = tiny_pipe.generate(sample_image(), steps=1, seed=3).images[0]
    with pytest.raises(LoraError) as caught:
        tiny_pipe.load_lora(str(tmp_path / "other_model.safetensors"))
    assert str(caught.value).startswith("The LoRA ") and "does not fit this model" in str(caught.value)
    assert "report" not in str(caught.value) and "\n" not in str(caught.value)
    assert not tiny_pipe.loras  # nothing half loaded stays on the shared pipeline
    assert_same_pixels(tiny_pipe.generate(sample_image(), steps=1, seed=3).images[0], before)
