"""Presets: which Stable Diffusion model goes with which CLIP image encoder.

An image prompt only makes sense when the image encoder's embedding width equals the UNet's
cross-attention width, so the pair is chosen together and named once here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType

#: Environment variable that replaces the default preset (the examples run in CI with ``tiny``).
MODEL_ENV = "IMAGEPROMPT_MODEL"
DEFAULT_PRESET = "sd14"


@dataclass(frozen=True)
class Preset:
    """A matched pair of a Stable Diffusion model and the CLIP image encoder that fits it.

    ``sd_model`` and ``clip_model`` are Hugging Face model ids or local folders. A preset with
    ``offline_builder`` set is built on this machine (random, seeded weights) instead of downloaded.
    """

    name: str
    sd_model: str
    clip_model: str
    note: str = ""
    download_size: str = ""
    offline_builder: str | None = None


PRESETS: MappingProxyType[str, Preset] = MappingProxyType(
    {
        "sd14": Preset(
            name="sd14",
            sd_model="CompVis/stable-diffusion-v1-4",
            clip_model="openai/clip-vit-large-patch14",
            note="the method of the original guide",
            download_size="about 5.5 GB (SD 1.4 fp32 safetensors) + 1.7 GB (CLIP ViT-L/14)",
        ),
        "sd15": Preset(
            name="sd15",
            sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip_model="openai/clip-vit-large-patch14",
            download_size="about 5.5 GB (SD 1.5 fp32 safetensors) + 1.7 GB (CLIP ViT-L/14)",
        ),
        "tiny": Preset(
            name="tiny",
            sd_model="tiny",
            clip_model="tiny",
            note="built offline with random, seeded weights: for tests, CI and demos without network",
            download_size="nothing (built locally in about a second, under 2 MB)",
            offline_builder="tiny",
        ),
    }
)


class UnknownPresetError(ValueError):
    """A model name that is neither a preset, a local folder nor a plausible Hub id."""


def default_preset_name() -> str:
    """The preset used when none is named: ``$IMAGEPROMPT_MODEL`` where set, else ``sd14``."""
    return os.environ.get(MODEL_ENV, "").strip() or DEFAULT_PRESET


def resolve_preset(model: str | Preset | None = None) -> Preset:
    """Turn a preset name, a local folder or ``None`` (the default) into a :class:`Preset`.

    A local folder is taken as a Stable Diffusion model folder; its image encoder is looked for in
    an ``image_encoder`` subfolder, else the folder's ``clip`` sibling, else ViT-L/14.
    """
    if isinstance(model, Preset):
        return model
    name = default_preset_name() if model is None else str(model)
    if name in PRESETS:
        return PRESETS[name]
    if os.path.isdir(name):
        clip = _local_clip_for(name)
        return Preset(name=name, sd_model=name, clip_model=clip, note="local folder")
    raise UnknownPresetError(
        f"Unknown model {name!r}: pass one of the presets {', '.join(PRESETS)} or a local model folder, "
        "or use ImagePromptPipeline.from_pretrained(sd_model=..., clip_model=...) for Hub ids."
    )


def _local_clip_for(sd_folder: str) -> str:
    for candidate in (
        os.path.join(sd_folder, "image_encoder"),
        os.path.join(os.path.dirname(os.path.abspath(sd_folder)), "clip"),
    ):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    return PRESETS["sd14"].clip_model
