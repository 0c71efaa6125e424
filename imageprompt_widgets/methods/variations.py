"""The image-variations model: a UNet fine-tuned to read one CLIP image token instead of text.

``lambdalabs/sd-image-variations-diffusers`` (revision ``v2.0``) was trained on exactly what the
``single`` mode produces: ``image_embeds`` as one ``[N, 1, 768]`` token, with zeros as the
unconditional input. Its own diffusers pipeline only offers the legacy ``callback``, so its
components are loaded into a ``StableDiffusionPipeline`` (no text encoder) and driven with
``prompt_embeds`` like every other mode: previews, cancel and traces work the same, and for the
same inputs the pixels equal the image-variations pipeline's (tests/test_methods.py checks it).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..models import (
    LoadedComponents,
    ModelLoadError,
    StatusCallback,
    check_encoder_fits,
    diffusers_dtype_kwarg,
    translate_load_errors,
)
from ..presets import Preset
from ..quiet import quiet_loaders


def load_components(
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    *,
    safety_checker: bool | None = None,
    allow_pickle: bool = False,
    on_status: StatusCallback | None = None,
) -> LoadedComponents:
    """Load an image-variations pipeline folder or Hub repo into a ``StableDiffusionPipeline`` without text parts."""
    from diffusers import StableDiffusionPipeline

    from ..offline import ensure_tiny_variations_model

    say = on_status or (lambda message: None)
    start = time.perf_counter()
    path = preset.sd_model
    kwargs: dict[str, Any] = {
        diffusers_dtype_kwarg(): dtype,
        "use_safetensors": None if allow_pickle else True,
        "text_encoder": None,
        "tokenizer": None,
    }
    if preset.offline_builder == "tiny-variations":
        say("Building the tiny image-variations model (first use only)…")
        path = ensure_tiny_variations_model()
    elif preset.revision:
        kwargs["revision"] = preset.revision
    if safety_checker is False:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    say(f"Loading the image-variations model {preset.sd_model!r} onto {device}…")
    with translate_load_errors(preset.sd_model, allow_pickle), quiet_loaders():
        sd = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    image_encoder, image_processor = sd.image_encoder, sd.feature_extractor
    if image_encoder is None or image_processor is None:
        raise ModelLoadError(
            f"Model {preset.sd_model!r} has no image_encoder or feature_extractor: it is not an image-variations model."
        )
    check_encoder_fits(image_encoder, sd.unet, preset)
    sd.to(device)
    image_encoder.eval()
    sd.set_progress_bar_config(disable=True)
    seconds = time.perf_counter() - start
    say(f"Loaded {preset.name!r} in {seconds:.1f} s on {device}.")
    return LoadedComponents(sd, image_encoder, image_processor, preset, seconds)
