"""IP-Adapter: image embeddings through a trained projection into extra cross-attention layers.

``h94/IP-Adapter``'s ``ip-adapter_sd15`` projects a ViT-H/14 image embedding (1024-d) to four
768-d tokens that a second, decoupled cross-attention in every UNet attention layer reads, next to
the text prompt. Loaded with diffusers' ``load_ip_adapter``; the strength is ``scale``, applied
only inside a window of the steps (``adapter_start``..``adapter_end``, diffusers' ControlNet rule:
:func:`~imageprompt_widgets.conditioning.in_window`) and only in the chosen blocks (InstantStyle's
style / composition layers for SD 1.x). The scales are restored after every run, so a cached pipeline
is never left with the window's last value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import conditioning
from ..conditioning import Conditioning
from ..models import EncoderMismatchError, translate_load_errors
from ..presets import Preset
from ..quiet import quiet_loaders
from ..settings import GenerationSettings, SettingsError
from .inputs import ConditioningInputs, negative_text

#: IP-Adapter layers per block preset, as ``set_ip_adapter_scale`` takes them (SD 1.x block names).
BLOCK_PRESETS: dict[str, Callable[[float], float | dict[str, Any]]] = {
    "all": lambda scale: scale,
    "style": lambda scale: {"up": {"block_1": scale}},
    "composition": lambda scale: {"down": {"block_2": scale}, "mid": scale},
    "style_and_composition": lambda scale: {"down": {"block_2": scale}, "mid": scale, "up": {"block_1": scale}},
}


def parse_adapter(spec: str) -> tuple[str, str, str]:
    """``"repo_or_folder:subfolder:weight_name"`` → its three parts (subfolder may be empty)."""
    parts = spec.rsplit(":", 2)  # a folder path may hold a colon itself (C:\\...)
    if len(parts) != 3:
        raise ValueError(f"IP-Adapter spec {spec!r} must be 'repo_or_folder:subfolder:weight_name'.")
    return parts[0], parts[1], parts[2]


def load_parts(
    *, sd: Any, image_encoder: Any, image_processor: Any, preset: Preset, local: Preset, allow_pickle: bool,
    say: Callable[[str], None], **_: Any,
) -> dict[str, Any]:
    """Load the adapter weights into SD's UNet and register the adapter's image encoder on SD, so bare
    diffusers with ``ip_adapter_image=`` sees the same encoder."""
    folder, subfolder, weight_name = parse_adapter(local.ip_adapter or "")
    say(f"Loading the IP-Adapter weights {preset.ip_adapter!r}…")
    with translate_load_errors(str(preset.ip_adapter), allow_pickle), quiet_loaders():
        sd.load_ip_adapter(folder, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None)
    check_adapter_fits(image_encoder, sd.unet, preset)
    sd.register_modules(image_encoder=image_encoder, feature_extractor=image_processor)
    return {"ip_adapter": AdapterHandle(sd)}


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


class AdapterHandle:
    """The loaded adapter as a builder may use it: block scales inside a step window, restored after."""

    def __init__(self, sd: Any) -> None:
        self._sd = sd

    @contextlib.contextmanager
    def window(self, settings: GenerationSettings) -> Iterator[Callable[[int, int], None]]:
        """Yield the step hook ``(steps_finished, total)`` that switches the adapter on inside the window
        (block scales from ``adapter_blocks`` times ``scale``) and off outside it; restore the scales after."""
        processors = adapter_processors(self._sd.unet)
        saved = [list(p.scale) for p in processors]
        scales = BLOCK_PRESETS[settings.adapter_blocks](settings.scale)
        state: dict[str, bool | None] = {"active": None}

        def before_step(steps_finished: int, total: int) -> None:
            active = conditioning.in_window(steps_finished, total, settings.adapter_start, settings.adapter_end)
            if active != state["active"]:
                self._sd.set_ip_adapter_scale(scales if active else 0.0)
                state["active"] = active

        try:
            yield before_step
        finally:
            for processor, scale in zip(processors, saved):
                processor.scale = scale


def build(inputs: ConditioningInputs) -> Conditioning:
    """``ip_adapter``: the text prompt as ``prompt_embeds``; the images through the adapter.

    Several images are combined with ``combine``/``weights`` on their embeddings (``concat`` keeps
    them side by side: the adapter's tokens for each). The text branch's negative is ``negative_prompt``
    (the empty prompt when none is typed; zeros with ``negative="zeros"``), exactly as diffusers encodes a
    ``negative_prompt`` beside ``ip_adapter_image``; the adapter's negative is zeros, as diffusers uses, or
    the negative images' embeddings. So negative text and negative images act side by side: the text on
    SD's own cross-attention, the images on the adapter's.
    """
    settings = inputs.settings
    adapter = inputs.parts.get("ip_adapter")
    if adapter is None:
        raise SettingsError(
            f"mode='ip_adapter' needs a preset with an IP-Adapter ('ip-adapter' or 'tiny-ip-adapter'); "
            f"{inputs.preset_name!r} has none."
        )
    if settings.norm_match:
        raise SettingsError("norm_match rescales tokens fed to the UNet directly; the IP-Adapter has its own "
                            "projection, so switch norm_match off for mode='ip_adapter'.")
    text = inputs.text.encode(settings.prompt)
    image = _as_adapter_tokens(conditioning.combined_images(settings.combine, inputs.embedding.image_embeds,
                                                            settings.weights))
    negative = (lambda: torch.zeros_like(text)) if settings.negative == "zeros" else negative_text(inputs)
    negative_image = None
    if settings.negative == "image":
        negative_embedding = inputs.negative_embedding
        assert negative_embedding is not None  # generate() checks the inputs against negative="image" first

        def negative_image() -> torch.Tensor:
            combined = _as_adapter_tokens(conditioning.combined_images("average", negative_embedding.image_embeds))
            return combined if combined.shape == image.shape else combined[:, :1].expand_as(image)

    return Conditioning(text, negative=negative, adapter_embeds=image, negative_adapter_embeds=negative_image,
                        contexts=[adapter.window(settings)])


def _as_adapter_tokens(combined: torch.Tensor) -> torch.Tensor:
    """``[1, D]`` or ``[1, n, D]`` → ``[1, n, D]`` (``n`` = 1, or the number of images for ``concat``)."""
    return combined if combined.ndim == 3 else combined[:, None, :]
