"""Loading under faults: concurrent first loads, damaged caches, hostile model folders, full or read-only disks,
and the Hub's typed errors. Each fault ends in one sentence (a ``ModelLoadError``) naming the thing and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import WAIT, one_sentence
from safetensors.torch import load_file

from imageprompt_widgets import ImagePromptPipeline, ModelLoadError
from imageprompt_widgets.loading.cache import DamagedModelError
from imageprompt_widgets.loading.components import load_components
from imageprompt_widgets.loading.offline import ensure_tiny_models
from imageprompt_widgets.methods import part_loaders
from imageprompt_widgets.presets import resolve_preset


def run_python(code: str, env: dict[str, str], timeout: float = 2 * WAIT) -> subprocess.CompletedProcess:
    """A fresh process may build and load four offline presets: twice the one wait, still under the test's
    300 s timeout."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)


# -- 1. different presets loading for the first time at once ------------------------------------------


@pytest.mark.slow  # a fresh process building four offline presets: about 25 s on a loaded 2-core machine
def test_four_presets_first_loaded_from_four_threads_in_a_fresh_process_all_load(tmp_path):
    """The libraries' lazy imports and their global meta-device patches raced: two loads in three failed with
    "cannot import name 'StableDiffusionPipeline' from 'diffusers'" or "Cannot copy out of meta tensor"."""
    code = """
        import threading
        from imageprompt_widgets import ImagePromptPipeline
        names = ["tiny", "tiny-ip-adapter", "tiny-variations", "tiny-caption"]
        barrier, errors, loaded = threading.Barrier(len(names)), [], {}

        def load(name):
            barrier.wait(120)
            try:
                loaded[name] = ImagePromptPipeline.from_preset(name)
            except BaseException as err:
                errors.append(f"{name}: {type(err).__name__}: {err}")

        threads = [threading.Thread(target=load, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
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
    from imageprompt_widgets.loading import quiet

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
    # adapter files are read (their shapes) before the UNet loads them: damaged ones heal the same way
    "tiny-ip-adapter-plus": "tiny-ip-adapter-plus-v1/ip-adapter-plus_tiny.safetensors",
    "tiny-sdxl-ip-adapter-plus": "tiny-sdxl-ip-adapter-plus-v1/ip-adapter-plus_sdxl_vit-h_tiny.safetensors",
}


@pytest.mark.parametrize("damage", ["cut-in-half", "missing"])
@pytest.mark.parametrize("preset", sorted(OFFLINE_WEIGHTS))
@pytest.mark.slow
def test_a_damaged_offline_cache_is_rebuilt_once_and_loads(private_cache, preset, damage):
    """Its build marker still existed, so a damaged cache of an offline preset never healed."""
    device = torch.device("cpu")
    loaders = part_loaders(resolve_preset(preset))  # BLIP's weights are the captioner's part
    first = load_components(preset, device, torch.float32, part_loaders=loaders)
    before = [param.detach().clone() for param in first.sd.unet.parameters()]
    weights = private_cache / OFFLINE_WEIGHTS[preset]
    good = {name: tensor.clone() for name, tensor in load_file(weights).items()}  # not backed by the file
    if damage == "missing":
        weights.unlink()
    else:
        DAMAGE[damage](weights)
    messages = []
    again = load_components(preset, device, torch.float32, on_status=messages.append, part_loaders=loaders)
    assert any(message.startswith("The offline models in ") and "are damaged" in message for message in messages)
    rebuilt = load_file(weights)
    assert rebuilt.keys() == good.keys() and all(torch.equal(rebuilt[k], good[k]) for k in good)
    assert all(torch.equal(old, new) for old, new in zip(before, again.sd.unet.parameters()))
    assert not [p.name for p in private_cache.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_damaged_folder_of_the_users_is_reported_and_the_offline_builds_are_left_alone(private_cache, tmp_path):
    from imageprompt_widgets.presets import Preset

    ensure_tiny_models()
    built = (private_cache / "tiny-v1").stat().st_ino
    sd_folder, _ = ensure_tiny_models()
    shutil.copytree(sd_folder, tmp_path / "mine")
    weights = tmp_path / "mine" / "unet" / "diffusion_pytorch_model.safetensors"
    DAMAGE["cut-in-half"](weights)
    mixed = Preset(name="mine", sd_model=str(tmp_path / "mine"), clip_model="tiny")
    with pytest.raises(DamagedModelError, match="is corrupt"):
        load_components(mixed, torch.device("cpu"), torch.float32)
    assert (private_cache / "tiny-v1").stat().st_ino == built  # not rebuilt: the damage is not in its cache


# -- 3. what a local model folder's configs may ask for ------------------------------------------------

HOSTILE_CONFIGS = {
    # (file under the copy, keys to change, what the sentence must name)
    "scheduler-timesteps": ("sd/scheduler/scheduler_config.json", {"num_train_timesteps": 1_000_000_000},
                            "num_train_timesteps=1000000000"),
    "vision-tokens": ("clip/config.json", {"vision_config": {"image_size": 2048, "patch_size": 1}},
                      "image_size=2048 with patch_size=1"),
    "unet-channels": ("sd/unet/config.json", {"block_out_channels": [32, 1_000_000]}, "block_out_channels=1000000"),
    "unet-sample-size": ("sd/unet/config.json", {"sample_size": 100_000}, "sample_size=100000"),
    "vae-layers": ("sd/vae/config.json", {"layers_per_block": 100_000}, "layers_per_block=100000"),
    "text-vocab": ("sd/text_encoder/config.json", {"vocab_size": 10**12}, "vocab_size=1000000000000"),
    "text-positions": ("sd/text_encoder/config.json", {"max_position_embeddings": 10**9},
                       "max_position_embeddings=1000000000"),
    "text-layers": ("clip/config.json", {"text_config": {"num_hidden_layers": 100_000}}, "num_hidden_layers=100000"),
    "tokenizer-length": ("sd/tokenizer/tokenizer_config.json", {"model_max_length": 10**9},
                         "model_max_length=1000000000"),
    "processor-size": ("clip/preprocessor_config.json", {"crop_size": {"height": 10**6, "width": 10**6}},
                       "crop_size=1000000"),
    "infinite-width": ("sd/unet/config.json", {"cross_attention_dim": float("inf")}, "cross_attention_dim=inf"),
}


def _hostile_copy(root, case: str):
    import json

    sd_folder, clip_folder = ensure_tiny_models()
    for source, part in ((sd_folder, "sd"), (clip_folder, "clip")):
        if not (root / part).exists():
            shutil.copytree(source, root / part)
    relative, changes, _ = HOSTILE_CONFIGS[case]
    path = root / relative
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_a_hostile_config_in_a_local_folder_is_refused_naming_the_file_and_the_value(tmp_path, case):
    path = _hostile_copy(tmp_path, case)
    with pytest.raises(ModelLoadError) as err:
        ImagePromptPipeline.from_pretrained(sd_model=str(tmp_path / "sd"), clip_model=str(tmp_path / "clip"))
    text = one_sentence(err.value)
    assert str(path) in text and HOSTILE_CONFIGS[case][2] in text, text


@pytest.mark.slow  # a fresh process, so that its peak memory measures these loads alone
def test_hostile_configs_are_refused_before_anything_big_is_allocated(tmp_path):
    """Before, ``num_train_timesteps: 1e8`` took 48 s and 2.8 GB (1e9: over 8 GB), and a 2048 px vision tower with
    1 px patches 17 s and 750 MB, before any check. A fresh process measures its own peak memory around the loads."""
    cases = ["scheduler-timesteps", "vision-tokens", "unet-channels", "text-vocab"]
    folders = []
    for case in cases:
        _hostile_copy(tmp_path / case, case)
        folders.append(str(tmp_path / case))
    code = f"""
        import resource
        from imageprompt_widgets import ImagePromptPipeline, ModelLoadError
        ImagePromptPipeline.from_preset("tiny")  # imports and allocator warmed up, as in a session
        for folder in {folders!r}:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                ImagePromptPipeline.from_pretrained(sd_model=folder + "/sd", clip_model=folder + "/clip")
            except ModelLoadError:
                pass
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            print(grown // 1024)
    """
    done = run_python(code, dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    grown = done.stdout.split()
    assert len(grown) == len(cases), done.stdout
    for case, grown_mib in zip(cases, grown):
        # Refused before anything big was allocated (measured: 0-7 MiB; the loads took 2.8 GB and 48 s before).
        assert int(grown_mib) < 64, f"{case}: the peak RSS grew {grown_mib} MiB"


BROKEN_CONFIG_FILES = {
    "deeply-nested": (lambda: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "huge": (lambda: '{"pad": "' + "x" * (5 * 2**20) + '"}', "far larger than any real one"),
    "not-json": (lambda: "{'this': is not json", "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CONFIG_FILES))
def test_a_config_file_that_cannot_be_read_safely_is_refused_naming_it(tmp_path, case):
    _hostile_copy(tmp_path, "unet-channels")  # any copy; its UNet config is replaced below
    path = tmp_path / "sd" / "unet" / "config.json"
    make, says = BROKEN_CONFIG_FILES[case]
    path.write_text(make())
    with pytest.raises(ModelLoadError) as err:
        ImagePromptPipeline.from_pretrained(sd_model=str(tmp_path / "sd"), clip_model=str(tmp_path / "clip"))
    text = one_sentence(err.value)
    assert str(path) in text and says in text, text


REAL_CONFIGS = {
    # The real files' values (SD 1.x comes from benchmarks/realsize.py below): SDXL base, SD 2.1, OpenCLIP ViT-H and
    # ViT-bigG (SDXL's second text encoder, IP-Adapter's encoders), BLIP large.
    "sdxl-unet": ("unet/config.json", {
        "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}),
    "sdxl-vae": ("vae/config.json", {
        "_class_name": "AutoencoderKL", "sample_size": 1024, "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2, "latent_channels": 4, "in_channels": 3, "out_channels": 3, "norm_num_groups": 32}),
    "sdxl-scheduler": ("scheduler/scheduler_config.json", {
        "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085}),
    "sd21-unet": ("unet/config.json", {
        "_class_name": "UNet2DConditionModel", "sample_size": 96, "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}),
    "vit-h": ("config.json", {
        "architectures": ["CLIPModel"], "projection_dim": 1024,
        "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                        "num_hidden_layers": 24, "vocab_size": 49408, "max_position_embeddings": 77},
        "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                          "num_hidden_layers": 32, "image_size": 224, "patch_size": 14}}),
    "vit-bigg": ("config.json", {
        "architectures": ["CLIPModel"], "projection_dim": 1280,
        "text_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                        "num_hidden_layers": 32, "vocab_size": 49408, "max_position_embeddings": 77},
        "vision_config": {"hidden_size": 1664, "intermediate_size": 8192, "num_attention_heads": 16,
                          "num_hidden_layers": 48, "image_size": 224, "patch_size": 14}}),
    "vit-l-336": ("config.json", {"vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "image_size": 336,
                                                    "patch_size": 14, "intermediate_size": 4096}}),
    "blip-large": ("config.json", {
        "text_config": {"vocab_size": 30524, "hidden_size": 768, "max_position_embeddings": 512, "num_hidden_layers": 12},
        "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "image_size": 384, "patch_size": 16}}),
    "sd-tokenizer": ("tokenizer/tokenizer_config.json", {"model_max_length": 77}),
    "clip-processor": ("preprocessor_config.json", {"crop_size": {"height": 224, "width": 224},
                                                    "size": {"shortest_edge": 224}}),
}


@pytest.mark.parametrize("model", sorted(REAL_CONFIGS))
def test_real_model_configs_pass_the_bounds(tmp_path, model):
    import json

    from imageprompt_widgets.loading.configs import check_folder_configs

    relative, config = REAL_CONFIGS[model]
    (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / relative).write_text(json.dumps(config))
    check_folder_configs(str(tmp_path), model)


def test_the_real_size_benchmark_architectures_pass_the_bounds(tmp_path):
    """benchmarks/realsize.py's SD 1.4 and CLIP ViT-L/14, their configs written as from_pretrained would read them
    (models built on the meta device: no weights)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from benchmarks import realsize
    finally:
        sys.path.pop(0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor

    from imageprompt_widgets.loading.configs import check_folder_configs
    from imageprompt_widgets.loading.offline import sd14_scheduler

    with torch.device("meta"):  # no memory for weights
        UNet2DConditionModel(**realsize.UNET_CONFIG).save_config(tmp_path / "sd" / "unet")
        AutoencoderKL(**realsize.VAE_CONFIG).save_config(tmp_path / "sd" / "vae")
    sd14_scheduler().save_config(tmp_path / "sd" / "scheduler")
    CLIPConfig(text_config=realsize.TEXT_CONFIG, vision_config=realsize.VISION_CONFIG,
               projection_dim=768).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        tmp_path / "clip")
    check_folder_configs(str(tmp_path / "sd"), "realsize sd")
    check_folder_configs(str(tmp_path / "clip"), "realsize clip")
    assert json_values(tmp_path / "sd" / "unet" / "config.json")["block_out_channels"] == [320, 640, 1280, 1280]


def json_values(path) -> dict:
    import json

    return json.loads(path.read_text())


# -- 4. filesystem faults while building the offline models ------------------------------------------------

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ENOSPC_SAFETENSORS = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _disk_full(kind: str):
    def write(*args, **kwargs):
        if kind == "safetensors":
            from safetensors import SafetensorError

            raise SafetensorError(ENOSPC_SAFETENSORS)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_while_building_offline_models_is_one_sentence(private_cache, monkeypatch, kind):
    from imageprompt_widgets.loading import offline

    monkeypatch.setattr(offline, "save_sd_pipeline", _disk_full(kind))  # the build's first big write
    with pytest.raises(ModelLoadError) as err:
        load_components("tiny", torch.device("cpu"), torch.float32)
    text = one_sentence(err.value)
    assert text == (f"The offline models could not be built in {private_cache}: the disk holding {private_cache} is "
                    "full; free some space, or set IMAGEPROMPT_CACHE_DIR to a folder on a disk with room.")
    assert not list(private_cache.iterdir())  # the half-built temp folder is gone


def test_a_read_only_cache_folder_is_one_sentence_simulated(private_cache, monkeypatch):
    """As root (CI containers) permissions are not enforced, so the refusal is simulated where it happens."""
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(private_cache))

    private_cache.mkdir()
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(ModelLoadError) as err:
        load_components("tiny", torch.device("cpu"), torch.float32)
    assert one_sentence(err.value) == (
        f"The offline models could not be built in {private_cache}: {private_cache} cannot be written (permission "
        "denied); set IMAGEPROMPT_CACHE_DIR to a folder you can write to.")


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
def test_a_read_only_cache_folder_is_one_sentence(private_cache):
    private_cache.mkdir()
    private_cache.chmod(0o555)
    try:
        with pytest.raises(ModelLoadError) as err:
            load_components("tiny", torch.device("cpu"), torch.float32)
    finally:
        private_cache.chmod(0o755)
    assert f"{private_cache} cannot be written (permission denied)" in one_sentence(err.value)


@pytest.mark.parametrize("where", ["the-cache-folder", "a-parent-folder"])
def test_a_cache_path_that_is_a_file_is_one_sentence(tmp_path, monkeypatch, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    cache = blocker if where == "the-cache-folder" else blocker / "cache"
    monkeypatch.setenv("IMAGEPROMPT_CACHE_DIR", str(cache))
    with pytest.raises(ModelLoadError) as err:
        load_components("tiny", torch.device("cpu"), torch.float32)
    assert one_sentence(err.value) == (
        f"The offline models could not be built in {cache}: {blocker} is a file, not a folder; remove it, or set "
        "IMAGEPROMPT_CACHE_DIR to a folder you can write to.")


# -- 5. a class's shared cache is readable by the class ------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_built_offline_models_are_readable_as_the_umask_allows(private_cache, umask):
    """tempfile.mkdtemp made every build folder 0700, so a teacher's shared cache was unreadable to the class."""
    saved = os.umask(umask)
    try:
        ensure_tiny_models()
    finally:
        os.umask(saved)
    build = private_cache / "tiny-v1"
    modes = {path.relative_to(private_cache): path.stat().st_mode & 0o777 for path in [build, *build.rglob("*")]}
    folders = {path for path in modes if (private_cache / path).is_dir()}
    assert {modes[path] for path in folders} == {0o777 & ~umask}, modes
    assert {modes[path] for path in modes if path not in folders} == {0o666 & ~umask}, modes


def test_a_build_left_private_by_an_older_version_is_opened_up_on_use(private_cache):
    ensure_tiny_models()
    build = private_cache / "tiny-v1"
    build.chmod(0o700)  # what tempfile.mkdtemp left before
    saved = os.umask(0o022)
    try:
        ensure_tiny_models()
    finally:
        os.umask(saved)
    assert build.stat().st_mode & 0o777 == 0o755


# -- 7. the Hub's typed errors, found in the chain the libraries wrap them in -----------------------------


def _http(status: int):
    """What huggingface_hub's HTTP errors read from a response (no network library needed)."""
    from types import SimpleNamespace

    return SimpleNamespace(status_code=status, headers={}, request=None)


def _hub_error(kind: str) -> BaseException:
    from huggingface_hub import errors

    url = "https://huggingface.co/org/model/resolve/main/unet/diffusion_pytorch_model.safetensors"
    made = {
        "gated": lambda: errors.GatedRepoError("401 Client Error. Cannot access gated repo", response=_http(401)),
        "not-found": lambda: errors.RepositoryNotFoundError("404 Client Error. Repository Not Found",
                                                            response=_http(404)),
        "private": lambda: errors.RepositoryNotFoundError("401 Client Error. Repository Not Found",
                                                          response=_http(401)),
        "disabled": lambda: errors.DisabledRepoError("403 Client Error. This repository is disabled",
                                                     response=_http(403)),
        "revision": lambda: errors.RevisionNotFoundError("404 Client Error. Revision Not Found", response=_http(404)),
        "remote-entry": lambda: errors.RemoteEntryNotFoundError(
            f"404 Client Error. Entry Not Found for url: {url.replace('.safetensors', '.json')}", response=_http(404)),
        "remote-safetensors": lambda: errors.RemoteEntryNotFoundError(
            f"404 Client Error. Entry Not Found for url: {url}", response=_http(404)),
        "local-entry": lambda: errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
        "offline-mode": lambda: errors.OfflineModeIsEnabled("Cannot reach the Hub: offline mode is enabled"),
        "unauthorized": lambda: errors.HfHubHTTPError("401 Client Error: Unauthorized", response=_http(401)),
        "rate-limited": lambda: errors.HfHubHTTPError("429 Client Error: Too Many Requests", response=_http(429)),
        "server-error": lambda: errors.HfHubHTTPError("503 Server Error: Service Unavailable", response=_http(503)),
        "teapot": lambda: errors.HfHubHTTPError("418 Client Error: I'm a teapot", response=_http(418)),
        "connection": lambda: ConnectionError("[Errno -3] Temporary failure in name resolution"),
        "timeout": lambda: TimeoutError("timed out"),
        "transport": lambda: type("TransportError", (Exception,), {})("the network is unreachable"),
    }
    return made[kind]()


LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"
HUB_SENTENCES = {
    "gated": f"Model 'org/model' is gated: accept its licence on https://huggingface.co/org/model while logged in to "
             f"the Hub, then {LOGIN} here and try again.",
    "not-found": f"Model 'org/model' was not found on the Hugging Face Hub: check the name; if it is private, {LOGIN} "
                 "with an account that can see it.",
    "disabled": "Model 'org/model' has been disabled on the Hugging Face Hub: pick another model.",
    "revision": "Model 'org/model' has no such revision (branch, tag or commit) on the Hub: check the revision.",
    "remote-entry": "Model 'org/model' on the Hub has no file unet/diffusion_pytorch_model.json: check that it is a "
                    "diffusers (Stable Diffusion) or transformers (CLIP) model.",
    "remote-safetensors": "Model 'org/model' has no safetensors weights; pickle (.bin) weights can run code when "
                          "loaded, so they are refused unless you pass allow_pickle=True for a model you trust.",
    "offline": "Model 'org/model' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: "
               "run once with network access (or `hf download org/model`) and try again.",
    "no-network": "Model 'org/model' could not be downloaded (no network?): connect once to fetch it, or use "
                  "model='toy' (the toy world, trained, shipped with the package) to try the tool offline.",
    "unauthorized": f"The Hugging Face Hub refused access to model 'org/model' (HTTP 401): {LOGIN}, and accept the "
                    "model's licence on https://huggingface.co/org/model if it has one.",
    "rate-limited": "The Hugging Face Hub is limiting downloads of model 'org/model' (HTTP 429, too many requests): "
                    f"wait a few minutes, or {LOGIN} for a higher limit, and try again.",
    "server-error": "The Hugging Face Hub failed while serving model 'org/model' (HTTP 503): try again in a few "
                    "minutes.",
    "teapot": "Model 'org/model' could not be downloaded from the Hugging Face Hub (HTTP 418): check the name and try "
              "again.",
}
HUB_CASES = {  # error kind -> (HF_HUB_OFFLINE, expected sentence)
    "gated": ("1", "gated"), "not-found": ("1", "not-found"), "private": ("1", "not-found"),
    "disabled": ("1", "disabled"), "revision": ("1", "revision"), "remote-entry": ("1", "remote-entry"),
    "remote-safetensors": ("1", "remote-safetensors"), "local-entry": ("1", "offline"),
    "offline-mode": ("1", "offline"), "unauthorized": ("1", "unauthorized"), "rate-limited": ("1", "rate-limited"),
    "server-error": ("1", "server-error"), "teapot": ("1", "teapot"), "connection": ("0", "no-network"),
    "timeout": ("0", "no-network"), "transport": ("0", "no-network"),
}


@pytest.mark.parametrize("wrapping", ["raise-from", "raised-while-handling", "bare"])
@pytest.mark.parametrize("kind", sorted(HUB_CASES))
def test_the_hubs_typed_errors_become_their_sentence(monkeypatch, kind, wrapping):
    """Loaders wrap the Hub's errors in their own OSError (``raise ... from`` or inside ``except``): the chain
    is searched, so the sentence no longer depends on message words such as "404" or "Connection"."""
    from diffusers import StableDiffusionPipeline

    from imageprompt_widgets.loading.components import load_sd
    from imageprompt_widgets.presets import Preset

    offline, expected = HUB_CASES[kind]
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)

    def failing_from_pretrained(*args, **kwargs):
        cause = _hub_error(kind)
        if wrapping == "bare":
            raise cause
        try:
            raise cause
        except type(cause):
            wrapper = OSError("We couldn't load this model; see the error above.")  # no telling words
            if wrapping == "raise-from":
                raise wrapper from cause
            raise wrapper  # as loaders do inside ``except``: the Hub's error is the __context__

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", failing_from_pretrained)
    preset = Preset(name="org/model", sd_model="org/model", clip_model="org/encoder")
    with pytest.raises(ModelLoadError) as err:
        load_sd("org/model", preset, torch.float32, safety_checker=None, allow_pickle=False)
    assert one_sentence(err.value) == HUB_SENTENCES[expected]


def test_message_words_are_still_read_as_the_last_resort(monkeypatch):
    from diffusers import StableDiffusionPipeline

    from imageprompt_widgets.loading.components import load_sd
    from imageprompt_widgets.presets import Preset

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def failing_from_pretrained(*args, **kwargs):
        raise OSError("Max retries exceeded with url: /api/models/org/model")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", failing_from_pretrained)
    preset = Preset(name="org/model", sd_model="org/model", clip_model="org/encoder")
    with pytest.raises(ModelLoadError) as err:
        load_sd("org/model", preset, torch.float32, safety_checker=None, allow_pickle=False)
    assert one_sentence(err.value) == HUB_SENTENCES["no-network"]


# -- 8. no noise users cannot act on --------------------------------------------------------------------------

NOISE = ("torchvision", "image processor", "ImageProcessorPil", "Siglip", "truncated")


@pytest.mark.slow  # a fresh process building two offline presets: the quickstart's first run
@pytest.mark.slow
def test_a_first_generation_prints_no_library_noise_but_keeps_warnings_users_can_act_on(tmp_path):
    """The quickstart printed transformers' red "requires torchvision (not installed); falling back to ..." lines
    (three of them) on every first load. They are said once, quietly, while the libraries are imported under the
    loading lock; the libraries' own warnings stay on outside loading."""
    code = """
        from transformers.utils import logging as hf_logging
        from imageprompt_widgets import generate
        from imageprompt_widgets.loading.offline import sample_image

        generate(sample_image(0), model="tiny", steps=1)
        generate(sample_image(0), model="tiny-caption", mode="caption", steps=1)
        generate(sample_image(0), model="tiny", mode="blend", prompt="a cat " * 200, steps=1)
        hf_logging.get_logger("transformers.user").warning("a warning the user can act on")
        print("done")
    """
    env = {**os.environ, "IMAGEPROMPT_CACHE_DIR": str(tmp_path / "fresh-cache")}
    done = run_python(code, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "done"
    lines = done.stderr.strip().splitlines()
    assert lines == ["[transformers] a warning the user can act on"], done.stderr[-3000:]
    assert not [word for word in NOISE if word in done.stderr]
