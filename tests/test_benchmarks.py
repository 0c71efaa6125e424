"""The benchmarks cannot rot: each runs once here in its tiny, quick mode (no timed assertions).

Also checks the real-size architectures against the published parameter counts of SD 1.x and
CLIP ViT-L/14, and the real-size builder end to end on shrunken configs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from imageprompt_widgets.loading.offline import sample_image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine spinning OpenMP threads make them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _result(out: Path, name: str) -> dict:
    document = json.loads((out / f"{name}.json").read_text())
    assert document["benchmark"] == name
    assert document["command"].startswith(f"python -m benchmarks.{name} ") and "--quick" in document["command"]
    assert document["machine"]["torch"] == torch.__version__
    return document


# -- real-size architectures -------------------------------------------------------------------


def test_realsize_configs_have_the_published_parameter_counts():
    """SD 1.x UNet 859,520,964; VAE 83,653,863; CLIP text 123,060,480; ViT-L/14 vision 303,179,776 + projection."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from benchmarks import realsize

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        assert count(UNet2DConditionModel(**realsize.UNET_CONFIG)) == 859_520_964
        assert count(AutoencoderKL(**realsize.VAE_CONFIG)) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**realsize.TEXT_CONFIG))) == 123_060_480
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**realsize.VISION_CONFIG))
        assert count(vision) == 303_179_776 + 1024 * 768


def test_sdxl_configs_have_the_published_parameter_counts():
    """SDXL base's UNet 2,567,463,684; text_encoder_2 (bigG text + projection) 694,659,840; VAE 83,653,863; and
    the bigG vision tower as counted from LAION's config (1,844,907,264 with its 1,664 x 1,280 projection)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from benchmarks import sdxl_memory

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        assert count(UNet2DConditionModel(**sdxl_memory.SDXL_UNET_CONFIG)) == 2_567_463_684
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**sdxl_memory.SDXL_TEXT_2_CONFIG))) == 694_659_840
        assert count(AutoencoderKL(**sdxl_memory.SDXL_VAE_CONFIG)) == 83_653_863
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**sdxl_memory.BIGG_VISION_CONFIG))
        assert count(vision) == 1_844_907_264 and vision.visual_projection.weight.shape == (1280, 1664)


def test_live_bytes_counts_what_a_run_holds_at_once():
    """[4, 1000] float32 in (16,000 B), a [4, 2000] linear output and its ReLU alive together (32,000 B each):
    a peak of 80,000 B; an in-place ReLU shares its input's storage and adds nothing, so the peak is then the input,
    the hidden layer and the [4, 10] output (160 B) together: 48,160 B; weights never count."""
    from benchmarks.sdxl_memory import LiveBytes

    with torch.device("meta"):
        first, second = torch.nn.Linear(1000, 2000), torch.nn.Linear(2000, 10)
    for in_place, peak in ((False, 80_000), (True, 48_160)):
        counter = LiveBytes()
        counter.ignore(first)
        counter.ignore(second)
        x = torch.zeros(4, 1000, device="meta")
        counter.track(x)
        with torch.no_grad(), counter.mode:
            hidden = first(x)
            hidden = torch.relu_(hidden) if in_place else torch.relu(hidden)
            out = second(hidden)
        assert counter.peak == peak, in_place
        del hidden, out
        assert counter.current == 16_000  # only the input is left alive


def test_fill_random_is_finite_deterministic_and_scaled_like_a_fresh_model():
    from benchmarks.realsize import fill_random

    def model():
        return torch.nn.Sequential(torch.nn.Linear(300, 64), torch.nn.LayerNorm(64), torch.nn.Embedding(50, 8))

    first, second = model(), model()
    fill_random(first, seed=3, block_size=1009)
    fill_random(second, seed=3, block_size=1009)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    linear, norm, embedding = first
    assert torch.isfinite(linear.weight).all()
    assert linear.weight.std().item() == pytest.approx(300**-0.5, rel=0.1)
    assert torch.equal(linear.bias, torch.zeros(64))
    assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))
    assert embedding.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_realsize_builder_writes_loadable_models_atomically(tmp_path, monkeypatch):
    """The real builder on shrunken configs: the cache folder, the tokenizer's ids, the full CLIP, loading."""
    from transformers import CLIPModel, CLIPTokenizer

    from benchmarks import realsize
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.loading import offline

    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(realsize, "UNET_CONFIG", {
        **realsize.UNET_CONFIG, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1,
        "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 4, "sample_size": 8,
    })
    monkeypatch.setattr(realsize, "VAE_CONFIG", {
        **realsize.VAE_CONFIG, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4,
    })
    small = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
             "projection_dim": 16}
    monkeypatch.setattr(realsize, "TEXT_CONFIG", {**realsize.TEXT_CONFIG, **small, "vocab_size": 600})
    monkeypatch.setattr(realsize, "VISION_CONFIG", {**realsize.VISION_CONFIG, **small, "image_size": 28})

    sd, clip = realsize.ensure_realsize_models()
    assert Path(sd) == tmp_path / "realsize-v1" / "sd" and Path(clip) == tmp_path / "realsize-v1" / "clip"
    assert [p.name for p in tmp_path.iterdir()] == ["realsize-v1"]  # no temporary folder left behind
    assert realsize.ensure_realsize_models() == (sd, clip)  # built once, reused

    text_config = json.loads((Path(sd) / "text_encoder" / "config.json").read_text())
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(sd) / "tokenizer"))
    assert text_config["bos_token_id"] == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert text_config["eos_token_id"] == text_config["pad_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert text_config["hidden_act"] == "quick_gelu"
    full = CLIPModel.from_pretrained(clip)  # the text tower is there, as in openai's checkpoint
    assert full.text_model.config.hidden_size == 16 and full.logit_scale.item() == pytest.approx(math.log(1 / 0.07))

    pipe = ImagePromptPipeline.from_pretrained(sd, clip, device="cpu", dtype="float32")
    assert not hasattr(pipe.image_encoder, "text_model")
    result = pipe.generate(sample_image(0), steps=2, trace_latents=True)
    assert torch.isfinite(result.trace.latents).all() and torch.isfinite(result.trace.image_embeds).all()


# -- every benchmark, once, tiny and quick ------------------------------------------------------


def test_overhead_benchmark_runs_and_ours_equals_bare_diffusers(tmp_path):
    from benchmarks import overhead

    payload = overhead.main(["--quick", "--out", str(tmp_path)])
    (row,) = payload["rows"]
    assert row["identical_pixels"] is True
    assert set(row["seconds"]) == {"bare", "ours", "ours+previews"}
    assert row["ratio_previews_off"] > 0 and "| tiny |" in payload["table"]
    assert _result(tmp_path, "overhead")["rows"][0]["steps"] == 2


@pytest.mark.slow  # about 17 s: six models built and run on the meta device, and a calibration subprocess
def test_sdxl_memory_benchmark_builds_every_model_in_float16_and_estimates_a_gpu_peak(tmp_path):
    from benchmarks import sdxl_memory

    payload = sdxl_memory.main(["--quick", "--out", str(tmp_path)])
    rows = {row["component"]: row for row in payload["rows"]}
    assert set(rows) == {"unet", "image_encoder (bigG)", "text_encoder_2", "image_encoder (ViT-L)", "text_encoder",
                         "vae"}
    assert payload["total_bytes"] == sum(row["bytes"] for row in rows.values())
    assert rows["unet"]["bytes"] >= 2 * rows["unet"]["parameters"]  # two bytes a weight: built in float16
    assert rows["unet"]["bytes"] < 3 * rows["unet"]["parameters"]
    assert all(row["activations_bytes"] > 0 for row in rows.values())
    assert rows["vae"]["gpu_weights_bytes"] == 2 * rows["vae"]["bytes"]  # decoded in float32
    peak = max(rows.values(), key=lambda row: row["gpu_peak_bytes"])
    assert payload["offload_gpu_peak_bytes"] == peak["gpu_peak_bytes"] < payload["everything_on_gpu_bytes"]
    assert payload["calibration"]["counted_bytes"] > 0 and payload["calibration"]["measured_bytes"] >= 0
    assert _result(tmp_path, "sdxl_memory")["quick"] is True


def test_memory_benchmark_counts_the_text_tower_ours_does_not_load(tmp_path):
    from transformers import CLIPModel

    from benchmarks import memory
    from imageprompt_widgets.loading.offline import ensure_tiny_models

    payload = memory.main(["--quick", "--in-process", "--out", str(tmp_path)])
    (row,) = payload["rows"]
    full = CLIPModel.from_pretrained(ensure_tiny_models()[1])
    text_tower = sum(p.numel() for p in full.text_model.parameters()) + full.text_projection.weight.numel() + 1
    assert row["saved_parameters_mib"] == pytest.approx(4 * text_tower / 2**20)
    assert set(row["reports"]) == {"imports", "ours", "guide"}
    assert _result(tmp_path, "memory")["rows"][0]["kind"] == "tiny"


def test_cache_benchmark_gets_the_same_pipeline_and_widgets_share_it(tmp_path):
    from benchmarks import cache

    (row,) = cache.main(["--quick", "--out", str(tmp_path)])["rows"]
    assert row["same_object"] is True
    assert row["widgets_share_pipeline"] is True
    assert row["calls"] == 20
    _result(tmp_path, "cache")


@pytest.mark.slow
def test_latency_benchmark_sees_previews_before_the_final_image(tmp_path):
    from benchmarks import latency

    (row,) = latency.main(["--quick", "--out", str(tmp_path)])["rows"]
    engine, widget = row["engine"], row["widget"]
    assert 0 < engine["first step"] <= engine["first preview"] <= engine["final image"]
    assert widget["available"] is True
    assert 0 < widget["first preview tile"] <= widget["final image"]
    assert widget["status"].startswith("Done")
    _result(tmp_path, "latency")


def test_scaling_benchmark_encodes_an_image_once_for_two_seeds(tmp_path):
    from benchmarks import scaling

    (row,) = scaling.main(["--quick", "--out", str(tmp_path)])["rows"]
    assert row["new_seed"]["encoder_calls"] == 1
    assert set(row["seconds_by_steps"]) == {1, 2} and set(row["seconds_by_images"]) == {1, 2}
    assert row["encoding"]["images"] == 2
    _result(tmp_path, "scaling")


@pytest.mark.slow  # starts the command line four times (two of them under accelerate launch)
def test_batch_benchmark_runs_and_one_and_two_processes_write_the_same_bytes(tmp_path):
    from benchmarks import batch

    payload = batch.main(["--quick", "--out", str(tmp_path)])
    (row,) = payload["rows"]
    embedding, generation = row["embedding"], row["generation"]
    assert embedding["images"] == 2 and embedding["batched_images_per_second"] > 0
    assert set(generation["ways"]) == {"generate per image", "batch, 1 process", "batch, 2 processes"}
    assert generation["identical_outputs"] is True
    assert generation["ways"]["generate per image"]["generating_seconds"] is None
    assert generation["ways"]["batch, 2 processes"]["generating_seconds"] > 0
    assert "| batch, 2 processes |" in payload["table"]
    _result(tmp_path, "batch")


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_the_cpu(tmp_path):
    from benchmarks import gpu

    (row,) = gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])["rows"]
    assert row["device"] == "cpu" and row["settings"] == {"steps": 2, "height": 64, "width": 64, "seed": 0}
    assert set(row["steps_per_second"]) == {"bare", "ours", "ours+previews"}
    _result(tmp_path, "gpu")


def test_gpu_benchmark_refuses_to_run_without_cuda_when_asked_for_it(tmp_path):
    from benchmarks import gpu

    assert not torch.cuda.is_available()  # conftest's cpu_only fixture, on any machine

    with pytest.raises(SystemExit, match="No CUDA device here"):
        gpu.main(["--out", str(tmp_path)])


@pytest.mark.slow
def test_samplers_benchmark_counts_the_live_modes_unet_calls(tmp_path):
    from benchmarks import samplers
    from imageprompt_widgets.settings import SCHEDULERS

    (row,) = samplers.main(["--quick", "--out", str(tmp_path)])["rows"]
    measured = row["live"]["sizes"][64]
    runs = measured["runs"]
    tiny, full, default = runs["live, tiny decoder"], runs["live, full decoder"], runs["default"]
    assert (tiny["scheduler"], tiny["steps"], tiny["unet_calls"], tiny["decoder"]) == ("lcm", 4, 4, "tiny")
    assert (full["unet_calls"], full["decoder"]) == (4, "full")
    # Measured at 4 steps (PNDM: 5 calls), its denoising scaled to the 30-step run's 31 calls.
    assert (default["scheduler"], default["steps"], default["unet_calls"], default["dtype"]) == (
        "pndm", 30, 31, "float32")
    for run in runs.values():
        stages = sum(seconds for stage, seconds in run.items() if stage in samplers.STAGES)
        assert run["total"] == pytest.approx(stages)
    assert measured["ratio_tiny"] > 0 and {"encoding", "total"} <= set(measured["slider_move"])
    sweep = row["schedulers"]
    assert set(sweep) - {"settings"} == set(SCHEDULERS)
    assert sweep["pndm"]["unet_calls"] == 3 and sweep["ddim"]["unet_calls"] == 2  # PNDM's warm-up step
    assert sweep["pndm"]["ratio_to_pndm"] == 1.0
    _result(tmp_path, "samplers")
