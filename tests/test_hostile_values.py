"""Hostile files and values, and saving results where the disk refuses: one typed ``ValueError`` sentence each.

Saved traces and PNGs come back from strangers (a class shares them); settings come from numpy; uploads come
from any browser. Nothing here may raise anything but the package's own typed errors, or write outside the
folder it was given.
"""

from __future__ import annotations

import errno
import json
import os
import struct

import numpy as np
import pytest
import torch
from helpers import one_sentence
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from imageprompt_widgets.engine.results import ResultFileError, SaveError, Trace, recipe_from_png

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def result(tiny_pipe):
    from imageprompt_widgets.loading.offline import sample_image

    return tiny_pipe.generate(sample_image(0), steps=1)


# -- saving: a prefix that leaves the folder, a full disk, a folder that cannot be written -------------------


@pytest.mark.parametrize("prefix", ["../x", "..", "a/b", "a\\b", "/etc/x", "", "x\0y"])
def test_a_prefix_that_would_leave_the_folder_is_refused(result, tmp_path, prefix):
    folder = tmp_path / "out"
    with pytest.raises(SaveError) as err:
        result.save(folder, prefix=prefix)
    assert f"prefix={prefix!r}" in one_sentence(err.value)
    assert not list(tmp_path.rglob("*.png"))  # nothing written anywhere


def test_an_ordinary_prefix_still_saves(result, tmp_path):
    paths = result.save(tmp_path, prefix="cat.v2 run-1")
    assert [path.parent for path in paths] == [tmp_path] and paths[0].name.startswith("cat.v2 run-1-seed0-")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_saving_images_on_a_full_disk_is_one_sentence_and_leaves_no_partial_file(result, tmp_path, monkeypatch):
    real_save = Image.Image.save

    def save_half_then_fail(image, fp, *args, **kwargs):
        real_save(image, fp, *args, **kwargs)
        with open(fp, "r+b") as file:
            file.truncate(10)  # as a disk filling up mid-write leaves it
        _enospc()

    monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
    with pytest.raises(SaveError) as err:
        result.save(tmp_path)
    assert one_sentence(err.value) == (f"Could not save the images to {tmp_path}: the disk holding {tmp_path} is full; "
                                       "free some space, or save to another folder.")
    assert not list(tmp_path.iterdir())


def test_saving_images_into_a_read_only_folder_is_one_sentence_simulated(result, tmp_path, monkeypatch):
    def refused(image, fp, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(fp))

    monkeypatch.setattr(Image.Image, "save", refused)
    with pytest.raises(SaveError) as err:
        result.save(tmp_path)
    assert one_sentence(err.value) == (f"Could not save the images to {tmp_path}: {tmp_path} cannot be written "
                                       "(permission denied); save to another folder.")


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
def test_saving_images_into_a_read_only_folder_is_one_sentence(result, tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(SaveError, match="cannot be written"):
            result.save(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_saving_into_a_folder_that_is_a_file_is_one_sentence(result, tmp_path):
    blocker = tmp_path / "out.png"
    blocker.write_bytes(b"x")
    with pytest.raises(SaveError) as err:
        result.save(blocker / "sub")
    assert one_sentence(err.value) == (f"Could not save the images to {blocker / 'sub'}: {blocker} is a file, not a "
                                       "folder; remove it, or save to another folder.")
    with pytest.raises(SaveError, match=f"{blocker} is a file, not a folder"):
        result.trace.save(blocker / "trace.safetensors")


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_saving_a_trace_on_a_full_disk_is_one_sentence(result, tmp_path, monkeypatch, kind):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        if kind == "safetensors":
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                                  'space left on device" })')
        _enospc()

    path = tmp_path / "run.trace.safetensors"
    result.trace.save(path)  # an earlier trace at the same path
    earlier = path.read_bytes()
    real_save_file = safetensors.torch.save_file

    def half_then_full(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as file:
            file.truncate(100)  # as a disk filling up mid-write leaves it
        full()

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(SaveError) as err:
        result.trace.save(path)
    assert one_sentence(err.value) == (f"Could not save the trace to {path}: the disk holding {tmp_path} is full; "
                                       "free some space, or save to another folder.")
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_bytes() == earlier


# -- 6. Trace.save writes what its docstring says ----------------------------------------------------------


def test_trace_save_writes_one_file_holding_tensors_recipe_and_steps(result, tmp_path):
    path = result.trace.save(tmp_path / "run.safetensors", recipe=result.recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]  # no .json beside it
    assert ".json" not in Trace.save.__doc__
    trace, recipe = Trace.load(path)
    assert recipe == result.recipe
    assert trace.timesteps == result.trace.timesteps and trace.latent_steps == result.trace.latent_steps
    assert torch.equal(trace.prompt_embeds, result.trace.prompt_embeds)


# -- 5. hostile traces and PNGs: one ResultFileError naming the file --------------------------------------


def _write_trace(path, tensors: dict, meta: str | None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=None if meta is None else {"imageprompt": meta})


GOOD_TENSORS = {"image_embeds": torch.zeros(1, 8), "prompt_embeds": torch.zeros(1, 4, 8)}
GOOD_META = json.dumps({"latent_steps": [], "timesteps": [1.0], "recipe": {"settings": {"seed": 0}}})
DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE_TRACES = {
    "not-safetensors": (lambda path: path.write_text("hello"), "is not a trace"),
    "empty-file": (lambda path: path.write_bytes(b""), "is not a trace"),
    "huge-header-length": (lambda path: path.write_bytes(struct.pack("<Q", 2**62) + b"{}"), "is not a trace"),
    "no-image-embeds": (lambda path: _write_trace(path, {"prompt_embeds": torch.zeros(1, 4, 8)}, GOOD_META),
                        "has no image_embeds"),
    "no-prompt-embeds": (lambda path: _write_trace(path, {"image_embeds": torch.zeros(1, 8)}, GOOD_META),
                         "has no prompt_embeds"),
    "no-tensors": (lambda path: _write_trace(path, {}, GOOD_META), "has no image_embeds"),
    "wrong-rank": (lambda path: _write_trace(path, {**GOOD_TENSORS, "image_embeds": torch.zeros(8)}, GOOD_META),
                   "image_embeds has 1 dimension"),
    "integer-tensor": (lambda path: _write_trace(path, {**GOOD_TENSORS, "prompt_embeds": torch.zeros(1, 4, 8,
                                                                                                  dtype=torch.int64)},
                                                 GOOD_META), "prompt_embeds holds int64"),
    "deeply-nested-metadata": (lambda path: _write_trace(path, GOOD_TENSORS, DEEP), "metadata"),
    "metadata-not-json": (lambda path: _write_trace(path, GOOD_TENSORS, "{not json"), "metadata"),
    "metadata-a-list": (lambda path: _write_trace(path, GOOD_TENSORS, "[1, 2]"), "metadata"),
    "steps-a-string": (lambda path: _write_trace(path, GOOD_TENSORS, json.dumps({"latent_steps": "abc"})),
                       "latent_steps"),
    "timesteps-a-dict": (lambda path: _write_trace(path, GOOD_TENSORS, json.dumps({"timesteps": {"a": 1}})),
                         "timesteps"),
    "recipe-a-number": (lambda path: _write_trace(path, GOOD_TENSORS, json.dumps({"recipe": 5})), "recipe"),
    "huge-metadata": (lambda path: _write_trace(path, GOOD_TENSORS, json.dumps({"recipe": {"x": "y" * 2**21}})),
                      "metadata"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TRACES))
def test_a_hostile_trace_file_is_one_result_file_error_naming_it(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    make, says = HOSTILE_TRACES[case]
    make(path)
    with pytest.raises(ResultFileError) as err:
        Trace.load(path)
    text = one_sentence(err.value)
    assert str(path) in text and says in text, text


def test_a_missing_trace_file_is_one_result_file_error(tmp_path):
    with pytest.raises(ResultFileError, match="does not exist"):
        Trace.load(tmp_path / "nowhere.safetensors")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["latent_steps", "timesteps", "recipe", "settings", "x"]), children, max_size=4),
    max_leaves=20,
)
TENSOR_SHAPES = st.dictionaries(
    st.sampled_from(["pixel_values", "image_embeds", "hidden_states", "prompt_embeds", "negative_prompt_embeds",
                     "latents", "extras.x"]),
    st.lists(st.integers(0, 3), max_size=5), max_size=5)


@FUZZ
@given(tensors=TENSOR_SHAPES, meta=JSON_VALUES | st.text(max_size=40), dtype=st.sampled_from(
    [torch.float32, torch.float16, torch.int32, torch.bool]))
def test_fuzzed_trace_files_load_or_raise_result_file_error(tmp_path, tensors, meta, dtype):
    path = tmp_path / "fuzz.safetensors"
    text = meta if isinstance(meta, str) else json.dumps(meta)
    _write_trace(path, {name: torch.zeros(shape, dtype=dtype) for name, shape in tensors.items()}, text)
    try:
        trace, recipe = Trace.load(path)
    except ResultFileError as err:
        assert str(path) in one_sentence(err)
    else:
        assert trace.image_embeds.ndim == 2 and trace.prompt_embeds.ndim == 3 and isinstance(recipe, dict)
        assert all(isinstance(step, int) for step in trace.latent_steps)


def _png_with(path, text: str | None, key: str = "imageprompt") -> None:
    info = PngInfo()
    if text is not None:
        info.add_text(key, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


HOSTILE_PNGS = {
    "not-an-image": (lambda path: path.write_text("hello"), "is not a PNG"),
    "no-recipe": (lambda path: _png_with(path, None), "has no recipe"),
    "other-key": (lambda path: _png_with(path, "{}", key="parameters"), "has no recipe"),
    "not-json": (lambda path: _png_with(path, "{oops"), "recipe"),
    "a-list": (lambda path: _png_with(path, "[1, 2, 3]"), "recipe"),
    "deeply-nested": (lambda path: _png_with(path, "[" * 200_000 + "]" * 200_000), "recipe"),
    "huge-text": (lambda path: _png_with(path, json.dumps({"x": "y" * 3 * 2**20})), "recipe"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PNGS))
def test_a_hostile_png_is_one_result_file_error_naming_it(tmp_path, case):
    path = tmp_path / f"{case}.png"
    make, says = HOSTILE_PNGS[case]
    make(path)
    with pytest.raises(ResultFileError) as err:
        recipe_from_png(path)
    text = one_sentence(err.value)
    assert str(path) in text and says in text, text


@FUZZ
@given(value=JSON_VALUES | st.text(max_size=40) | st.binary(max_size=40))
def test_fuzzed_png_recipes_read_or_raise_result_file_error(tmp_path, value):
    path = tmp_path / "fuzz.png"
    if isinstance(value, bytes):
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + value)
    else:
        _png_with(path, value if isinstance(value, str) else json.dumps(value))
    try:
        recipe = recipe_from_png(path)
    except ResultFileError as err:
        assert str(path) in one_sentence(err)
    else:
        assert isinstance(recipe, dict)


def test_reading_a_recipe_never_decodes_the_pixels(tmp_path, monkeypatch):
    """A recipe is text before the pixels: a decompression bomb with a recipe must not be decoded to read it."""
    path = tmp_path / "bomb.png"
    _png_with(path, json.dumps({"settings": {"seed": 1}}))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the pixels were decoded"))
    assert recipe_from_png(path) == {"settings": {"seed": 1}}


def test_a_saved_result_reads_back(result, tmp_path):
    path = result.save(tmp_path)[0]
    assert recipe_from_png(path) == {**result.recipe, "index": 0}


# -- 5. hostile values: upload sizes, numpy settings, too many images, a flood of prompt text -----------------


@pytest.mark.parametrize("size", ["big", None, [1, 2], {"n": 1}, float("nan"), -5, 10**30, "12"])
def test_an_upload_whose_size_is_not_a_number_is_read_as_unknown(size):
    from imageprompt_widgets.widget.inputs import uploaded_files

    files = uploaded_files([{"name": "a.png", "size": size, "content": b"abc"}])
    assert [(f.name, f.content) for f in files] == [("a.png", b"abc")]
    assert files[0].size == (12 if size == "12" else 0)


@pytest.mark.parametrize("content", ["abc", 12, [1, 2], {"a": 1}])
def test_an_upload_whose_content_is_not_bytes_arrives_empty(content):
    from imageprompt_widgets.images import ImageInputError
    from imageprompt_widgets.widget.inputs import load_upload, uploaded_files

    files = uploaded_files([{"name": "a.png", "size": 3, "content": content}])
    assert files[0].content == b""
    with pytest.raises(ImageInputError, match="'a.png' .* arrived empty"):
        load_upload(files[0])


def test_an_upload_with_a_hostile_size_keeps_the_panel_usable(tiny_pipe, image):
    """The entry's size raised out of the FileUpload observer (ValueError from int("big")): the upload was lost
    silently and the panel's state was left half-updated."""
    import io

    import ipywidgets

    from imageprompt_widgets import ImagePromptWidget
    from imageprompt_widgets.widget import InlineRunner

    widget = ImagePromptWidget(pipeline=tiny_pipe, runner=InlineRunner(), steps=1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    content = buffer.getvalue()
    if int(ipywidgets.__version__.split(".")[0]) >= 8:
        widget.upload.set_state({"value": [{"name": "cat.png", "type": "image/png", "size": "big",
                                            "content": memoryview(content), "last_modified": 0}]})
    else:
        widget.upload.set_state({"metadata": [{"name": "cat.png", "type": "image/png", "size": "big"}],
                                 "data": [memoryview(content)], "_counter": widget.upload._counter + 1})
    assert len(widget.inputs.images) == 1  # the picture arrived
    assert widget.generate().result(120).images  # and the panel generates from it
    widget.close()


@pytest.mark.parametrize("name, value, expected", [
    ("scale", np.float32(0.5), 0.5), ("guidance_scale", np.float64(3.0), 3.0), ("steps", np.int64(12), 12),
    ("seed", np.uint32(7), 7), ("steps", np.float32(4.0), 4), ("num_images", np.int8(2), 2),
    ("weights", np.array([0.25, 0.75], dtype=np.float32), (0.25, 0.75)), ("norm_match", np.bool_(True), True),
])
def test_numpy_scalars_are_accepted_as_settings(name, value, expected):
    from imageprompt_widgets import GenerationSettings

    settings = GenerationSettings.from_kwargs(**{name: value})
    stored = getattr(settings, name)
    assert stored == expected and type(stored) is type(expected)  # plain Python numbers: the recipe is JSON
    assert json.loads(json.dumps(settings.to_dict()))[name] == (list(expected) if isinstance(expected, tuple)
                                                                   else expected)


@pytest.mark.parametrize("name, value, says", [
    ("scale", np.bool_(True), "must be a number"), ("steps", np.float32(2.5), "whole number"),
    ("scale", np.array([0.5]), "must be a number"), ("scale", np.array(0.5), "must be a number"),
    ("steps", np.float64("nan"), "whole number"), ("scale", np.float32("nan"), "NaN"),
    ("steps", np.int64(10**6), "outside its range"),
])
def test_numpy_values_that_are_not_plain_numbers_are_still_refused(name, value, says):
    from imageprompt_widgets import GenerationSettings
    from imageprompt_widgets.settings import SettingsError

    with pytest.raises(SettingsError, match=says):
        GenerationSettings.from_kwargs(**{name: value})


def test_too_many_input_images_are_refused_before_any_is_decoded(tiny_pipe, monkeypatch):
    from imageprompt_widgets import images as images_module
    from imageprompt_widgets.engine import pipeline as pipeline_module
    from imageprompt_widgets.images import ImageInputError
    from imageprompt_widgets.loading.offline import sample_image

    decoded = []
    monkeypatch.setattr(images_module, "load_image", lambda *a, **k: decoded.append(a) or sample_image(0))
    limit = pipeline_module.MAX_INPUT_IMAGES
    with pytest.raises(ImageInputError) as err:
        tiny_pipe.generate([sample_image(0)] * (limit + 1), steps=1)
    assert one_sentence(err.value) == (f"{limit + 1} input images are more than the {limit} one run takes: pass "
                                       f"at most {limit} (each is decoded and encoded at once).")
    with pytest.raises(ImageInputError, match="negative images"):
        tiny_pipe.generate(sample_image(0), negative_image=[sample_image(0)] * (limit + 1), steps=1)
    assert not decoded


def test_a_flood_of_prompt_text_is_one_short_note(tiny_pipe, image, capsys, caplog):
    """A 100,000-character prompt printed diffusers' truncation warning with the whole cut-off tail."""
    import logging

    caplog.set_level(logging.WARNING)
    flood = "a red cat " * 10_000
    result = tiny_pipe.generate(image, mode="blend", prompt=flood, steps=1)
    out, err = capsys.readouterr()
    shown = out + err + caplog.text
    assert len(shown) < 300, shown[:500]
    assert result.provenance.notes["prompt_truncated"] == (
        "the prompt is longer than the text encoder's 77 tokens; only its start was used")
    assert result.recipe["prompt_truncated"] == result.provenance.notes["prompt_truncated"]
    short = tiny_pipe.generate(image, mode="blend", prompt="a red cat", steps=1)
    assert "prompt_truncated" not in short.provenance.notes
    assert torch.equal(tiny_pipe.encode_text(flood), tiny_pipe.encode_text(flood[:1000]))  # the start was used
