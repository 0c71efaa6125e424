"""The projector method (``mode="projector"``, Redux for SD 1.x): shapes, save and load, a 2-step training run on
``tiny`` through ``imageprompt train-projector``, and the ``projector=`` load option."""

from __future__ import annotations

import pytest
import torch

from imageprompt_widgets import SettingsError
from imageprompt_widgets.loading.offline import sample_image as make_image
from imageprompt_widgets.methods.projector import CONFIG_NAME, WEIGHT_NAME, Projector, projected_tokens


def test_the_projector_maps_every_vision_token_into_the_text_width():
    torch.manual_seed(0)
    projector = Projector(32, 48, 16)
    tokens = torch.randn(3, 65, 32)
    assert projector(tokens).shape == (3, 65, 16)
    assert projected_tokens(projector, tokens).shape == (1, 3 * 65, 16)  # the pictures' tokens in turn
    weighted = projected_tokens(projector, tokens, weights=(1.0, 0.0, 2.0))
    assert torch.equal(weighted[:, 65:130], torch.zeros(1, 65, 16))
    assert torch.allclose(weighted[:, 130:], 2 * projector(tokens)[2:3], atol=1e-6)


def test_the_projector_saves_and_loads_the_same_numbers(tmp_path):
    torch.manual_seed(1)
    projector = Projector(32, 48, 16)
    folder = projector.save(tmp_path / "p")
    assert {p.name for p in folder.iterdir()} == {WEIGHT_NAME, CONFIG_NAME}
    loaded = Projector.load(folder)
    assert loaded.config == projector.config
    tokens = torch.randn(2, 5, 32)
    assert torch.equal(loaded(tokens), projector(tokens).detach())
    assert torch.equal(Projector.load(folder / WEIGHT_NAME)(tokens), loaded(tokens))  # the file names its folder
    with pytest.raises(FileNotFoundError, match="No projector"):
        Projector.load(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of ``imageprompt train-projector`` on ``tiny``, on four pictures (two with captions)."""
    from imageprompt_widgets.cli import main

    root = tmp_path_factory.mktemp("projector")
    images = root / "images"
    images.mkdir()
    for index in range(4):
        make_image(index).save(images / f"p{index}.png")
    (images / "p0.txt").write_text("a red square", encoding="utf-8")
    (images / "p2.txt").write_text("a blue sky", encoding="utf-8")
    assert main(["train-projector", "--model", "tiny", "--images", str(images), "-o", str(root / "out"),
                 "--steps", "2", "--batch-size", "2"]) == 0
    return root / "out"


def test_two_training_steps_on_tiny_write_a_projector_the_pipeline_loads(trained):
    from imageprompt_widgets import ImagePromptPipeline

    pipe = ImagePromptPipeline.from_preset("tiny", projector=trained)
    assert "projector" in pipe.methods()
    res = pipe.generate(make_image(0), mode="projector", steps=2, seed=0)
    tokens = pipe.image_encoder.vision_model.embeddings.num_positions  # CLS + patches
    assert tuple(res.trace.prompt_embeds.shape) == (1, 77 + tokens, pipe.sd.unet.config.cross_attention_dim)
    assert res.images


def test_a_preset_without_a_projector_says_how_to_get_one(tiny_pipe):
    assert "projector" not in tiny_pipe.methods()
    with pytest.raises(SettingsError, match="projector"):
        tiny_pipe.generate(make_image(0), mode="projector", steps=2)


def test_train_projector_refuses_a_missing_folder(tmp_path, capsys):
    from imageprompt_widgets.cli import main

    assert main(["train-projector", "--model", "tiny", "--images", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
