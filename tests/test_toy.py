"""The toy world: its generator, its judge, the shipped weights behind the ``toy`` presets, and (slow) the
measured behaviour of text-to-image and of every image-prompt method, with floors a regression falls through."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from imageprompt_widgets.toy import CLIP_FOLDER, SD_FOLDER, WEIGHTS, judge, measure, train, world

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# The world


def test_the_same_seed_draws_the_same_pictures_and_another_seed_others():
    first, again, other = world.scenes(20, seed=3), world.scenes(20, seed=3), world.scenes(20, seed=4)
    assert first == again
    assert [s.draw().tobytes() for s in first] == [s.draw().tobytes() for s in again]
    assert first != other
    assert world.held_out_scenes() == world.held_out_scenes()


def test_each_picture_shows_what_its_caption_says():
    """Counted independently of the judge: two colours only, the named one covering the shape's area."""
    expected_fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    pattern = re.compile(r"a (\w+) (circle|square|triangle) on a (\w+) background")
    for scene in world.scenes(150, seed=1) + world.held_out_scenes():
        colour, shape, background = pattern.fullmatch(scene.caption).groups()
        assert (colour, shape, background) == (scene.colour, scene.shape, scene.background)
        pixels = np.asarray(scene.draw())
        assert pixels.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        is_shape = (pixels == world.PALETTE[colour]).all(-1)
        is_background = (pixels == world.PALETTE[background]).all(-1)
        assert (is_shape | is_background).all(), "only the two named colours appear"
        rows, cols = np.nonzero(is_shape)
        box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert box == (scene.x, scene.y, scene.x + scene.size, scene.y + scene.size)
        assert is_shape.sum() / scene.size**2 == pytest.approx(expected_fill[shape], abs=0.06)


def test_training_never_sees_a_held_out_combination_but_sees_every_pair_of_its_parts():
    held = set(world.HELD_OUT)
    assert len(held) == 24 and len(world.TRAINING_COMBINATIONS) == 66
    assert not {(s.shape, s.colour, s.background) for s in world.scenes(3000, seed=0)} & held
    evaluation = world.held_out_scenes()
    assert len(evaluation) == 48 and all(scene.held_out for scene in evaluation)
    assert {c: sum(s.colour == c for s in evaluation) for c in world.COLOURS} == dict.fromkeys(world.COLOURS, 8)
    for shape, colour, background in held:
        trained = world.TRAINING_COMBINATIONS
        assert any(t[:2] == (shape, colour) for t in trained)
        assert any(t[1:] == (colour, background) for t in trained)
        assert any((t[0], t[2]) == (shape, background) for t in trained)


def test_unknown_split_and_shape_are_refused():
    import random

    with pytest.raises(ValueError, match="split"):
        world.random_scene(random.Random(0), "test")
    with pytest.raises(ValueError, match="shape"):
        world.Scene("star", "red", "blue", 0, 0, 20).draw()


# ---------------------------------------------------------------------------------------------
# The judge


def test_the_judge_reads_every_combination_of_the_world_exactly():
    rng = np.random.default_rng(0)
    for shape, colour, background in world.ALL_COMBINATIONS:
        for size in (world.MIN_SIZE, world.MAX_SIZE, int(rng.integers(world.MIN_SIZE, world.MAX_SIZE))):
            x, y = (int(v) for v in rng.integers(0, world.IMAGE_SIZE - size + 1, size=2))
            seen = judge.judge(world.Scene(shape, colour, background, x, y, size).draw())
            assert (seen.colour, seen.shape, seen.background) == (colour, shape, background)
            assert seen.overlap == 1.0


def test_the_judge_still_reads_blurred_noisy_pictures():
    """Generated pictures have soft edges and off colours: a blur and noise must not fool the judge."""
    rng = np.random.default_rng(1)
    scenes = world.scenes(60, seed=2)
    right = 0
    for scene in scenes:
        blurred = np.asarray(scene.draw().filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 25, blurred.shape), 0, 255).astype(np.uint8)
        seen = judge.judge(noisy)
        right += (seen.colour, seen.shape, seen.background) == (scene.colour, scene.shape, scene.background)
    assert right >= 57


def test_the_judge_says_nothing_was_drawn_on_a_plain_picture():
    seen = judge.judge(Image.new("RGB", (64, 64), world.PALETTE["blue"]))
    assert (seen.colour, seen.shape, seen.background) == (None, None, "blue")
    assert seen.matches("red", "circle") == (False, False)


def test_the_largest_component_ignores_specks():
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:4, 1:4] = True
    mask[8, 8] = True
    assert judge.largest_component(mask).sum() == 9
    assert not judge.largest_component(np.zeros((4, 4), dtype=bool)).any()


# ---------------------------------------------------------------------------------------------
# The shipped weights and the preset


def test_the_shipped_weights_are_what_the_training_script_writes():
    record = json.loads((WEIGHTS / "training.json").read_text())
    assert record["budget"] == asdict(train.Budget()) and record["seed"] == 0
    assert record["torch_threads"] == 1
    assert [stage["name"] for stage in record["stages"]] == ["clip", "vae", "unet", "image_pool",
                                                             *train.IMAGE_PROMPT_STAGES, "fine_vae", "fine_unet"]
    names = sorted(str(p.relative_to(WEIGHTS)) for p in WEIGHTS.rglob("*.safetensors"))
    assert names == ["clip/model.safetensors", "fine/text_encoder/model.safetensors",
                     "fine/unet/diffusion_pytorch_model.safetensors", "fine/vae/diffusion_pytorch_model.safetensors",
                     "ip_adapter/ip-adapter-plus_toy.safetensors",
                     "ip_adapter/ip-adapter_toy.safetensors", "projector/projector.safetensors",
                     "sd/text_encoder/model.safetensors", "sd/unet/diffusion_pytorch_model.safetensors",
                     "sd/vae/diffusion_pytorch_model.safetensors", "variations/image_encoder/model.safetensors",
                     "variations/unet/diffusion_pytorch_model.safetensors",
                     "variations/vae/diffusion_pytorch_model.safetensors"]
    assert sum(p.stat().st_size for p in WEIGHTS.rglob("*")) < 20 * 2**20


def test_the_toy_tokenizer_is_clips_with_one_token_per_word():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_FOLDER))
    for scene in world.held_out_scenes()[:6]:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(scene.caption).input_ids)
        assert tokens == ["<|startoftext|>", *(f"{word}</w>" for word in scene.caption.split()), "<|endoftext|>"]
    assert len(tokenizer("a photograph of a cat").input_ids) > 7  # other text still tokenises (byte by byte)


@pytest.fixture(scope="module")
def toy_pipe():
    from imageprompt_widgets import ImagePromptPipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield ImagePromptPipeline.from_preset("toy")


def test_the_toy_preset_loads_offline_through_from_pretrained(toy_pipe):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    assert isinstance(toy_pipe.sd, StableDiffusionPipeline)
    assert isinstance(toy_pipe.image_encoder, CLIPVisionModelWithProjection)
    # SD 1.x's pairing in miniature: projected image width = text hidden width = cross-attention width
    widths = (toy_pipe.image_encoder.config.projection_dim, toy_pipe.sd.text_encoder.config.hidden_size,
              toy_pipe.sd.unet.config.cross_attention_dim)
    assert widths == (train.WIDTH,) * 3
    assert toy_pipe.sd.vae_scale_factor == 8 and toy_pipe.native_size == world.IMAGE_SIZE
    assert toy_pipe.preset.sd_model == str(SD_FOLDER) and toy_pipe.preset.clip_model == str(CLIP_FOLDER)


def test_the_projection_image_embeds_go_through_is_not_the_identity():
    """The real system's mismatch, kept: SD reads un-projected text states, the guide feeds projected images."""
    from safetensors.torch import load_file

    projection = load_file(str(CLIP_FOLDER / "model.safetensors"))["text_projection.weight"]
    assert projection.shape == (train.WIDTH, train.WIDTH)
    assert not torch.allclose(projection, torch.eye(train.WIDTH), atol=0.1)


def test_clip_pixels_in_training_equal_the_image_processor(toy_pipe):
    pictures = [scene.draw() for scene in world.held_out_scenes()[:4]]
    expected = toy_pipe.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    assert torch.allclose(train.clip_pixels(pictures), expected, atol=1e-6)


def test_text_to_image_through_blend_is_bare_diffusers_on_the_caption(toy_pipe):
    caption = world.held_out_scenes()[0].caption
    grey = Image.new("RGB", (64, 64), measure.GREY)
    ours = toy_pipe.generate(grey, mode="blend", prompt=caption, image_weight=0, steps=3, seed=5)
    bare = toy_pipe.sd(prompt=caption, num_inference_steps=3, guidance_scale=ours.settings.guidance_scale,
                       generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(ours.images[0]), np.asarray(bare))


@pytest.mark.slow
def test_text_to_image_draws_the_named_colour_on_three_quarters_of_the_held_out_captions(toy_pipe):
    """The contract's floor: 48 captions no model was trained on, colour judged by the nearest palette colour."""
    run = measure.text_to_image(toy_pipe)
    assert run.tally.count == world.HELD_OUT_COUNT == 48
    assert run.tally.colour >= 36, measure.markdown_table([run])


@pytest.mark.slow
def test_a_small_method_table_recomputes(toy_pipe):
    """Every method of the table on 8 held-out scenes: each row is judged, and an image prompt carries its
    picture's colour more often than chance (1 in 6) through the best single-image method."""
    scenes = world.held_out_scenes(8)
    runs = measure.method_table(toy_pipe, measure.all_methods(), scenes, steps=10)
    print(measure.markdown_table(runs))
    assert [run.label for run in runs] == [method.label for method in measure.all_methods()]
    assert all(run.tally.count == 8 and len(run.judgements) == 8 for run in runs)
    best = max(run.tally.colour for run in runs if len(run.inputs[0]) == 1)
    assert best >= 3


# ---------------------------------------------------------------------------------------------
# The training code (a few steps: it runs with today's libraries, and seeds make it repeatable)


def test_every_training_stage_runs_and_repeats_itself(tmp_path):
    train.train_all(tmp_path / "a", train.Budget.smoke(), log=lambda _: None)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    stages = ["clip", "vae", "unet", "image_pool", "ip_adapter", "ip_adapter_plus", "variations", "projector",
              "fine_vae", "fine_unet"]
    assert [stage["name"] for stage in record["stages"]] == stages
    for output in train.STAGE_OUTPUTS.values():
        assert (tmp_path / "a" / output).exists(), output
    # Only some stages again, on the base already there: the other stages' records stay.
    train.train_all(tmp_path / "a", train.Budget.smoke(), log=lambda _: None, stages=("projector",))
    again = json.loads((tmp_path / "a" / "training.json").read_text())
    assert sorted(stage["name"] for stage in again["stages"]) == sorted(stages)
    assert again["stages"][:3] == record["stages"][:3]
    # A stage trained alone loads the base from the folder; the configs it writes do not name that folder.
    train.train_all(tmp_path / "a", train.Budget.smoke(), log=lambda _: None, stages=("variations",))
    train.train_all(tmp_path / "a", train.Budget.smoke(), log=lambda _: None, stages=("vae",))  # the UNet is loaded
    for folder in ("variations", "sd"):
        for part in ("unet", "vae"):
            config = json.loads((tmp_path / "a" / folder / part / "config.json").read_text())
            assert "_name_or_path" not in config, (folder, part)
    tokenizer = train.write_tokenizer(tmp_path / "tokenizer")
    first = train.train_clip(tokenizer, train.Budget.smoke(), seed=0, log=lambda _: None).state_dict()
    again = train.train_clip(tokenizer, train.Budget.smoke(), seed=0, log=lambda _: None).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_the_base_trained_again_alone_writes_the_full_runs_bytes(tmp_path):
    """``scripts/train_toy.py --stages vae,unet,...`` is how the world is retrained without its CLIP: each stage
    seeds itself, so it must write the bytes a full run writes."""
    budget = dataclasses.replace(train.Budget.smoke(), adapter_steps=0, plus_steps=0, variations_steps=0,
                                 projector_steps=0)
    train.train_all(tmp_path, budget, log=lambda _: None)
    parts = ["vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"]
    full = {part: (tmp_path / "sd" / part).read_bytes() for part in parts}
    fine = {part: (tmp_path / "fine" / part).read_bytes() for part in parts}
    train.train_all(tmp_path, budget, log=lambda _: None, stages=("vae", "unet"))
    assert {part: (tmp_path / "sd" / part).read_bytes() for part in parts} == full
    record = json.loads((tmp_path / "training.json").read_text())
    assert [stage["name"] for stage in record["stages"]] == ["clip", "vae", "unet", "fine_vae", "fine_unet"]
    (tmp_path / "fine" / parts[1]).unlink()
    train.train_all(tmp_path, budget, log=lambda _: None, stages=("fine",))
    assert {part: (tmp_path / "fine" / part).read_bytes() for part in parts} == fine


def test_the_fine_base_is_a_16_by_16_world_stored_in_half_precision_with_the_bases_text_tower(tmp_path):
    """``fine/``: the same CLIP text tower byte for byte, its own VAE (factor 4) and UNet in float16 (all the toy
    weights stay under 20 MB), loaded back as float32 by diffusers; the budget's fine fields are what it trains."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    budget = dataclasses.replace(train.Budget.smoke(), adapter_steps=0, plus_steps=0, variations_steps=0,
                                 projector_steps=0)
    assert budget.fine().latent_factor == 4 and budget.fine().latent_std == budget.fine_latent_std
    assert budget.fine().unet_steps == budget.unet_steps and budget.fine().unet_noisy_bias == 2.0
    train.train_all(tmp_path, budget, log=lambda _: None)
    text = "text_encoder/model.safetensors"
    assert (tmp_path / "fine" / text).read_bytes() == (tmp_path / "sd" / text).read_bytes()
    for part, kind in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        stored = load_file(str(tmp_path / "fine" / part / "diffusion_pytorch_model.safetensors"))
        assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
        assert kind.from_pretrained(str(tmp_path / "fine"), subfolder=part).dtype == torch.float32
    assert train._load_sd_part(tmp_path, "unet").config.sample_size == world.IMAGE_SIZE // 8
    assert UNet2DConditionModel.from_pretrained(str(tmp_path / "fine"), subfolder="unet").config.sample_size == (
        world.IMAGE_SIZE // 4)


@pytest.mark.parametrize("factor", train.LATENT_FACTORS)
def test_the_latent_factor_sets_the_toy_latents_side(factor):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    side = world.IMAGE_SIZE // factor
    torch.manual_seed(0)
    vae = AutoencoderKL(**train.vae_config(factor))
    latents = vae.encode(torch.zeros(1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)).latent_dist.mean
    assert latents.shape == (1, 4, side, side)
    unet = UNet2DConditionModel(**train.unet_config(factor))
    assert unet.config.sample_size == side
    noise = unet(latents, 10, encoder_hidden_states=torch.zeros(1, 77, train.WIDTH)).sample
    assert noise.shape == latents.shape


def test_the_finer_latent_experiments_unets_attend_where_they_say():
    """scripts/finer_latent.py's ``--unet`` variants: which levels have cross-attention decides the maps' grid."""
    import importlib.util

    from diffusers import UNet2DConditionModel

    spec = importlib.util.spec_from_file_location("finer_latent", ROOT / "scripts" / "finer_latent.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def attended_sides(config):
        unet = UNet2DConditionModel(**config)
        return sorted({config["sample_size"] // 2 ** index for index, block in enumerate(unet.down_blocks)
                       if hasattr(block, "attentions")})

    assert script.unet_variant("default", 4) is None
    assert attended_sides(train.unet_config(4)) == [4, 8]
    assert attended_sides(script.unet_variant("attention", 4)) == [4, 8, 16]
    assert attended_sides(script.unet_variant("two-level", 4)) == [8, 16]
    assert attended_sides(train.unet_config(8)) == [4, 8]


def test_a_latent_factor_the_toy_vae_cannot_make_is_refused():
    with pytest.raises(ValueError, match="downsamples by 4 or 8, not 2"):
        train.vae_config(2)


def test_the_training_noise_schedule_is_the_schedulers():
    assert torch.allclose(train.noise_schedule(), train.scheduler().alphas_cumprod, atol=1e-6)
    assert train.scheduler().config.prediction_type == "v_prediction"


def test_a_words_only_run_needs_no_image_and_is_bare_diffusers_on_the_caption(toy_pipe):
    caption = world.held_out_scenes()[1].caption
    ours = toy_pipe.generate(mode="text", prompt=caption, steps=3, seed=5)  # no image at all
    bare = toy_pipe.sd(prompt=caption, num_inference_steps=3, guidance_scale=ours.settings.guidance_scale,
                       generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(ours.images[0]), np.asarray(bare))
    blend = toy_pipe.generate([], mode="blend", prompt=caption, image_weight=0, steps=3, seed=5)
    assert np.array_equal(np.asarray(blend.images[0]), np.asarray(bare))
    assert ours.trace.image_embeds.shape[0] == 0 and ours.recipe["inputs"] == []


def test_a_words_only_run_on_toy_draws_what_it_names(toy_pipe):
    """Two held-out captions at the toy's own 20 steps: the judge reads back the colour, shape and background."""
    for scene in world.held_out_scenes()[:2]:
        seen = judge.judge(toy_pipe.generate(mode="text", prompt=scene.caption, seed=0).images[0])
        assert (seen.colour, seen.shape, seen.background) == (scene.colour, scene.shape, scene.background), scene.caption
