"""Images → CLIP image embeddings: the vision tower with its projection, and what it saw.

``encode_images`` is exactly ``image_encoder(**image_processor(images=..., return_tensors="pt"))`` for
CLIP's own center crop; ``squash`` and ``pad`` show CLIP the whole picture instead. Every projected
vision token is kept too (``tokens``): the ``tokens`` method feeds them to the UNet. On request it keeps the
penultimate layer's hidden states as well: what IP-Adapter Plus reads (diffusers' ``encode_image`` with
``output_hidden_states=True`` takes ``hidden_states[-2]``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import conditioning
from .settings import CROPS, SettingsError


@dataclass
class ImageEmbedding:
    """What the CLIP vision tower made of a batch of images (tensors on the pipeline's device).

    An embedding that did not come from pictures (a text end of an interpolation, a point between two
    images) has only ``image_embeds``: see :meth:`from_embeds`.
    """

    pixel_values: torch.Tensor | None  # [N, 3, H, W], the picture CLIP saw, normalised
    image_embeds: torch.Tensor  # [N, D], projected: the space SD's cross-attention width matches
    hidden_states: torch.Tensor | None  # [N, T, Dv], the vision tower's last hidden state
    tokens: torch.Tensor | None = None  # [N, T, D], every token through post-layernorm and projection
    #: [N, T, Dv], the vision tower's penultimate layer (IP-Adapter Plus reads it); None unless asked for.
    penultimate_hidden_states: torch.Tensor | None = None
    #: SDXL's second tower (OpenCLIP bigG) on the same pictures: its ``image_embeds`` are the pooled slot's image
    #: embedding, its ``tokens`` stand beside this tower's in SDXL's wide tokens. None: one tower.
    second: ImageEmbedding | None = None

    def __len__(self) -> int:
        return self.image_embeds.shape[0]

    @classmethod
    def from_embeds(cls, image_embeds: torch.Tensor) -> ImageEmbedding:
        """Projected embeddings ``[N, D]`` alone (enough for ``repeat``, ``single``, ``blend``, ``ip_adapter``)."""
        if image_embeds.ndim != 2:
            raise SettingsError(f"image_embeds must be [N, D], got shape {tuple(image_embeds.shape)}.")
        return cls(None, image_embeds, None, None)


@dataclass
class ClipTextTower:
    """CLIP's text tower with projection (the space ``image_embeds`` live in, not SD's text encoder) and its
    tokenizer: texts to compare images with, or to walk towards."""

    model: Any  # transformers.CLIPTextModelWithProjection
    tokenizer: Any
    source: str

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), D]`` projected text embeddings, float32 on the CPU."""
        inputs = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(input_ids=inputs["input_ids"].to(self.model.device))
        return out.text_embeds.detach().float().cpu()


def encode_images(
    images: list[Any], image_encoder: Any, image_processor: Any, crop: str = "center_crop", *, penultimate: bool = False
) -> ImageEmbedding:
    """Decoded RGB images → their :class:`ImageEmbedding`, in one batch, without gradients.

    ``penultimate=True`` also keeps the penultimate layer's hidden states (IP-Adapter Plus); the other
    outputs are the same numbers either way.
    """
    if crop not in CROPS:
        raise SettingsError(f"crop={crop!r} is not one of {', '.join(CROPS)}.")
    with torch.inference_mode():
        if crop == "center_crop":
            inputs = image_processor(images=images, return_tensors="pt")
        else:
            squared = [square_for_clip(image, crop, image_processor) for image in images]
            inputs = image_processor(images=squared, do_resize=False, do_center_crop=False, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(image_encoder.device, image_encoder.dtype)
        out = image_encoder(pixel_values=pixel_values, output_hidden_states=penultimate)
        tokens = conditioning.project_vision_tokens(
            out.last_hidden_state, image_encoder.vision_model.post_layernorm, image_encoder.visual_projection
        )
    return ImageEmbedding(pixel_values, out.image_embeds, out.last_hidden_state, tokens,
                          out.hidden_states[-2] if penultimate else None)


def zero_image_hidden_states(image_encoder: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The penultimate hidden states of an all-zero input shaped like ``pixel_values`` ``[N, 3, H, W]`` (zero after
    normalisation: CLIP's mean colour): diffusers' unconditional input for IP-Adapter Plus (``encode_image`` runs
    the encoder on ``torch.zeros_like(image)``)."""
    with torch.inference_mode():
        zeros = torch.zeros_like(pixel_values)
        return image_encoder(zeros, output_hidden_states=True).hidden_states[-2]


def square_for_clip(image: Any, crop: str, processor: Any) -> Any:
    """``squash``: resize to CLIP's square; ``pad``: letterbox on CLIP's mean colour, then resize."""
    from PIL import Image

    size = processor.crop_size
    target = (int(size["width"]), int(size["height"]))
    if crop == "pad":
        side = max(image.size)
        fill = tuple(round(channel * 255) for channel in processor.image_mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image.resize(target, Image.Resampling.BICUBIC)


def fingerprint(image: Any) -> str:
    """sha256 of a decoded image's mode, size and pixels: the same picture from any source, the same print."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
