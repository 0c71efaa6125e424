"""Loading under faults: concurrent first loads, damaged caches, hostile model folders, full or read-only disks,
and the Hub's typed errors. Each fault ends in one sentence (a ``ModelLoadError``) naming the thing and what to do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from imageprompt_widgets import ImagePromptPipeline, ModelLoadError
from imageprompt_widgets.loading import load_components
from imageprompt_widgets.models import DamagedModelError
from imageprompt_widgets.offline import ensure_tiny_models

WAIT = 600  # seconds a fresh process may take to build and load four offline presets on a loaded 2-core machine


def one_sentence(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < 400, text
    return text


def run_python(code: str, env: dict[str, str], timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)


# -- 1. different presets loading for the first time at once ------------------------------------------


def test_four_presets_first_loaded_from_four_threads_in_a_fresh_process_all_load(tmp_path):
    """The libraries' lazy imports and their global meta-device patches raced: two loads in three failed with
    "cannot import name 'StableDiffusionPipeline' from 'diffusers'" or "Cannot copy out of meta tensor"."""
    code = """
        import threading
        from imageprompt_widgets import ImagePromptPipeline
        names = ["tiny", "tiny-ip-adapter", "tiny-variations", "tiny-caption"]
        barrier, errors, loaded = threading.Barrier(len(names)), [], {}

        def load(name):
            barrier.wait()
            try:
                loaded[name] = ImagePromptPipeline.from_preset(name)
            except BaseException as err:
                errors.append(f"{name}: {type(err).__name__}: {err}")

        threads = [threading.Thread(target=load, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert sorted(loaded) == sorted(names)
        # Nothing was built on the meta device or left uninitialised: every parameter holds finite numbers.
        for name, pipe in loaded.items():
            for module in (pipe.sd.unet, pipe.sd.vae, pipe.image_encoder):
                for param in module.parameters():
                    assert param.device.type == "cpu" and bool(param.isfinite().all()), name
        print("loaded", *sorted(loaded))
    """
    env = {**os.environ, "IMAGEPROMPT_CACHE_DIR": str(tmp_path / "fresh-cache")}
    done = run_python(code, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["loaded", "tiny", "tiny-caption", "tiny-ip-adapter", "tiny-variations"]


def test_a_library_class_that_cannot_be_imported_is_one_sentence(monkeypatch):
    from imageprompt_widgets import quiet

    monkeypatch.setattr(quiet, "_imported", [])  # as in a fresh process
    monkeypatch.setitem(quiet.LIBRARY_CLASSES, "diffusers", ("StableDiffusionPipeline", "NoSuchPipeline"))
    with pytest.raises(ModelLoadError) as err:
        load_components("tiny", torch.device("cpu"), torch.float32)  # the loader itself: never from the cache
    text = one_sentence(err.value)
    assert text.startswith("Model 'tiny' could not be loaded because a library it needs could not be imported")
    assert "NoSuchPipeline" in text and "pip install -U diffusers transformers" in text


# -- 2. corrupt, truncated or missing weights -------------------------------------------------------------


@pytest.fixture
def tiny_copy(tmp_path):
    """A private copy of the tiny SD and CLIP folders, free to damage."""
    sd_folder, clip_folder = ensure_tiny_models()
    shutil.copytree(sd_folder, tmp_path / "sd")
    shutil.copytree(clip_folder, tmp_path / "clip")
    return tmp_path


WEIGHTS = {"unet": "sd/unet/diffusion_pytorch_model.safetensors", "clip": "clip/model.safetensors"}
DAMAGE = {
    "cut-in-half": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "cut-in-the-header": lambda path: path.write_bytes(path.read_bytes()[:100]),
    "garbled-header": lambda path: path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:]),
}


@pytest.mark.parametrize("part", sorted(WEIGHTS))
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_corrupt_weights_file_is_called_corrupt_and_named(tiny_copy, part, damage):
    """It was reported as "has no safetensors weights ... pass allow_pickle=True": wrong, and harmful advice."""
    weights = tiny_copy / WEIGHTS[part]
    DAMAGE[damage](weights)
    with pytest.raises(DamagedModelError) as err:
        ImagePromptPipeline.from_pretrained(sd_model=str(tiny_copy / "sd"), clip_model=str(tiny_copy / "clip"))
    text = one_sentence(err.value)
    assert f"The weights file {weights} of model " in text and " is corrupt " in text, text
    assert "delete that file" in text and "allow_pickle" not in text
    assert err.value.path == str(weights)


@pytest.mark.parametrize("part", sorted(WEIGHTS))
def test_a_weights_file_missing_from_a_folder_is_called_incomplete_and_named(tiny_copy, part):
    weights = tiny_copy / WEIGHTS[part]
    weights.unlink()
    with pytest.raises(DamagedModelError) as err:
        ImagePromptPipeline.from_pretrained(sd_model=str(tiny_copy / "sd"), clip_model=str(tiny_copy / "clip"))
    text = one_sentence(err.value)
    assert " is incomplete: its weights file " in text and f"{weights} is missing" in text, text
    assert "allow_pickle" not in text


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty IMAGEPROMPT_CACHE_DIR of this test's own (the offline models are built into it)."""
    monkeypatch.setenv("IMAGEPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


OFFLINE_WEIGHTS = {
    "tiny": "tiny-v1/sd/unet/diffusion_pytorch_model.safetensors",
    "tiny-caption": "tiny-blip-v1/model.safetensors",
    "tiny-ip-adapter": "tiny-ip-adapter-v1/image_encoder/model.safetensors",
    "tiny-variations": "tiny-variations-v1/vae/diffusion_pytorch_model.safetensors",
}


@pytest.mark.parametrize("damage", ["cut-in-half", "missing"])
@pytest.mark.parametrize("preset", sorted(OFFLINE_WEIGHTS))
def test_a_damaged_offline_cache_is_rebuilt_once_and_loads(private_cache, preset, damage):
    """Its build marker still existed, so a damaged cache of an offline preset never healed."""
    device = torch.device("cpu")
    first = load_components(preset, device, torch.float32)
    before = [param.detach().clone() for param in first.sd.unet.parameters()]
    weights = private_cache / OFFLINE_WEIGHTS[preset]
    good = {name: tensor.clone() for name, tensor in load_file(weights).items()}  # not backed by the file
    if damage == "missing":
        weights.unlink()
    else:
        DAMAGE[damage](weights)
    messages = []
    again = load_components(preset, device, torch.float32, on_status=messages.append)
    assert any(message.startswith("The offline models in ") and "are damaged" in message for message in messages)
    rebuilt = load_file(weights)
    assert rebuilt.keys() == good.keys() and all(torch.equal(rebuilt[k], good[k]) for k in good)
    assert all(torch.equal(old, new) for old, new in zip(before, again.sd.unet.parameters()))
    assert not [p.name for p in private_cache.iterdir() if p.name.startswith(".")]  # no leftovers
