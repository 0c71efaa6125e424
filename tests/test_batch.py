"""`imageprompt batch`: a grid of (image, seed) runs to PNGs and a manifest, resumable by content, bad items
logged and skipped, the same outputs on one process or two (accelerate on gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import HeldPipeline, optional_module, pixels
from PIL import Image

from imageprompt_widgets.batch.manifest import PARTS_FOLDER, read_manifest
from imageprompt_widgets.batch.run import (
    LOCK_FILE,
    item_key,
    model_identity,
    output_name,
    plan_jobs,
    run_batch,
)
from imageprompt_widgets.batch.sources import SourceItem, open_source
from imageprompt_widgets.cli import main
from imageprompt_widgets.cli.batch import parse_seeds
from imageprompt_widgets.encoding import fingerprint
from imageprompt_widgets.engine.results import recipe_from_png
from imageprompt_widgets.loading.offline import sample_image
from imageprompt_widgets.presets import PRESETS
from imageprompt_widgets.settings import GenerationSettings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--model", "tiny", "--steps", "2"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three pictures, one in a subfolder, plus a hidden file and a text file that are not listed."""
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    sample_image(0).save(photos / "a.png")
    sample_image(1).save(photos / "b.png")
    sample_image(2).save(photos / "more" / "c.jpg", quality=95)
    sample_image(3).save(photos / ".hidden.png")
    (photos / "notes.txt").write_text("not an image")
    return photos


def manifest_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# -- the grid, the PNGs and the manifest ------------------------------------------------------------


@pytest.mark.slow
def test_batch_writes_a_png_per_image_and_seed_equal_to_generate(folder, tmp_path, capsys, tiny_pipe):
    out = tmp_path / "out"
    code = main(["batch", str(folder), "-o", str(out), "--seeds", "0,1", *STEPS])
    printed = capsys.readouterr()
    assert code == 0
    assert printed.out.strip() == str(out / "manifest.jsonl")
    rows = manifest_rows(out)
    assert [(row["input"], row["seed"]) for row in rows] == [
        ("a.png", 0), ("a.png", 1), ("b.png", 0), ("b.png", 1), ("more/c.jpg", 0), ("more/c.jpg", 1)]
    assert sorted(path.name for path in out.glob("*.png")) == sorted(row["file"] for row in rows)
    for row in rows:
        source = folder / row["input"]
        settings = GenerationSettings(steps=2, seed=row["seed"])
        assert row["settings"] == settings.to_dict() and row["index"] == 0 and row["model"] == "tiny"
        with Image.open(source) as opened:
            decoded = opened.convert("RGB")
        assert row["key"] == item_key(fingerprint(decoded), settings, model_identity(PRESETS["tiny"]))
        assert row["file"] == output_name(Path(row["input"]).stem, row["key"], row["seed"], 0)
        expected = tiny_pipe.generate(str(source), settings).images[0]
        assert np.array_equal(pixels(out / row["file"]), np.asarray(expected))
        assert recipe_from_png(out / row["file"])["settings"] == settings.to_dict()
    assert not (out / "failed.jsonl").exists() and not (out / PARTS_FOLDER).exists()
    assert "6 generated (6 PNGs), 0 already done, 0 failed" in printed.err
    assert "Loading model 'tiny'" in printed.err  # the controller's loading messages, above the bar of items


def test_num_images_gives_a_row_per_png(folder, tmp_path, tiny_pipe):
    out = tmp_path / "out"
    report = run_batch(folder, out, settings={"steps": 1, "num_images": 2}, model="tiny", progress=False)
    assert report.ok and report.generated == 3 and report.images == 6
    rows = manifest_rows(out)
    assert [(row["input"], row["index"]) for row in rows] == [
        ("a.png", 0), ("a.png", 1), ("b.png", 0), ("b.png", 1), ("more/c.jpg", 0), ("more/c.jpg", 1)]
    expected = tiny_pipe.generate(str(folder / "a.png"), steps=1, num_images=2).images
    assert np.array_equal(pixels(out / rows[1]["file"]), np.asarray(expected[1]))


def test_odd_file_names_make_safe_output_names(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a..b.png", "naïve photo (1).png", "__.png"):
        sample_image(0).save(photos / name)
    stems = [item.stem for item in open_source(photos).items]
    assert stems == ["image", "a.b", "na_ve_photo_1"]
    report = run_batch(photos, tmp_path / "out", settings={"steps": 1}, model="tiny", progress=False)
    assert report.ok and report.generated == 1 and report.skipped == 2  # one picture under three names
    assert [row["input"] for row in manifest_rows(tmp_path / "out")] == ["__.png", "a..b.png", "naïve photo (1).png"]


def test_the_output_folder_inside_the_input_is_not_listed(folder):
    sample_image(5).save(folder / "out.png")
    (folder / "results").mkdir()
    sample_image(6).save(folder / "results" / "old.png")
    labels = [item.label for item in open_source(folder, exclude=folder / "results").items]
    assert labels == ["a.png", "b.png", "more/c.jpg", "out.png"]


@pytest.mark.slow
def test_parquet_manifest_has_the_same_rows(folder, tmp_path):
    pq = optional_module("pyarrow.parquet")
    jsonl, parquet = tmp_path / "jsonl", tmp_path / "parquet"
    assert main(["batch", str(folder), "-o", str(jsonl), *STEPS]) == 0
    assert main(["batch", str(folder), "-o", str(parquet), "--manifest", "parquet", *STEPS]) == 0
    table = pq.read_table(parquet / "manifest.parquet")
    assert table.schema.field("settings").type.get_field_index("guidance_scale") >= 0
    assert table.to_pylist() == manifest_rows(jsonl)
    assert read_manifest(parquet) == manifest_rows(jsonl)
    assert not (parquet / "manifest.jsonl").exists()


def test_batch_on_sdxl_records_micro_conditioning_in_the_manifest(folder, tmp_path, capsys):
    """A batch on tiny-sdxl with ``--original-size 32x48`` and a CSV row of its own ``target_size``: the manifest's
    settings (JSONL and Parquet) say what each PNG was told, and each PNG equals the API's run with them."""
    from imageprompt_widgets import ImagePromptPipeline

    pq = optional_module("pyarrow.parquet")
    listing = folder / "list.csv"
    listing.write_text("image,target_size\na.png,\nb.png,40x64\n")
    out = tmp_path / "out"
    flags = ["--model", "tiny-sdxl", "--steps", "2", "--original-size", "32x48"]
    code = main(["batch", str(listing), "-o", str(out), *flags])
    assert code == 0, capsys.readouterr().err
    rows = manifest_rows(out)
    assert [(row["input"], row["model"], row["settings"]["original_size"], row["settings"]["target_size"])
            for row in rows] == [("a.png", "tiny-sdxl", [32, 48], []), ("b.png", "tiny-sdxl", [32, 48], [40, 64])]
    sdxl = ImagePromptPipeline.from_preset("tiny-sdxl")
    for row in rows:
        settings = GenerationSettings.from_kwargs(**row["settings"])
        assert settings.original_size == (32, 48)
        expected = sdxl.generate(str(folder / row["input"]), settings).images[0]
        assert np.array_equal(pixels(out / row["file"]), np.asarray(expected))
        told = recipe_from_png(out / row["file"])["micro_conditioning"]
        assert told["original_size"] == [32, 48]
        assert told["target_size"] == (row["settings"]["target_size"] or [sdxl.native_size] * 2)
    assert main(["batch", str(listing), "-o", str(tmp_path / "pq"), "--manifest", "parquet", *flags]) == 0
    assert [row["settings"]["target_size"] for row in pq.read_table(tmp_path / "pq" / "manifest.parquet")
            .to_pylist()] == [[], [40.0, 64.0]]


# -- resuming by content ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_rerun_skips_finished_items_by_content_not_by_name(folder, tmp_path, tiny_pipe, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(out), "--seeds", "0,1", *STEPS]) == 0
    first = {row["file"]: (out / row["file"]).read_bytes() for row in manifest_rows(out)}
    counter = HeldPipeline.in_place(tiny_pipe, monkeypatch)
    capsys.readouterr()

    (folder / "b.png").rename(folder / "renamed.png")  # same pixels, new name: nothing to redo
    assert main(["batch", str(folder), "-o", str(out), "--seeds", "0,1", *STEPS]) == 0
    assert counter.seeds == []
    rows = manifest_rows(out)
    renamed = [row for row in rows if row["input"] == "renamed.png"]
    assert [row["file"] for row in renamed] == [row["file"] for row in rows if row["input"] == "b.png"]
    err = capsys.readouterr().err
    assert "0 generated (0 PNGs), 6 already done" in err and "Loading model" not in err  # nothing to run, no model

    image = sample_image(0)
    image.putpixel((0, 0), (0, 0, 0))  # one pixel changed: that image runs again, for both seeds
    image.save(folder / "a.png")
    assert main(["batch", str(folder), "-o", str(out), "--seeds", "0,1,2", *STEPS]) == 0
    assert counter.seeds == [0, 1, 2, 2, 2]  # a.png anew; renamed.png and c.jpg only for the new seed
    assert all((out / name).read_bytes() == data for name, data in first.items())  # nothing overwritten

    counter.seeds.clear()
    assert main(["batch", str(folder), "-o", str(out), "--seeds", "0", "--model", "tiny", "--steps", "3"]) == 0
    assert counter.seeds == [0, 0, 0]  # another setting: another item


def test_a_stopped_run_keeps_what_it_finished_and_the_rerun_does_the_rest(folder, tmp_path, tiny_pipe, monkeypatch,
                                                                         capsys):
    out = tmp_path / "out"
    real = tiny_pipe.generate
    calls = []

    def stop_on_the_third(images, settings=None, **kwargs):
        calls.append(settings.seed)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(images, settings, **kwargs)

    monkeypatch.setattr(tiny_pipe, "generate", stop_on_the_third)
    assert main(["batch", str(folder), "-o", str(out), "--seeds", "0,1", *STEPS]) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert [(row["input"], row["seed"]) for row in manifest_rows(out)] == [("a.png", 0), ("a.png", 1)]
    assert not (out / PARTS_FOLDER).exists()

    monkeypatch.setattr(tiny_pipe, "generate", real)
    counter = HeldPipeline.in_place(tiny_pipe, monkeypatch)
    assert main(["batch", str(folder), "-o", str(out), "--seeds", "0,1", *STEPS]) == 0
    assert counter.seeds == [0, 1, 0, 1]
    assert len(manifest_rows(out)) == 6


def test_rows_left_in_part_files_by_a_crash_count_as_done(folder, tmp_path, tiny_pipe, monkeypatch):
    out = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(out), *STEPS]) == 0
    manifest = (out / "manifest.jsonl").read_text()
    (out / PARTS_FOLDER).mkdir()
    (out / "manifest.jsonl").rename(out / PARTS_FOLDER / "rows-1.jsonl")  # as a killed second process leaves it
    with (out / PARTS_FOLDER / "rows-1.jsonl").open("a") as part:
        part.write('{"input": "half a line')  # cut short mid-write
    counter = HeldPipeline.in_place(tiny_pipe, monkeypatch)
    assert main(["batch", str(folder), "-o", str(out), *STEPS]) == 0
    assert counter.seeds == []
    assert (out / "manifest.jsonl").read_text() == manifest
    assert not (out / PARTS_FOLDER).exists()


# -- bad items ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_items_are_one_line_each_and_the_batch_goes_on(folder, tmp_path, capsys):
    (folder / "broken.png").write_text("not a png")
    out = tmp_path / "out"
    code = main(["batch", str(folder), "-o", str(out), "--seeds", "0,1", *STEPS])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("imageprompt: skipped")]
    assert lines == [  # once, not once per seed
        ("imageprompt: skipped broken.png: 'broken.png' is a text file, not an image (allowed formats: PNG, JPEG, "
        "WebP, GIF, BMP, TIFF); choose an image file"),
    ]
    assert len(manifest_rows(out)) == 6  # every other item was written
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [(f["input"], f["seed"]) for f in failed] == [("broken.png", 0), ("broken.png", 1)]

    (folder / "broken.png").unlink()  # fixed: the rerun has no failures, and says so
    assert main(["batch", str(folder), "-o", str(out), "--seeds", "0,1", *STEPS]) == 0
    assert not (out / "failed.jsonl").exists()


def test_a_full_disk_stops_the_batch_in_one_line(folder, tmp_path, capsys, monkeypatch):
    from imageprompt_widgets.batch import run as batch
    from imageprompt_widgets.engine.results import SaveError

    def full(*args, **kwargs):
        raise SaveError("Could not save the images to out: the disk is full; free some space.")

    monkeypatch.setattr(batch, "save_png", full)
    assert main(["batch", str(folder), "-o", str(tmp_path / "out"), *STEPS]) == 2
    err = capsys.readouterr().err
    assert "imageprompt: error: Could not save the images to out: the disk is full" in err
    assert "skipped" not in err


def test_a_method_the_model_lacks_fails_per_item_with_the_engines_sentence(folder, tmp_path, capsys):
    code = main(["batch", str(folder), "-o", str(tmp_path / "out"), *STEPS, "--mode", "ip_adapter"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("imageprompt: skipped") == 3 and "ip_adapter" in err


# -- CSV and JSONL lists with per-row settings -------------------------------------------------------------


def test_a_csv_list_with_per_row_settings(folder, tmp_path, tiny_pipe, capsys):
    listing = folder / "list.csv"
    listing.write_text(
        "image,steps,seed,norm_match,caption\n"
        "a.png,1,,yes,a first picture\n"  # --seeds grid, norm matching on
        "more/c.jpg,,7,,third\n"  # its own seed, the batch's steps
        "b.png,0,,,out of range\n"  # a bad row: the settings' own sentence
        "b.png,many,,,not a number\n"
        ",2,,,no image\n"
    )
    out = tmp_path / "out"
    code = main(["batch", str(listing), "-o", str(out), "--seeds", "0,1", *STEPS])
    err = capsys.readouterr().err
    assert code == 1
    assert "imageprompt: note: ignoring column(s) caption (not settings)." in err
    skipped = [line for line in err.splitlines() if line.startswith("imageprompt: skipped")]
    assert skipped == [
        "imageprompt: skipped b.png: steps=0 is outside its range 1 to 150.",
        "imageprompt: skipped b.png: steps must be a number, not 'many'.",
        "imageprompt: skipped list.csv row 6: no image: its 'image' value is empty or missing.",
    ]
    rows = manifest_rows(out)
    assert [(row["input"], row["seed"], row["settings"]["steps"], row["settings"]["norm_match"]) for row in rows] == [
        ("a.png", 0, 1, True), ("a.png", 1, 1, True), ("more/c.jpg", 7, 2, False)]
    expected = tiny_pipe.generate(str(folder / "more" / "c.jpg"), steps=2, seed=7).images[0]
    assert np.array_equal(pixels(out / rows[2]["file"]), np.asarray(expected))


def test_a_csv_without_an_image_column_is_exit_2(tmp_path, capsys):
    listing = tmp_path / "list.csv"
    listing.write_text("path,steps\na.png,3\n")
    assert main(["batch", str(listing), "-o", str(tmp_path / "out"), *STEPS]) == 2
    assert capsys.readouterr().err.strip() == (
        f"imageprompt: error: The CSV file {str(listing)!r} has no 'image' column (its columns: path, steps): "
        "add one naming each row's image.")
    assert main(["batch", str(listing), "-o", str(tmp_path / "out"), "--image-column", "path", *STEPS]) == 1
    assert "a.png" in capsys.readouterr().err  # listed; the file itself is missing


def test_a_jsonl_list_with_per_row_settings(folder, tmp_path, capsys):
    listing = folder / "list.jsonl"
    listing.write_text(
        json.dumps({"image": "a.png", "guidance_scale": 1.0, "weights": [1.0]}) + "\n"
        + "\n"
        + "{not json\n"
        + json.dumps({"image": "b.png", "mode": "nonsense"}) + "\n"
    )
    out = tmp_path / "out"
    assert main(["batch", str(listing), "-o", str(out), *STEPS]) == 1
    err = capsys.readouterr().err
    assert "imageprompt: skipped list.jsonl line 3: not JSON (Expecting property name" in err
    assert "imageprompt: skipped b.png: mode='nonsense' is not one of repeat, single" in err
    (row,) = manifest_rows(out)
    assert row["settings"]["guidance_scale"] == 1.0 and row["settings"]["weights"] == [1.0]


def test_plan_jobs_layers_preset_defaults_flags_and_rows():
    items = [SourceItem("a", "a", {"steps": 4}), SourceItem("b", "b", {"seed": 9, "scale": 2.0}),
             SourceItem("c", "c", {"scale": 99.0}), SourceItem("d", "d", error="row 5 names no image.")]
    jobs = plan_jobs(items, {"steps": 3, "scale": 1.5}, [0, 1], PRESETS["tiny-variations"])
    assert [(job.item.label, job.seed, job.position) for job in jobs] == [
        ("a", 0, 0), ("a", 1, 1), ("b", 9, 2), ("c", None, 3), ("d", None, 4)]
    first = jobs[0].settings
    assert (first.mode, first.negative, first.steps, first.scale) == ("single", "zeros", 4, 1.5)  # preset, row, flag
    assert jobs[2].settings.scale == 2.0 and jobs[2].settings.steps == 3
    assert jobs[3].error == "scale=99.0 is outside its range 0 to 5." and jobs[4].error == "row 5 names no image."
    assert [job.seed for job in plan_jobs(items[:1])] == [GenerationSettings().seed]


def test_the_item_key_follows_content_settings_and_model_only():
    settings = GenerationSettings(seed=1)
    tiny = model_identity(PRESETS["tiny"])
    key = item_key("f" * 64, settings, tiny)
    assert key == item_key("f" * 64, GenerationSettings(seed=1), dict(tiny))
    assert len({key, item_key("e" * 64, settings, tiny), item_key("f" * 64, settings.replace(seed=2), tiny),
                item_key("f" * 64, settings.replace(steps=3), tiny),
                item_key("f" * 64, settings, model_identity(PRESETS["sd14"]))}) == 5


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5, 1, 4") == [3, 4, 5, 1]
    for text, message in [("a", "whole numbers or ranges"), ("5-3", "runs backwards"),
                          ("-1", "whole numbers or ranges"), ("4294967296", "outside its range")]:
        with pytest.raises(SettingsError, match=message):
            parse_seeds(text)


# -- Hugging Face datasets ----------------------------------------------------------------------------------


def _dataset(count: int = 3, **columns):
    datasets = optional_module("datasets")
    images = [sample_image(i) for i in range(count)]
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64"),
                                  **{name: datasets.Value(kind) for name, (kind, _) in columns.items()}})
    data = {"picture": images, "label": list(range(count)), **{name: values for name, (_, values) in columns.items()}}
    return datasets.Dataset.from_dict(data, features=features), images


def test_a_saved_dataset_with_an_image_column_and_per_row_settings(tmp_path, tiny_pipe, capsys):
    dataset, images = _dataset(steps=("int64", [1, 2, 1]))
    dataset.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "saved"), "-o", str(out), *STEPS]) == 0
    assert "ignoring column(s) label (not settings)" in capsys.readouterr().err
    rows = manifest_rows(out)
    assert [(row["input"], row["settings"]["steps"]) for row in rows] == [("[0]", 1), ("[1]", 2), ("[2]", 1)]
    for row, image in zip(rows, images):
        expected = tiny_pipe.generate(image, steps=row["settings"]["steps"]).images[0]
        assert np.array_equal(pixels(out / row["file"]), np.asarray(expected))
        assert row["fingerprint"] == fingerprint(image)[:16]


def test_a_saved_dataset_dict_needs_a_split_when_ambiguous(tmp_path, capsys):
    datasets = optional_module("datasets")
    dataset, _ = _dataset(2)
    datasets.DatasetDict({"test": dataset, "validation": dataset}).save_to_disk(str(tmp_path / "saved"))
    assert main(["batch", str(tmp_path / "saved"), "-o", str(tmp_path / "out"), *STEPS]) == 2
    assert capsys.readouterr().err.strip().endswith("has the splits test, validation: choose one with --split.")
    source = open_source(tmp_path / "saved", split="validation")
    assert [item.label for item in source.items] == ["validation[0]", "validation[1]"]


def test_a_hub_dataset_offline_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    optional_module("datasets")
    code = main(["batch", "hf://datasets/someone/pictures", "-o", str(tmp_path / "out"), *STEPS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("imageprompt: error: Cannot load the dataset 'someone/pictures' from the Hugging Face Hub")


def test_a_hub_dataset_is_loaded_with_load_dataset(tmp_path, monkeypatch):
    datasets = optional_module("datasets")
    dataset, _ = _dataset(2)
    asked = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split=None: asked.append((name, split)) or datasets.DatasetDict({"train": dataset}))
    source = open_source("hf://datasets/someone/pictures")
    assert asked == [("someone/pictures", None)]
    assert [item.label for item in source.items] == ["train[0]", "train[1]"]
    assert source.items[1].load().tobytes() == sample_image(1).tobytes()


# -- checked before torch is imported --------------------------------------------------------------------------


def test_inputs_options_and_output_are_checked_before_torch_is_imported(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "photos").mkdir()
    sample_image(0).save(tmp_path / "photos" / "a.png")
    (tmp_path / "list.csv").write_text("path\na.png\n")
    photos, out = str(tmp_path / "photos"), str(tmp_path / "out")
    cases = [
        (["batch", str(tmp_path / "missing"), "-o", out], "does not exist"),
        (["batch", photos, "-o", str(tmp_path / "file.txt")], "is an existing file, not a folder"),
        (["batch", photos, "-o", out, "--seeds", "1,x"], "--seeds takes whole numbers"),
        (["batch", photos, "-o", out, "--steps", "0"], "steps=0 is outside its range"),
        (["batch", photos, "-o", out, "--negative", "image"], "batch runs take no negative images"),
        (["batch", str(tmp_path / "list.csv"), "-o", out], "has no 'image' column"),
        (["batch", str(tmp_path / "file.txt"), "-o", out], "is a .txt file"),
        (["batch", str(tmp_path), "-o", out, "--split", "train"], "--split applies to datasets only"),
        (["batch", photos, "-o", out, "--model", "nope"], "Unknown model 'nope'"),
        (["embed", photos, "-o", str(tmp_path / "e.npy")], "should end in .safetensors or .parquet"),
        (["embed", photos, "-o", str(tmp_path / "photos")], "is a folder"),
        (["embed", photos, "-o", str(tmp_path / "e.safetensors"), "--batch-size", "0"], "at least 1"),
    ]
    script = (
        "import json, sys\n"
        "from imageprompt_widgets.cli import main\n"
        "for argv, _ in json.loads(sys.argv[1]):\n"
        "    assert main(argv) == 2, argv\n"
        "    print('torch' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 * len(cases)
    for (argv, expected), (message, torch_loaded) in zip(cases, zip(lines[::2], lines[1::2])):
        assert message.startswith("imageprompt: error: ") and expected in message, (argv, message)
        assert torch_loaded == "False", argv
    assert not (tmp_path / "out").exists()


def test_help_lists_the_grid_and_every_setting_but_the_single_seed(capsys):
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seeds SEEDS" in text and "--steps STEPS" in text and "--manifest {jsonl,parquet}" in text
    assert "--seed " not in text and "exit codes: 0 every item done" in text
    assert "denoising steps; 1 to 150 (default: 30; 20 on toy" in " ".join(text.split())


# -- several processes -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(processes: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N -m imageprompt_widgets.cli ...`` on this machine's
    CPU: without CUDA the processes talk over gloo (``PartialState(cpu=True)``)."""
    optional_module("accelerate")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        launcher += ["--multi_gpu", "--main_process_port", str(_free_port())]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([*launcher, "-m", "imageprompt_widgets.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env, check=False)


@pytest.mark.slow
def test_two_processes_give_byte_identical_outputs_and_resume_a_one_process_run(folder, tmp_path):
    """One process in-process against two accelerate processes on gloo: the same PNG bytes, the same
    manifest, the same exit code; the two-process run resumes a one-process run's half-finished folder."""
    (folder / "broken.png").write_text("not a png")
    sample_image(4).save(folder / "d.png")
    alone, together = tmp_path / "alone", tmp_path / "together"
    grid = ["--seeds", "0-2", *STEPS]
    assert main(["batch", str(folder), "-o", str(alone), *grid]) == 1
    assert main(["batch", str(folder), "-o", str(together), "--seeds", "1", *STEPS]) == 1  # a third done already

    done = accelerate_launch(2, "batch", str(folder), "-o", str(together), *grid, cwd=tmp_path)
    assert done.returncode != 0  # broken.png failed, as alone
    assert "imageprompt: 8 generated (8 PNGs), 4 already done, 3 failed on 2 processes" in done.stderr, done.stderr
    names = sorted(path.name for path in alone.iterdir() if path.name != LOCK_FILE)  # it names its writer
    assert names == sorted(path.name for path in together.iterdir() if path.name != LOCK_FILE)
    for name in names:
        assert (alone / name).read_bytes() == (together / name).read_bytes(), name
    assert len(manifest_rows(together)) == 12


@pytest.mark.slow
def test_two_processes_write_the_same_embeddings_file(folder, tmp_path):
    """Whole batches are shared out, so the rows (and the file's bytes) do not depend on the process count."""
    (folder / "broken.png").write_text("not a png")
    alone, together = tmp_path / "alone.safetensors", tmp_path / "together.safetensors"
    args = ["--model", "tiny", "--batch-size", "2", "--hidden-states"]
    assert main(["embed", str(folder), "-o", str(alone), *args]) == 1
    done = accelerate_launch(2, "embed", str(folder), "-o", str(together), *args, cwd=tmp_path)
    assert done.returncode != 0 and "3 embeddings, 1 failed on 2 processes" in done.stderr, done.stderr
    assert alone.read_bytes() == together.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir() if "part" in path.name) == []


def test_a_command_leaves_its_process_group_before_the_interpreter_exits(tmp_path, monkeypatch):
    """A many-item command destroys the launcher's process group in every process, on success and on a bad
    input alike: left to the interpreter's exit, gloo's threads can abort a process that finished its work
    (CI saw "terminate called without an active exception" from the idle rank of a 2-process batch)."""
    import torch.distributed as dist

    from imageprompt_widgets.batch.sharding import leave_process_group
    from imageprompt_widgets.cli.common import run_many

    leave_process_group()  # no group: nothing to do
    assert not dist.is_initialized()

    stores = iter(tmp_path / f"store-{n}" for n in range(2))  # a fresh rendezvous file for each group

    def join() -> None:
        dist.init_process_group("gloo", init_method=f"file://{next(stores)}", rank=0, world_size=1)
        assert dist.is_initialized()

    class Report:
        ok = True

        def summary(self) -> str:
            return "1 generated"

    def work(loading):
        join()
        return Report()

    assert run_many(work, stopped="", written=lambda report: "manifest.jsonl") == 0
    assert not dist.is_initialized()

    def failing(loading):
        join()
        raise ValueError("The disk is full.")

    assert run_many(failing, stopped="", written=lambda report: "") == 2
    assert not dist.is_initialized()
