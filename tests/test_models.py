"""Loading: the one cache, device/dtype policy, offline tiny models, and one-sentence load errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import WAIT, one_sentence
from safetensors.torch import load_file

from imageprompt_widgets import ImagePromptPipeline, ModelLoadError, clear_cache
from imageprompt_widgets.engine import pipeline as pipeline_module
from imageprompt_widgets.loading.cache import MODEL_CACHE, resolve_device_dtype
from imageprompt_widgets.loading.offline import build_tiny_models, ensure_tiny_models
from imageprompt_widgets.presets import PRESETS, UnknownPresetError, resolve_preset


def engine_modules() -> list[str]:
    """Every module of the package outside ``widget/``, found by walking the package (not a hand-kept list)."""
    import pkgutil

    import imageprompt_widgets

    names = [info.name for info in pkgutil.walk_packages(imageprompt_widgets.__path__, "imageprompt_widgets.")]
    # A __main__ module runs its command when imported: it is the CLI's entry, not something to import.
    return ["imageprompt_widgets"] + sorted(n for n in names if not n.startswith("imageprompt_widgets.widget")
                                            and not n.endswith(".__main__"))


def test_same_arguments_give_the_same_cached_object_quickly(tiny_pipe, monkeypatch):
    # Quick because nothing loads again: the loader is never called (benchmarks/cache.py times it: < 10 ms).
    monkeypatch.setattr(pipeline_module, "load_components", lambda *a, **k: pytest.fail("loaded a second time"))
    again = ImagePromptPipeline.from_preset("tiny")
    assert again is tiny_pipe
    assert ImagePromptPipeline.from_preset("tiny", device="cpu", dtype="fp32") is tiny_pipe


def test_two_threads_asking_at_once_load_once(monkeypatch):
    loads = []
    real_load = pipeline_module.load_components

    def slow_counting_load(*args, **kwargs):
        loads.append(threading.get_ident())
        time.sleep(0.3)  # widen the window in which a second thread could start a second load
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "load_components", slow_counting_load)
    results = []
    barrier = threading.Barrier(2)

    def ask():
        barrier.wait(WAIT)
        results.append(ImagePromptPipeline.from_preset("tiny", dtype=torch.float64))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(loads) == 1
    assert results[0] is results[1]
    assert results[0].dtype == torch.float64


def test_clear_cache_forgets_loaded_pipelines(tiny_pipe):
    first = ImagePromptPipeline.from_preset("tiny", dtype=torch.float64)
    clear_cache()
    assert len(MODEL_CACHE) == 0
    second = ImagePromptPipeline.from_preset("tiny", dtype=torch.float64)
    assert second is not first


def test_device_and_dtype_policy():
    assert resolve_device_dtype(None, None) == (torch.device("cpu"), torch.float32)  # conftest: no GPU seen
    assert resolve_device_dtype("cuda", None) == (torch.device("cuda"), torch.float16)
    assert resolve_device_dtype("cpu", "fp16") == (torch.device("cpu"), torch.float16)
    assert resolve_device_dtype("cpu", torch.bfloat16)[1] == torch.bfloat16
    with pytest.raises(ModelLoadError, match="Unknown dtype 'float8'"):
        resolve_device_dtype("cpu", "float8")
    with pytest.raises(ModelLoadError, match="Unknown device 'gpu0'"):
        resolve_device_dtype("gpu0", None)


def test_presets_are_the_contracts_pairs(monkeypatch):
    assert PRESETS["sd14"].sd_model == "CompVis/stable-diffusion-v1-4"
    assert PRESETS["sd15"].sd_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert PRESETS["sd14"].clip_model == PRESETS["sd15"].clip_model == "openai/clip-vit-large-patch14"
    monkeypatch.delenv("IMAGEPROMPT_MODEL", raising=False)
    assert resolve_preset(None).name == "sd14"
    monkeypatch.setenv("IMAGEPROMPT_MODEL", "tiny")
    assert resolve_preset(None).name == "tiny"


def test_tiny_models_are_seeded_identically_on_every_build(tmp_path):
    build_tiny_models(tmp_path / "a")
    build_tiny_models(tmp_path / "b")
    for part in ("sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
                 "sd/text_encoder/model.safetensors", "clip/model.safetensors"):
        first, second = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first), part


@pytest.mark.slow
def test_two_processes_building_the_tiny_models_at_once_do_not_corrupt_them(tmp_path):
    env = {**os.environ, "IMAGEPROMPT_CACHE_DIR": str(tmp_path)}
    code = "from imageprompt_widgets.loading.offline import ensure_tiny_models; print(ensure_tiny_models()[0])"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(outputs[0]).parent.name]  # no temp leftovers
    loaded = ImagePromptPipeline.from_pretrained(sd_model=outputs[0], clip_model=str(Path(outputs[0]).parent / "clip"))
    assert loaded.sd.unet.config.cross_attention_dim == 32


def test_engine_never_imports_ipywidgets():
    modules = engine_modules()
    # The walk really finds the engine, nested packages included, and leaves the widget out.
    assert {"imageprompt_widgets.engine.pipeline", "imageprompt_widgets.loading.offline", "imageprompt_widgets.methods.caption",
            "imageprompt_widgets.views", "imageprompt_widgets.cli"} <= set(modules)
    assert not [name for name in modules if ".widget" in name]
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in modules)
        + "import imageprompt_widgets as m\n"
        + "m.ImagePromptPipeline, m.load_image, m.generate, m.PRESETS\n"
        + "leaked = sorted(n for n in sys.modules if n.split('.')[0] == 'ipywidgets')\n"
        + "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_importing_the_package_is_cheap():
    code = "import sys, imageprompt_widgets\nassert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- one clear sentence per loading failure ---------------------------------------------------


def test_unknown_preset_name():
    with pytest.raises(UnknownPresetError) as err:
        ImagePromptPipeline.from_preset("sd99")
    assert "sd99" in one_sentence(err.value) and "sd14" in str(err.value)


def test_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="has no model_index.json") as err:
        ImagePromptPipeline.from_preset(str(tmp_path))
    one_sentence(err.value)


def test_a_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ImagePromptPipeline.from_pretrained(sd_model=str(tmp_path / "nowhere"), clip_model=str(tmp_path))


def test_missing_weights_offline_name_the_model_in_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(ModelLoadError) as err:
        ImagePromptPipeline.from_pretrained(
            sd_model="CompVis/stable-diffusion-v1-4", clip_model="openai/clip-vit-large-patch14"
        )
    text = one_sentence(err.value)
    assert "CompVis/stable-diffusion-v1-4" in text and "HF_HUB_OFFLINE=1" in text


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path):
    sd_folder, clip_folder = ensure_tiny_models()
    from diffusers import StableDiffusionPipeline

    pickled = tmp_path / "pickled-sd"
    StableDiffusionPipeline.from_pretrained(sd_folder).save_pretrained(pickled, safe_serialization=False)
    for weights in pickled.rglob("*.safetensors"):  # transformers 5 writes safetensors regardless
        pickle_name = "pytorch_model.bin" if weights.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(weights), weights.with_name(pickle_name))
        weights.unlink()
    assert not list(pickled.rglob("*.safetensors")) and list(pickled.rglob("*.bin"))
    with pytest.raises(ModelLoadError, match="allow_pickle=True") as err:
        ImagePromptPipeline.from_pretrained(sd_model=str(pickled), clip_model=clip_folder)
    one_sentence(err.value)
    trusted = ImagePromptPipeline.from_pretrained(sd_model=str(pickled), clip_model=clip_folder, allow_pickle=True)
    assert trusted.sd.unet.config.cross_attention_dim == 32


def test_safety_checker_false_is_switched_off_the_supported_way():
    pipe = ImagePromptPipeline.from_preset("tiny", safety_checker=False)
    assert pipe.sd.safety_checker is None
    assert pipe.sd.config.requires_safety_checker is False


def test_a_broken_model_offline_is_not_reported_as_missing(tmp_path, monkeypatch):
    """A model that is present but wrong (here: a UNet config that does not fit its weights) says so."""
    import json
    import shutil

    sd_folder, clip_folder = ensure_tiny_models()
    broken = tmp_path / "broken-sd"
    shutil.copytree(sd_folder, broken)
    config_path = broken / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [48, 96]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        ImagePromptPipeline.from_pretrained(sd_model=str(broken), clip_model=clip_folder)
    text = one_sentence(err.value)
    assert "HF_HUB_OFFLINE" not in text and "could not be loaded" in text


def test_a_folder_inside_the_package_is_named_from_the_package_down(tmp_path, monkeypatch):
    """Messages and notebook outputs name the toy world's CLIP without the machine's install path."""
    from imageprompt_widgets.presets import TOY_CLIP_FOLDER, shown_source

    monkeypatch.chdir(tmp_path)
    assert shown_source(str(TOY_CLIP_FOLDER)) == "imageprompt_widgets/toy/weights/clip"
    assert shown_source("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"  # a Hub id, as given
    assert shown_source(str(tmp_path)) == str(tmp_path)  # a user's folder, as given
