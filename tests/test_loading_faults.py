"""Loading under faults: concurrent first loads, damaged caches, hostile model folders, full or read-only disks,
and the Hub's typed errors. Each fault ends in one sentence (a ``ModelLoadError``) naming the thing and what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from imageprompt_widgets import ModelLoadError
from imageprompt_widgets.loading import load_components

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
