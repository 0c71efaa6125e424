"""Whether a preset is on this machine, looked up in a fake Hugging Face cache (no network, nothing loaded)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from imageprompt_widgets.loading.availability import availability, download_text, loading_message
from imageprompt_widgets.presets import PRESETS, Preset


def cache_files(cache: Path, repo: str, files: list[str], revision: str = "main") -> None:
    """Lay files out as huggingface_hub does: models--org--name/refs/<revision> -> snapshots/<commit>/<file>."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    for name in files:
        path = folder / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")


SD14_FILES = ["model_index.json", "unet/diffusion_pytorch_model.safetensors"]
CLIP_FILES = ["config.json", "model.safetensors"]


def test_a_hub_preset_is_missing_partial_or_cached(tmp_path):
    sd14 = PRESETS["sd14"]
    assert availability(sd14, tmp_path).state == "missing"
    assert availability(sd14, tmp_path).label() == "sd14 · about 7.2 GB · not downloaded"
    cache_files(tmp_path, "CompVis/stable-diffusion-v1-4", SD14_FILES[:1])  # a download cancelled half-way
    assert availability(sd14, tmp_path).status == "partly downloaded"
    cache_files(tmp_path, "CompVis/stable-diffusion-v1-4", SD14_FILES)
    cache_files(tmp_path, "openai/clip-vit-large-patch14", CLIP_FILES)
    found = availability(sd14, tmp_path)
    assert (found.state, found.ready, found.label()) == ("cached", True, "sd14 · about 7.2 GB · downloaded")


def test_revisions_subfolders_and_adapter_weights_are_looked_up(tmp_path):
    variations = PRESETS["variations"]
    cache_files(tmp_path, variations.sd_model, [*SD14_FILES, *CLIP_FILES])  # main, not the v2.0 the preset pins
    assert availability(variations, tmp_path).state == "partial"  # its encoder files sit in main
    cache_files(tmp_path, variations.sd_model, SD14_FILES, revision="v2.0")
    assert availability(variations, tmp_path).state == "cached"
    adapter = PRESETS["ip-adapter"]
    cache_files(tmp_path, adapter.sd_model, SD14_FILES)
    cache_files(tmp_path, "h94/IP-Adapter", ["models/image_encoder/config.json", "models/image_encoder/model.safetensors"])
    assert availability(adapter, tmp_path).state == "partial"  # the adapter weights are missing
    cache_files(tmp_path, "h94/IP-Adapter", ["models/ip-adapter_sd15.safetensors"])
    assert availability(adapter, tmp_path).state == "cached"


def test_offline_presets_are_built_or_build_in_seconds(tmp_path, monkeypatch, tiny_pipe):
    assert availability(PRESETS["tiny"]).label() == "tiny · offline · built"
    monkeypatch.setenv("IMAGEPROMPT_CACHE_DIR", str(tmp_path / "empty"))
    found = availability(PRESETS["tiny"])
    assert (found.state, found.ready, found.label()) == ("unbuilt", True, "tiny · offline · builds in seconds")
    assert loading_message(PRESETS["tiny"]) == (
        "Loading model 'tiny': building it on this machine first (random weights, no download)…"
    )


def test_a_local_folder_and_the_sizes(tmp_path):
    folder = dataclasses.replace(PRESETS["sd14"], name=str(tmp_path), sd_model=str(tmp_path))
    assert availability(folder).label() == f"{tmp_path} · local folder"
    assert download_text("about 5.5 GB (SD 1.4 fp32 safetensors) + 1.7 GB (CLIP ViT-L/14)") == "about 7.2 GB"
    assert download_text("about 5.5 GB (SD 1.5) + 2.5 GB (ViT-H/14 image encoder) + 44 MB (ip-adapter_sd15)") \
        == "about 8.0 GB"
    assert download_text("") == ""


HUB_PRESETS = [name for name, p in PRESETS.items() if not p.offline_builder and not Path(p.sd_model).is_dir()]


@pytest.mark.parametrize("name", HUB_PRESETS)
def test_every_hub_presets_loading_line_names_its_download(name, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    line = loading_message(PRESETS[name])
    assert line.startswith(f"Loading model {name!r}: the first time downloads about ") and "((" not in line


def test_the_toy_preset_is_ready_from_the_package_and_says_it_ships_with_it(tmp_path):
    toy = PRESETS["toy"]
    assert "toy" not in HUB_PRESETS and availability(toy).ready
    assert availability(toy).label() == "toy · offline · shipped with the package"
    assert loading_message(toy) == "Loading model 'toy' (trained weights shipped with the package)…"
    own = Preset(name="mine", sd_model=str(tmp_path), clip_model=str(tmp_path))  # a folder of one's own
    assert availability(own).label() == "mine · local folder"
    assert loading_message(own) == "Loading model 'mine' from its folder…"
