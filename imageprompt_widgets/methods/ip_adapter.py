"""IP-Adapter: image embeddings through a trained projection into extra cross-attention layers.

``h94/IP-Adapter``'s ``ip-adapter_sd15`` projects a ViT-H/14 image embedding (1024-d) to four
768-d tokens that a second, decoupled cross-attention in every UNet attention layer reads, next to
the text prompt. Loaded with diffusers' ``load_ip_adapter``; the strength is ``scale``, applied
only inside a window of the steps (``adapter_start``..``adapter_end``) and only in the chosen
blocks (InstantStyle's style / composition layers for SD 1.x). The scales are restored after every
run, so a cached pipeline is never left with the window's last value.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import conditioning
from ..conditioning import Conditioning
from ..models import (
    EncoderMismatchError,
    LoadedComponents,
    StatusCallback,
    _load_sd,
    translate_load_errors,
)
from ..presets import Preset
from ..quiet import quiet_loaders
from ..settings import GenerationSettings, SettingsError

#: IP-Adapter layers per block preset, as ``set_ip_adapter_scale`` takes them (SD 1.x block names).
BLOCK_PRESETS: dict[str, Callable[[float], float | dict[str, Any]]] = {
    "all": lambda scale: scale,
    "style": lambda scale: {"up": {"block_1": scale}},
    "composition": lambda scale: {"down": {"block_2": scale}, "mid": scale},
    "style_and_composition": lambda scale: {"down": {"block_2": scale}, "mid": scale, "up": {"block_1": scale}},
}


def parse_adapter(spec: str) -> tuple[str, str, str]:
    """``"repo_or_folder:subfolder:weight_name"`` → its three parts (subfolder may be empty)."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"IP-Adapter spec {spec!r} must be 'repo_or_folder:subfolder:weight_name'.")
    return parts[0], parts[1], parts[2]


def load_components(
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    *,
    safety_checker: bool | None = None,
    allow_pickle: bool = False,
    on_status: StatusCallback | None = None,
) -> LoadedComponents:
    """SD, the adapter's own image encoder (ViT-H for ``ip-adapter_sd15``), and the adapter weights."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ..offline import TINY_ADAPTER_WEIGHT_NAME, ensure_tiny_ip_adapter_models

    say = on_status or (lambda message: None)
    start = time.perf_counter()
    sd_path, encoder_path, subfolder = preset.sd_model, preset.clip_model, preset.clip_subfolder or ""
    if preset.offline_builder == "tiny-ip-adapter":
        say("Building the tiny IP-Adapter models (first use only)…")
        sd_path, encoder_path, adapter_path = ensure_tiny_ip_adapter_models()
        subfolder, adapter_subfolder, weight_name = "", "", TINY_ADAPTER_WEIGHT_NAME
    else:
        adapter_path, adapter_subfolder, weight_name = parse_adapter(preset.ip_adapter or "")
    say(f"Loading Stable Diffusion {preset.sd_model!r} onto {device}…")
    sd = _load_sd(sd_path, preset.sd_model, dtype, safety_checker=safety_checker, allow_pickle=allow_pickle)
    say(f"Loading the IP-Adapter image encoder {preset.clip_model!r}…")
    use_safetensors = None if allow_pickle else True
    with translate_load_errors(preset.clip_model, allow_pickle), quiet_loaders():
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            encoder_path, subfolder=subfolder, dtype=dtype, use_safetensors=use_safetensors
        )
    # The processor diffusers itself would use for ip_adapter_image: the SD folder's feature_extractor,
    # else one saved with the encoder, else (h94's folder has none) CLIP's default sized to the encoder.
    image_processor = sd.feature_extractor
    if image_processor is None:
        try:
            image_processor = CLIPImageProcessor.from_pretrained(encoder_path, subfolder=subfolder)
        except OSError:
            size = image_encoder.config.image_size
            image_processor = CLIPImageProcessor(size=size, crop_size=size)
    say(f"Loading the IP-Adapter weights {preset.ip_adapter!r}…")
    with translate_load_errors(str(preset.ip_adapter), allow_pickle), quiet_loaders():
        sd.load_ip_adapter(adapter_path, subfolder=adapter_subfolder, weight_name=weight_name, image_encoder_folder=None)
    check_adapter_fits(image_encoder, sd.unet, preset)
    # Registered on the diffusers pipeline too, so bare diffusers with ip_adapter_image= sees the same encoder.
    sd.register_modules(image_encoder=image_encoder, feature_extractor=image_processor)
    sd.to(device)
    image_encoder.eval()
    sd.set_progress_bar_config(disable=True)
    seconds = time.perf_counter() - start
    say(f"Loaded {preset.name!r} in {seconds:.1f} s on {device}.")
    return LoadedComponents(sd, image_encoder, image_processor, preset, seconds)


def check_adapter_fits(image_encoder: Any, unet: Any, preset: Preset) -> None:
    """The adapter's projection reads the image encoder's embedding: their widths must agree."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    expected = projection.image_embeds.in_features
    width = image_encoder.config.projection_dim
    if width != expected:
        raise EncoderMismatchError(
            f"The image encoder {preset.clip_model!r} gives {width}-d embeddings but the IP-Adapter "
            f"{preset.ip_adapter!r} expects {expected}-d ones: use the encoder the adapter was trained with."
        )


def adapter_processors(unet: Any) -> list[Any]:
    """The UNet's IP-Adapter attention processors (empty when no adapter is loaded)."""
    return [p for p in unet.attn_processors.values() if hasattr(p, "scale") and hasattr(p, "to_k_ip")]


def is_active(step_index: int, total: int, start: float, end: float) -> bool:
    """Whether step ``step_index`` (0-based) of ``total`` lies in the window ``start <= i/total < end``."""
    fraction = step_index / total if total else 0.0
    return start <= fraction < end


@contextlib.contextmanager
def adapter_window(sd: Any, settings: GenerationSettings) -> Iterator[Callable[[int, int], None]]:
    """Set the adapter's block scales for the run, switch them off outside the step window, restore after.

    Yields the step hook the pipeline calls after each step with ``(steps_finished, total)``.
    """
    processors = adapter_processors(sd.unet)
    saved = [list(p.scale) for p in processors]
    scales = BLOCK_PRESETS[settings.adapter_blocks](settings.scale)
    state = {"active": None}

    def apply(active: bool) -> None:
        if active != state["active"]:
            sd.set_ip_adapter_scale(scales if active else 0.0)
            state["active"] = active

    def before_next_step(steps_finished: int, total: int) -> None:
        apply(is_active(steps_finished, total, settings.adapter_start, settings.adapter_end))

    apply(is_active(0, settings.steps, settings.adapter_start, settings.adapter_end))
    try:
        yield before_next_step
    finally:
        for processor, scale in zip(processors, saved):
            processor.scale = scale


def build_conditioning(
    pipe: Any, embedding: Any, settings: GenerationSettings, negative_embedding: Any, images: Sequence[Any]
) -> Conditioning:
    """``ip_adapter``: the text prompt as ``prompt_embeds``; the images through the adapter.

    Several images are combined with ``combine``/``weights`` on their embeddings (``concat`` keeps
    them side by side: four adapter tokens each). The adapter's negative is zeros, as diffusers
    uses, or the negative images' embeddings.
    """
    if not adapter_processors(pipe.sd.unet):
        raise SettingsError(
            f"mode='ip_adapter' needs a preset with an IP-Adapter ('ip-adapter' or 'tiny-ip-adapter'); "
            f"{pipe.preset.name!r} has none."
        )
    if settings.norm_match:
        raise SettingsError("norm_match rescales tokens fed to the UNet directly; the IP-Adapter has its own "
                            "projection, so switch norm_match off for mode='ip_adapter'.")
    text = pipe.encode_text(settings.prompt, purpose="a text prompt")
    image = _combined(embedding.image_embeds, settings.combine, settings.weights)
    guided = settings.guidance_scale > 1
    negative_text = None
    if guided:
        negative_text = torch.zeros_like(text) if settings.negative == "zeros" else pipe.empty_prompt_embeds()
    if settings.negative == "image":
        negative_image = _combined(negative_embedding.image_embeds, "average", ())
        if negative_image.shape != image.shape:
            negative_image = negative_image[:, :1].expand_as(image)
    else:
        negative_image = torch.zeros_like(image)
    copies = settings.num_images
    adapter_embeds = image.repeat(copies, 1, 1)
    if guided:
        adapter_embeds = torch.cat([negative_image.repeat(copies, 1, 1), adapter_embeds])
    adapter_embeds = adapter_embeds.to(pipe.device, pipe.dtype)
    return Conditioning(
        text,
        negative_text,
        extras={"ip_adapter_image_embeds": adapter_embeds},
        sd_kwargs={"ip_adapter_image_embeds": [adapter_embeds]},
        contexts=[adapter_window(pipe.sd, settings)],
    )


def _combined(image_embeds: torch.Tensor, combine: str, weights: Sequence[float]) -> torch.Tensor:
    """``[N, D]`` embeddings → ``[1, n, D]`` for the adapter (``n`` = 1, or ``N`` for ``concat``)."""
    if len(image_embeds) > 1 or weights:
        combined = conditioning.combine(combine, image_embeds, list(weights) or None)
    else:
        combined = image_embeds
    return combined if combined.ndim == 3 else combined[:, None, :]
