"""Whether a preset's weights are already on this machine, and how much its first load downloads.

A model picker should say "about 7.2 GB · not downloaded" before anyone presses Generate, and a loading
line should not promise a long wait for a model that is already here. Everything here looks only at the
local disk (the Hugging Face cache, this package's own build folder): no network, nothing loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..presets import Preset
from . import offline

#: Files whose presence says a Hub model is downloaded: its index/config, and its (largest) weights.
_SD_FILES = ("model_index.json", "unet/diffusion_pytorch_model.safetensors")
_ENCODER_FILES = ("config.json", "model.safetensors")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(GB|MB)\b")
#: This package's own folder: a model folder inside it ships with the package.
_PACKAGE = Path(__file__).resolve().parents[1]  # the package folder (this module is in loading/)


@dataclass(frozen=True)
class Availability:
    """Where a preset's weights are: ``state`` is ``"built"``/``"unbuilt"`` (made on this machine),
    ``"cached"``/``"partial"``/``"missing"`` (Hugging Face cache), ``"folder"`` (a local model folder) or
    ``"shipped"`` (a folder inside this package: the toy world's trained weights)."""

    name: str
    state: str
    download: str = ""  # "about 7.2 GB" for Hub presets; "" otherwise

    @property
    def ready(self) -> bool:
        """Whether loading needs no download."""
        return self.state in ("built", "unbuilt", "cached", "folder", "shipped")

    @property
    def status(self) -> str:
        """A few words: ``"built"``, ``"builds in seconds"``, ``"downloaded"``, ``"not downloaded"``, …"""
        return {
            "built": "built",
            "unbuilt": "builds in seconds",
            "cached": "downloaded",
            "partial": "partly downloaded",
            "missing": "not downloaded",
            "folder": "local folder",
            "shipped": "shipped with the package",
        }[self.state]

    def label(self) -> str:
        """One picker line: ``"sd14 · about 7.2 GB · not downloaded"``, ``"tiny · offline · built"``."""
        size = "offline" if self.state in ("built", "unbuilt", "shipped") else self.download
        return " · ".join(part for part in (self.name, size, self.status) if part)


def availability(preset: Preset, cache_dir: str | os.PathLike | None = None) -> Availability:
    """Look the preset's parts up on disk (``cache_dir``: the Hugging Face hub cache; default its own)."""
    if preset.offline_builder:
        return Availability(preset.name, "built" if _offline_built(preset) else "unbuilt")
    if os.path.isdir(preset.sd_model):
        shipped = Path(preset.sd_model).resolve().is_relative_to(_PACKAGE)
        return Availability(preset.name, "shipped" if shipped else "folder")
    parts = [(preset.sd_model, preset.revision, "", _SD_FILES)]
    subfolder = f"{preset.clip_subfolder}/" if preset.clip_subfolder else ""
    if not os.path.isdir(preset.clip_model):
        parts.append((preset.clip_model, None, subfolder, _ENCODER_FILES))
    if preset.clip_model_2 and not os.path.isdir(preset.clip_model_2):  # SDXL's second tower (bigG)
        parts.append((preset.clip_model_2, None, "", _ENCODER_FILES))
    adapters = (preset.ip_adapter,) if isinstance(preset.ip_adapter, str) else tuple(preset.ip_adapter or ())
    for adapter in adapters:  # "repo:subfolder:weight_name", one per adapter
        repo, folder, weight = (adapter.split(":") + ["", ""])[:3]
        if not os.path.isdir(repo):
            parts.append((repo, None, f"{folder}/" if folder else "", (weight,)))
    if preset.captioner and not os.path.isdir(preset.captioner):
        parts.append((preset.captioner, None, "", ("config.json",)))
    found = [hub_file_cached(repo, prefix + name, revision, cache_dir)
             for repo, revision, prefix, names in parts for name in names]
    state = "cached" if all(found) else "partial" if any(found) else "missing"
    return Availability(preset.name, state, download_text(preset.download_size))


def hub_file_cached(repo_id: str, filename: str, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def download_text(download_size: str) -> str:
    """``"about 5.5 GB (SD 1.4) + 1.7 GB (CLIP)"`` → ``"about 7.2 GB"``: the sizes a preset names, added up."""
    gigabytes = sum(float(number) / (1000 if unit == "MB" else 1) for number, unit in _SIZE.findall(download_size))
    return f"about {gigabytes:.1f} GB" if gigabytes else ""


def loading_message(preset: Preset) -> str:
    """The first status line of a load: what happens, with no promise of a long wait where there is none."""
    found = availability(preset)
    name = repr(preset.name)
    if found.state == "built":
        return f"Loading model {name} (built on this machine, random weights)…"
    if found.state == "unbuilt":
        return f"Loading model {name}: building it on this machine first (random weights, no download)…"
    if found.state == "cached":
        return f"Loading model {name} from this machine's Hugging Face cache…"
    if found.state == "folder":
        return f"Loading model {name} from its folder…"
    if found.state == "shipped":
        return f"Loading model {name} (trained weights shipped with the package)…"
    size = f" {found.download}" if found.download else ""
    return f"Loading model {name}: the first time downloads{size}; progress follows…"


def _offline_built(preset: Preset) -> bool:
    """Whether the folders ``offline.materialize`` would build for this preset already exist."""
    folders: list[Path] = []
    names = {preset.sd_model, preset.clip_model}
    if "tiny" in names:
        folders.append(offline.tiny_model_dir() / "sd" / "model_index.json")
    if "tiny-sdxl" in names:
        from .offline_sdxl import tiny_sdxl_dir

        folders.append(tiny_sdxl_dir() / "clip_g" / "config.json")
    folders += [offline.cache_dir() / f"{name}-{offline.TINY_METHODS_VERSION}"
                for name in sorted(names - {"tiny", "tiny-sdxl"}) if name in offline.OFFLINE_NAMES]
    if preset.captioner == "tiny":
        folders.append(offline.cache_dir() / f"tiny-blip-{offline.TINY_METHODS_VERSION}")
    return all(folder.exists() for folder in folders)


@dataclass(frozen=True)
class Choice:
    """The preset a notebook runs: the one asked for, or ``toy`` with ``reason`` (one sentence) when that one
    cannot load here."""

    preset: str
    reason: str = ""


OFFLINE_FALLBACK = "toy"


def preset_or_toy(name: str, timeout: float = 3.0) -> Choice:
    """``name`` where it can load on this machine (on disk already, or the Hugging Face Hub within reach),
    else the toy world, with one sentence why: a notebook opened offline runs instead of ending in a page of
    traceback. Looks at the disk and, only for a model still to download, tries one connection."""
    from ..presets import resolve_preset

    try:
        preset = resolve_preset(name)
    except ValueError as err:
        return Choice(OFFLINE_FALLBACK, f"{err} Using the offline toy world ({OFFLINE_FALLBACK!r}) instead.")
    found = availability(preset)
    if found.ready:
        return Choice(preset.name)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why = "HF_HUB_OFFLINE=1 forbids downloading it"
    elif not hub_reachable(timeout):
        why = "the Hugging Face Hub cannot be reached (no network?)"
    else:
        return Choice(preset.name)
    size = f" ({found.download})" if found.download else ""
    return Choice(OFFLINE_FALLBACK, f"Model {preset.name!r} is not on this machine{size} and {why}: using the "
                                    f"offline toy world ({OFFLINE_FALLBACK!r}) instead.")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether one TCP connection to the Hugging Face Hub (``HF_ENDPOINT``) opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
