"""The toy world's image prompts: its IP-Adapter, IP-Adapter Plus, image variations and projector load offline from
the package through diffusers' own loaders, equal bare diffusers, and (slow) keep the input's colour and shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imageprompt_widgets.methods import METHODS, offline_twin
from imageprompt_widgets.presets import PRESETS
from imageprompt_widgets.toy import WEIGHTS, measure, world

FAST = {"steps": 3, "seed": 5}


def _load(name):
    from imageprompt_widgets import ImagePromptPipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return ImagePromptPipeline.from_preset(name)


@pytest.fixture(scope="module")
def toy_pipe():
    return _load("toy")


@pytest.fixture(scope="module")
def adapter_pipe():
    return _load("toy-ip-adapter")


@pytest.fixture(scope="module")
def plus_pipe():
    return _load("toy-ip-adapter-plus")


@pytest.fixture(scope="module")
def variations_pipe():
    return _load("toy-variations")


@pytest.fixture(scope="module")
def fine_pipe():
    return _load("toy-fine")


@pytest.fixture
def picture():
    return world.held_out_scenes()[0].draw()


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_the_toy_presets_load_offline_from_the_package(adapter_pipe, plus_pipe, variations_pipe, toy_pipe):
    from diffusers import StableDiffusionImageVariationPipeline
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    for pipe, kind in ((adapter_pipe, ImageProjection), (plus_pipe, IPAdapterPlusImageProjection)):
        assert isinstance(pipe.sd.unet.encoder_hid_proj.image_projection_layers[0], kind)
        assert "ip_adapter" in pipe.methods()
    assert StableDiffusionImageVariationPipeline.from_pretrained(str(WEIGHTS / "variations")).image_encoder
    assert variations_pipe.sd.text_encoder is None and variations_pipe.preset.method == "variations"
    assert {"projector", "caption"} <= set(toy_pipe.methods())
    assert sum(p.stat().st_size for p in WEIGHTS.rglob("*")) < 20 * 2**20  # all toy weights in the wheel


def test_the_toy_ip_adapter_equals_bare_diffusers(adapter_pipe, picture):
    res = adapter_pipe.generate(picture, **FAST)
    assert res.settings.mode == "ip_adapter"
    bare = adapter_pipe.sd("", ip_adapter_image=picture, num_inference_steps=3,
                           guidance_scale=res.settings.guidance_scale,
                           generator=torch.Generator("cpu").manual_seed(5)).images
    assert np.abs(pixels(res.images) - pixels(bare)).max() <= 1


def test_the_toy_variations_equal_the_image_variations_pipeline(variations_pipe, picture):
    from diffusers import StableDiffusionImageVariationPipeline

    sd = variations_pipe.sd
    res = variations_pipe.generate(picture, **FAST)
    reference = StableDiffusionImageVariationPipeline(
        vae=sd.vae, image_encoder=sd.image_encoder, unet=sd.unet, scheduler=sd.scheduler, safety_checker=None,
        feature_extractor=sd.feature_extractor, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(picture, num_inference_steps=3, guidance_scale=res.settings.guidance_scale,
                         generator=torch.Generator("cpu").manual_seed(5)).images
    assert np.abs(pixels(res.images) - pixels(expected)).max() <= 1


def test_the_projector_appends_its_tokens_to_the_prompt(toy_pipe, picture):
    res = toy_pipe.generate(picture, mode="projector", **FAST)
    tokens = world.IMAGE_SIZE // 8 * (world.IMAGE_SIZE // 8) + 1  # CLS + the 8 × 8 patch grid
    assert tuple(res.trace.prompt_embeds.shape) == (1, 77 + tokens, 64)
    assert torch.equal(res.trace.prompt_embeds[:, :77], toy_pipe.encode_text(""))


def test_caption_on_toy_is_the_toy_clip_choosing_a_world_caption(toy_pipe, picture):
    scene = world.held_out_scenes()[0]
    caption = toy_pipe.caption(picture)
    assert caption in {world.caption(c, s, b) for s, c, b in world.ALL_COMBINATIONS}
    res = toy_pipe.generate(picture, mode="caption", **FAST)
    assert res.provenance.notes["caption"] == caption
    assert torch.equal(res.trace.prompt_embeds, toy_pipe.encode_text(caption))
    assert scene.colour in caption or scene.shape in caption


def test_with_toy_loaded_the_missing_methods_run_on_the_toy_presets():
    toy = PRESETS["toy"]
    assert offline_twin("ip_adapter", toy) == "toy-ip-adapter"
    assert offline_twin("variations", toy) == "toy-variations"
    assert offline_twin("projector", toy) == offline_twin("caption", toy) == offline_twin("repeat", toy) == "toy"
    assert offline_twin("ip_adapter", PRESETS["tiny"]) == METHODS["ip_adapter"].twin == "tiny-ip-adapter"
    assert offline_twin("variations", PRESETS["tiny"]) == "tiny-variations"


# ---------------------------------------------------------------------------------------------
# The floors (slow): the targets, measured on fewer scenes than the table in docs/toy_world.md


@pytest.mark.slow
@pytest.mark.parametrize(("route", "colour", "shape"), [
    # The targets (the shipped ip_adapter keeps the shape on 71 % of the 48 pictures in docs/toy_world.md).
    ("ip_adapter", 0.85, 0.70), ("ip_adapter plus", 0.85, 0.0), ("variations", 0.85, 0.0),
    ("projector", 0.80, 0.0), ("caption", 0.80, 0.0),
])
def test_the_trained_routes_keep_the_inputs_colour(route, colour, shape):
    scenes = world.held_out_scenes(24)  # every held-out combination once
    run = measure.measure_route(measure.ROUTES[route], scenes)
    # 24 scenes: two pictures of slack below the 48-picture target
    assert run.tally.colour >= round(colour * 24) - 2, measure.markdown_table([run])
    assert run.tally.shape >= round(shape * 24) - 2, measure.markdown_table([run])



def test_the_published_scoreboard_is_the_docs_table_and_names_every_route():
    """The stored 48-picture scoreboard (what ``--routes --save`` wrote) is the table docs/toy_world.md shows and the
    notebook reads, with one row per route in the scoreboard's order."""
    from pathlib import Path

    table = measure.published_scoreboard()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "toy_world.md").read_text(encoding="utf-8")
    assert table in docs
    with pytest.raises(SystemExit):  # a table or picture only the scoreboard makes: refused before any model loads
        measure.main(["--save", "table.md"])
    rows = [line.split("|")[1:4] for line in table.splitlines()[2:]]
    assert [(label.strip(), preset.strip(), n.strip()) for label, preset, n in rows] == [
        (label, route.preset, "48") for label, route in measure.ROUTES.items()]

# ---------------------------------------------------------------------------------------------
# Do the maps show where? (the measure itself, against hand-made masks)


def test_word_masks_and_their_iou_on_a_hand_made_map():
    from imageprompt_widgets.toy import localise

    maps = torch.zeros(9, 8, 8)
    maps[localise.COLOUR_TOKEN, 2:6, 2:6] = 1.0  # the colour word attends to the centre 4 × 4 latent cells
    maps[localise.SHAPE_TOKEN, 2:6, 2:6] = 0.25  # DAAM merges a word's tokens by their mean
    maps[0] = 1.0  # other tokens do not count
    truth = np.zeros((64, 64), dtype=bool)
    truth[16:48, 16:48] = True  # those cells at 8 px per cell
    mask = localise.word_mask(maps, (localise.COLOUR_TOKEN, localise.SHAPE_TOKEN))
    assert mask.shape == (64, 64) and mask[32, 32] and not mask[2, 2]
    assert localise.iou(mask, truth) > 0.8
    assert localise.iou(truth, truth) == 1.0 and localise.iou(truth, ~truth) == 0.0
    disc = localise.centred_disc()
    assert abs(disc.sum() - np.pi * localise.DISC_RADIUS**2) < 0.06 * disc.sum()
    assert localise.iou(disc, truth) == pytest.approx(disc.sum() / truth.sum(), abs=0.05)  # the disc lies (almost) inside



def test_word_masks_rescale_by_minimum_and_maximum_as_daam_does():
    """A map that varies little over a large floor (the toy UNet's maps vary by about a tenth of their maximum)
    still marks where it is highest: DAAM rescales by minimum and maximum, where dividing by the maximum alone
    would keep every pixel above τ."""
    from imageprompt_widgets.toy import localise

    maps = torch.full((9, 8, 8), 0.9)
    maps[localise.COLOUR_TOKEN, 2:6, 2:6] = 1.0
    maps[localise.SHAPE_TOKEN, 2:6, 2:6] = 1.0
    truth = np.zeros((64, 64), dtype=bool)
    truth[16:48, 16:48] = True
    mask = localise.word_mask(maps, (localise.COLOUR_TOKEN, localise.SHAPE_TOKEN))
    assert localise.iou(mask, truth) > 0.8 and mask.mean() < 0.35
    assert localise.map_contrast(maps, (localise.COLOUR_TOKEN, localise.SHAPE_TOKEN)) == pytest.approx(0.1)
    rescaled = localise.normalised_map(maps, (localise.COLOUR_TOKEN,))
    assert float(rescaled.min()) == pytest.approx(0.0) and float(rescaled.max()) == pytest.approx(1.0, abs=1e-6)


def _bicubic_profile(samples: np.ndarray, scale: int = 8) -> np.ndarray:
    """Keys' cubic convolution (a = -0.75, torch's bicubic), half-pixel centres, clamped border: one axis, by hand."""

    def kernel(x):
        x = abs(x)
        return 1.25 * x**3 - 2.25 * x**2 + 1 if x <= 1 else (-0.75 * x**3 + 3.75 * x**2 - 6 * x + 3 if x < 2 else 0.0)

    out = []
    for i in range(len(samples) * scale):
        x = (i + 0.5) / scale - 0.5
        base = int(np.floor(x))
        out.append(sum(samples[min(max(k, 0), len(samples) - 1)] * kernel(x - k) for k in range(base - 1, base + 3)))
    return np.array(out)


def test_the_latent_grids_ceiling_on_hand_made_masks():
    """A square on whole 8 px cells is exactly representable on the 8 × 8 grid (the averaged cells are 1 inside, 0
    outside); the ceiling is what its bicubic upsampling, rescaled and thresholded, keeps of it, computed here by
    hand (the 2-D upsampling of a block is the product of two 1-D profiles). A 2 px dot is below what any 8 × 8
    map can draw."""
    from imageprompt_widgets.toy import localise

    square = np.zeros((64, 64), dtype=bool)
    square[16:48, 16:48] = True
    profile = _bicubic_profile(np.array([0, 0, 1, 1, 1, 1, 0, 0], dtype=float))
    upsampled = np.outer(profile, profile)
    expected = localise.iou((upsampled - upsampled.min()) / (upsampled.max() - upsampled.min()) > localise.TAU, square)
    assert localise.grid_ceiling(square, (8, 8)) == pytest.approx(expected, abs=1e-6)
    assert 0.85 < expected < 0.95  # the bicubic edge rounds the corners off
    dot = np.zeros((64, 64), dtype=bool)
    dot[30:32, 30:32] = True
    assert localise.grid_ceiling(dot, (8, 8)) < 0.1


def test_adapter_tokens_are_scored_one_by_one():
    """The adapter's tokens share one softmax (at every position their maps sum to 1), so their merged map is flat;
    each token is scored alone, as DAAM scores each word, and the picture's score is their mean."""
    from PIL import Image

    from imageprompt_widgets.toy import localise

    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, 2:6, 2:6] = 1.0  # token 0 takes the centre, token 1 everything else
    maps[0, 1] = 1.0 - maps[0, 0]
    square = np.zeros((64, 64, 3), dtype=np.uint8)
    square[:, :] = world.PALETTE["blue"]
    square[16:48, 16:48] = world.PALETTE["red"]
    found = localise.adapter_map_localisation(_RecordedRun([Image.fromarray(square)], maps), world.held_out_scenes(1))
    truth = square[..., 0] == world.PALETTE["red"][0]
    first = localise.iou(localise.word_mask(maps[0], (0,)), truth)
    second = localise.iou(localise.word_mask(maps[0], (1,)), truth)
    assert first > 0.8 and second < 0.1
    assert found.words == [pytest.approx((first + second) / 2)]
    assert found.contrast == [pytest.approx(1.0)]
    assert found.ceiling == [pytest.approx(localise.grid_ceiling(truth, (8, 8)))]



class _RecordedRun:
    """What ``adapter_map_localisation`` reads from a pipeline: ``generate(...)`` giving one picture and its trace's
    IP-Adapter maps (hand-made here)."""

    def __init__(self, outputs, maps):
        self.outputs, self.maps, self.calls = list(outputs), maps, []

    def generate(self, picture, **settings):
        from types import SimpleNamespace

        self.calls.append(settings)
        extras = {} if self.maps is None else {"adapter_attention_maps": self.maps}
        return SimpleNamespace(images=[self.outputs.pop(0)], trace=SimpleNamespace(extras=extras))


def test_the_adapter_maps_miou_on_a_hand_made_map_and_mask():
    """Issue 24, item 7: the IP-Adapter's image-token maps against the judge's mask, computed by hand. Every token's
    map is a band over latent columns 2..5 (all rows) of the 8 × 8 grid; bilinear upsampling by 8 (half-pixel
    centres) puts output column i at latent x = (i + 0.5) / 8 - 0.5, and the ramp x - 1 (left) or 6 - x (right)
    reaches τ = 0.4 from i = 15 to i = 48: a 64 × 34 px band. The output's shape is a red 32 × 32 px square at
    16..47 on blue, inside the band: IoU = 1024 / 2176. The disc is compared with the same square."""
    from PIL import Image

    from imageprompt_widgets.toy import localise

    maps = torch.zeros(1, 4, 8, 8)
    maps[:, :, :, 2:6] = torch.tensor([0.7, 0.1, 0.1, 0.1])[:, None, None]  # their own softmax: shares sum to 1
    square = np.zeros((64, 64, 3), dtype=np.uint8)
    square[:, :] = world.PALETTE["blue"]
    square[16:48, 16:48] = world.PALETTE["red"]
    blank = np.full((64, 64, 3), world.PALETTE["blue"], dtype=np.uint8)  # nothing drawn: no truth, left out
    pipe = _RecordedRun([Image.fromarray(square), Image.fromarray(blank)], maps)
    found = localise.adapter_map_localisation(pipe, world.held_out_scenes(2), guidance_scale=2.0)
    assert found.words == [pytest.approx(1024 / 2176)] and found.skipped == 1
    truth = np.zeros((64, 64), dtype=bool)
    truth[16:48, 16:48] = True
    disc = localise.centred_disc()
    assert found.disc == [pytest.approx((disc & truth).sum() / (disc | truth).sum())]
    assert [call["seed"] for call in pipe.calls] == [0, 1] and all(call["trace_attention"] for call in pipe.calls)
    assert found.line().startswith(f"IP-Adapter image-token maps mIoU {1024 / 2176:.2f} vs centred disc")
    one = localise.adapter_map_localisation(_RecordedRun([Image.fromarray(square)], maps), world.held_out_scenes(1),
                                            tokens=(1,))
    assert one.words == [pytest.approx(1024 / 2176)]  # one token alone: its own maximum, the same band
    with pytest.raises(localise.NoAdapterAttentionError, match="no IP-Adapter attention"):
        localise.adapter_map_localisation(_RecordedRun([Image.fromarray(square)], None), world.held_out_scenes(1))


def test_the_localisation_command_prints_the_word_and_adapter_rows_and_draws_the_grid(capsys, tmp_path):
    from PIL import Image

    from imageprompt_widgets.toy import localise

    assert localise.main(["--scenes", "2", "--steps", "2", "--grid", str(tmp_path / "maps.png")]) == 0
    printed = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    labels = ("word maps", "IP-Adapter image-token maps", localise.FINE_LABEL)
    assert set(rows) >= set(labels)
    with Image.open(tmp_path / "maps.png") as drawn:  # a row per caption: toy's two tiles, then toy-fine's (128 px)
        assert drawn.size == (4 * 130 + 2, 2 * 130 + 2)
    for label in labels:
        cells = [cell.strip() for cell in rows[label].strip("|").split("|")]
        assert cells[1] in ("0", "1", "2") and 0.0 <= float(cells[2]) <= 1.0 and 0.0 <= float(cells[3]) <= 1.0
        assert float(cells[4]) == pytest.approx(float(cells[2]) - float(cells[3]), abs=0.011)

def test_the_judges_colour_mask_is_the_drawn_shape():
    from imageprompt_widgets.toy import localise

    scene = world.held_out_scenes()[3]
    drawn = (np.asarray(scene.draw()) == np.array(world.PALETTE[scene.colour])).all(-1)
    assert np.array_equal(localise.colour_mask(scene.draw()), drawn)


def test_the_inspectors_row_says_what_the_judge_read_and_what_was_kept():
    from imageprompt_widgets.toy.judge import run_row

    picture = world.Scene("circle", "red", "blue", 10, 12, 30).draw()
    output = world.Scene("square", "red", "green", 20, 8, 36).draw()
    assert run_row(picture, output) == ("The toy world's judge read the input as red circle on blue and the output "
                                        "as red square on green: kept colour.")
    assert run_row(picture, picture).endswith("kept colour, shape, background.")


def test_the_fine_toy_base_runs_a_16_by_16_latent_in_float32_and_is_bare_diffusers(fine_pipe, toy_pipe):
    """``toy-fine``: the toy CLIP's text tower as in ``toy``, a VAE that downsamples 4× and a UNet on its 16 × 16
    latent, stored in float16 and run in float32; text-to-image equals bare diffusers on the caption."""
    from PIL import Image

    assert fine_pipe.sd.vae_scale_factor == 4 and fine_pipe.sd.unet.config.sample_size == 16
    assert {fine_pipe.sd.unet.dtype, fine_pipe.sd.vae.dtype, fine_pipe.sd.text_encoder.dtype} == {torch.float32}
    mine, base = fine_pipe.sd.text_encoder.state_dict(), toy_pipe.sd.text_encoder.state_dict()
    assert all(torch.equal(mine[name], base[name]) for name in base)
    caption = world.held_out_scenes()[0].caption
    ours = fine_pipe.generate(Image.new("RGB", (64, 64), measure.GREY), mode="blend", prompt=caption, image_weight=0,
                              trace_attention=True, **FAST)
    bare = fine_pipe.sd(prompt=caption, num_inference_steps=3, guidance_scale=ours.settings.guidance_scale,
                        generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert ours.images[0].size == (64, 64) and np.array_equal(np.asarray(ours.images[0]), np.asarray(bare))
    assert tuple(ours.trace.attention_maps.shape[-2:]) == (16, 16)


def test_the_attention_view_on_toy_fine_says_its_maps_show_where(fine_pipe, toy_pipe, picture):
    from imageprompt_widgets.views.attention import (
        TOY_FINE_LOCALISATION_NOTE,
        TOY_LOCALISATION_NOTE,
        attention_view,
    )

    caption = world.held_out_scenes()[0].caption
    for pipe, said, not_said in ((fine_pipe, TOY_FINE_LOCALISATION_NOTE, TOY_LOCALISATION_NOTE),
                                 (toy_pipe, TOY_LOCALISATION_NOTE, TOY_FINE_LOCALISATION_NOTE)):
        res = pipe.generate(picture, mode="blend", prompt=caption, image_weight=0.0, trace_attention=True, **FAST)
        described = attention_view(res, pipe).describe()
        assert said in described and not_said not in described
    assert "toy-fine" in TOY_LOCALISATION_NOTE  # the 8 × 8 presets point to the base whose maps localise


@pytest.mark.slow
def test_the_fine_bases_word_maps_meet_the_target_and_the_notes_quote_the_measure(fine_pipe):
    """The issue's target on the shipped ``toy-fine`` (24 held-out captions, its defaults): mIoU ≥ 0.55 and at
    least 0.1 above the centred disc on the same pictures; both notes quote these numbers, and the shape rate."""
    from imageprompt_widgets.toy import localise
    from imageprompt_widgets.views.attention import TOY_FINE_LOCALISATION_NOTE, TOY_LOCALISATION_NOTE

    words = localise.word_map_localisation(fine_pipe, label=localise.FINE_LABEL)
    assert words.miou >= 0.55 and words.miou - words.disc_miou >= 0.1, localise.localisation_table([words])
    assert (f"overlap the drawn shape with mIoU {words.miou:.2f} on {len(words.words)} held-out captions, "
            f"{words.miou - words.disc_miou:.2f} above a fixed centred disc's {words.disc_miou:.2f}") in (
        TOY_FINE_LOCALISATION_NOTE)
    assert f"could score {words.ceiling_miou:.2f}" in TOY_FINE_LOCALISATION_NOTE
    assert f"score {words.miou:.2f} against the disc's {words.disc_miou:.2f}" in TOY_LOCALISATION_NOTE
    shape = measure.text_to_image(fine_pipe).tally.rate("shape")
    assert f"draws the named shape for {100 * shape:.0f} % of the 48 held-out captions" in TOY_FINE_LOCALISATION_NOTE


@pytest.mark.slow
def test_the_attention_views_toy_numbers_are_what_the_measure_gives(toy_pipe, adapter_pipe):
    """The note quotes the measure (24 held-out scenes, the presets' defaults): rerunning it gives the same numbers."""
    from imageprompt_widgets.toy import localise
    from imageprompt_widgets.views.attention import TOY_LOCALISATION_NOTE

    words = localise.word_map_localisation(toy_pipe)
    adapter = localise.adapter_map_localisation(adapter_pipe)
    assert f"maps overlap the drawn shape with mIoU {words.miou:.2f} on {len(words.words)}" in TOY_LOCALISATION_NOTE
    assert f"centred disc's {words.disc_miou:.2f} on the same pictures" in TOY_LOCALISATION_NOTE
    assert f"mIoU {adapter.miou:.2f}, below the disc's {adapter.disc_miou:.2f} on {len(adapter.words)}" in (
        TOY_LOCALISATION_NOTE)
    assert f"could score {words.ceiling_miou:.2f}" in TOY_LOCALISATION_NOTE


def test_the_attention_view_says_how_well_maps_localise_in_the_toy_world(toy_pipe, picture):
    from imageprompt_widgets.views.attention import TOY_LOCALISATION_NOTE, attention_view

    res = toy_pipe.generate(picture, mode="blend", prompt=world.held_out_scenes()[0].caption, image_weight=0.0,
                            trace_attention=True, **FAST)
    assert TOY_LOCALISATION_NOTE in attention_view(res, toy_pipe).describe()


def test_the_attention_view_of_a_toy_adapter_run_says_how_well_its_image_token_maps_localise(adapter_pipe, picture):
    from imageprompt_widgets.views.attention import TOY_LOCALISATION_NOTE, attention_view

    res = adapter_pipe.generate(picture, trace_attention=True, **FAST)
    view = attention_view(res, adapter_pipe)
    assert view.adapter_maps is not None and view.adapter_maps.shape[0] == 4  # the adapter's 4 image tokens
    assert TOY_LOCALISATION_NOTE in view.describe() and "image-token maps overlap it with mIoU 0.24" in view.describe()
