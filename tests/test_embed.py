"""`imageprompt embed`: one CLIP embedding row per image, equal to pipe.encode_image, to safetensors or Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import optional_module
from safetensors import safe_open
from safetensors.torch import save_file

from imageprompt_widgets.batch.embed import (
    EmbeddingFileError,
    embed_images,
    export_embeddings,
    load_embeddings,
)
from imageprompt_widgets.cli import main
from imageprompt_widgets.encoding import fingerprint
from imageprompt_widgets.loading.offline import sample_image
from imageprompt_widgets.settings import SettingsError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(5):
        sample_image(index, size=(48 + 8 * index, 40)).save(photos / f"p{index}.png")
    return photos


def images_of(folder: Path) -> list:
    return [sample_image(index, size=(48 + 8 * index, 40)) for index in range(len(list(folder.glob("*.png"))))]


def test_embed_writes_one_row_per_image_equal_to_encode_image_of_its_batch(folder, tmp_path, capsys, tiny_pipe):
    out = tmp_path / "photos.safetensors"
    assert main(["embed", str(folder), "-o", str(out), "--model", "tiny", "--batch-size", "2", "--hidden-states"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    table = load_embeddings(out)
    images = images_of(folder)
    assert table.inputs == [f"p{i}.png" for i in range(5)]
    assert table.fingerprints == [fingerprint(image) for image in images]
    assert table.model == {"preset": "tiny", "clip_model": "tiny"} and table.crop == "center_crop"
    assert table.source == str(folder)
    batches = [images[0:2], images[2:4], images[4:5]]  # --batch-size 2: the batches the file was made from
    expected = [tiny_pipe.encode_image(batch) for batch in batches]
    assert torch.equal(table.image_embeds, torch.cat([e.image_embeds for e in expected]))
    assert torch.equal(table.hidden_states, torch.cat([e.hidden_states for e in expected]))
    singles = torch.cat([tiny_pipe.encode_image(image).image_embeds for image in images])
    torch.testing.assert_close(table.image_embeds, singles, rtol=1e-5, atol=1e-6)  # batching: float rounding only


def test_batch_size_one_gives_encode_image_of_each_image_exactly(folder, tmp_path, tiny_pipe):
    out = tmp_path / "photos.safetensors"
    assert main(["embed", str(folder), "-o", str(out), "--model", "tiny", "--batch-size", "1"]) == 0
    table = load_embeddings(out)
    assert table.hidden_states is None
    for row, image in zip(table.image_embeds, images_of(folder)):
        assert torch.equal(row, tiny_pipe.encode_image(image).image_embeds[0])


def test_the_crop_setting_reaches_the_encoder(folder, tmp_path, tiny_pipe):
    out = tmp_path / "pad.safetensors"
    assert main(["embed", str(folder), "-o", str(out), "--model", "tiny", "--batch-size", "1", "--crop", "pad"]) == 0
    table = load_embeddings(out)
    assert table.crop == "pad"
    image = images_of(folder)[3]
    assert torch.equal(table.image_embeds[3], tiny_pipe.encode_image(image, crop="pad").image_embeds[0])
    assert not torch.equal(table.image_embeds[3], tiny_pipe.encode_image(image).image_embeds[0])


def test_parquet_holds_the_same_rows(folder, tmp_path):
    optional_module("pyarrow")
    tensors, parquet = tmp_path / "e.safetensors", tmp_path / "e.parquet"
    for path in (tensors, parquet):
        assert main(["embed", str(folder), "-o", str(path), "--model", "tiny", "--hidden-states"]) == 0
    a, b = load_embeddings(tensors), load_embeddings(parquet)
    assert (a.inputs, a.fingerprints, a.model, a.crop, a.source) == (b.inputs, b.fingerprints, b.model, b.crop, b.source)
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.hidden_states, b.hidden_states)
    import pyarrow.parquet as pq

    columns = pq.read_table(parquet).column_names
    assert columns == ["input", "fingerprint", "image_embeds", "hidden_states"]


def test_unreadable_images_are_logged_and_left_out(folder, tmp_path, capsys):
    (folder / "p2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "e.safetensors"
    assert main(["embed", str(folder), "-o", str(out), "--model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.count("imageprompt: skipped p2.png: ") == 1
    assert "4 embeddings, 1 failed" in err
    assert load_embeddings(out).inputs == ["p0.png", "p1.png", "p3.png", "p4.png"]


def test_nothing_readable_is_exit_2_and_no_file(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "x.png").write_text("text")
    assert main(["embed", str(photos), "-o", str(tmp_path / "e.safetensors"), "--model", "tiny"]) == 2
    assert "No image of folder" in capsys.readouterr().err
    assert not (tmp_path / "e.safetensors").exists()


def test_embed_images_in_a_notebook(tiny_pipe, tmp_path):
    images = [sample_image(i) for i in range(3)]
    table = embed_images(tiny_pipe, images, labels=["a", "b", "c"], batch_size=3, hidden_states=True)
    assert torch.equal(table.image_embeds, tiny_pipe.encode_image(images).image_embeds)
    assert torch.equal(table.hidden_states, tiny_pipe.encode_image(images).hidden_states)
    saved = load_embeddings(table.save(tmp_path / "t.safetensors"))
    assert saved.inputs == ["a", "b", "c"] and torch.equal(saved.image_embeds, table.image_embeds)
    with pytest.raises(SettingsError, match="labels has 1 entries for 3 images"):
        embed_images(tiny_pipe, images, labels=["a"])
    with pytest.raises(SettingsError, match="batch_size must be a whole number of at least 1"):
        embed_images(tiny_pipe, images, batch_size=0)


def test_a_foreign_file_is_refused_in_one_sentence(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EmbeddingFileError, match="was not written by imageprompt embed"):
        load_embeddings(tmp_path / "other.safetensors")
    with pytest.raises(EmbeddingFileError, match="does not exist"):
        load_embeddings(tmp_path / "missing.safetensors")


def test_export_embeddings_reports_rows_and_failures(folder, tmp_path):
    (folder / "bad.png").write_text("text")
    logged = []
    report = export_embeddings(folder, tmp_path / "e.safetensors", model="tiny", progress=False, log=logged.append)
    assert report.rows == 5 and [f["input"] for f in report.failures] == ["bad.png"] and not report.ok
    assert logged == [f"imageprompt: skipped bad.png: {report.failures[0]['error']}"]
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as handle:
        meta = json.loads(handle.metadata()["imageprompt"])
    assert meta["inputs"] == [f"p{i}.png" for i in range(5)] and meta["source"] == str(folder)
