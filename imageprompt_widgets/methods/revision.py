"""``revision``: the image in SDXL's pooled slot (Stability's "Revision", 2023), beside an optional text prompt.

SDXL's ``pooled_prompt_embeds`` is ``text_encoder_2``'s projected text embedding: OpenCLIP ViT-bigG-14's
contrastive space, the very space bigG's image projection lands in. Revision puts the image's bigG embedding
there (ComfyUI's unCLIP conditioning, the A1111 ControlNet extension's ``revision_clipvision``); diffusers has no
such pipeline, so this method builds the tensors and hands them to ``StableDiffusionXLPipeline`` unchanged.

- tokens: the text prompt's (the empty prompt's when none is typed: the image then speaks through the pooled
  slot alone);
- pooled: ``lerp(text_pooled, image_pooled, revision_strength)``; ``image_pooled`` is bigG's image embedding
  (several images: the combine, ``concat`` as their weighted sum), noise-augmented by ``noise_augmentation``
  as unCLIP does (conditioning.noise_augmented, seeded from the run's seed). Strength 0 is exactly
  text-to-image for the prompt.
- the negative branch: the negative text's tokens and pooled embedding as in text-to-image (zeros for
  ``negative="zeros"``); with ``negative="image"`` the negative images' bigG embeddings (averaged) fill the
  negative pooled slot, beside the negative text's tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import conditioning
from ..conditioning import Conditioning, ConditioningError
from ..settings import SettingsError
from .image_tokens import image_pooled
from .inputs import ConditioningInputs, negative_pooled_text, negative_text


def build(inputs: ConditioningInputs) -> Conditioning:
    settings, text = inputs.settings, inputs.text
    if not text.has_pooled:
        raise SettingsError(
            f"mode='revision' puts OpenCLIP bigG's image embedding in SDXL's pooled slot, and the "
            f"{inputs.preset_name!r} model has none (it is not SDXL): use the 'sdxl' or 'tiny-sdxl' preset, or an "
            "image mode such as 'repeat'."
        )
    if inputs.embedding.second is None:
        raise ConditioningError(
            "mode='revision' needs the images' OpenCLIP bigG embeddings: pass images, with a preset that has the "
            "bigG image encoder (clip_model_2)."
        )
    assert text.pooled is not None
    tokens = text.encode(settings.prompt) if settings.prompt.strip() else text.empty()
    text_pooled = text.pooled(settings.prompt)
    image = image_pooled(inputs, inputs.embedding)
    assert image is not None
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    augmented = conditioning.noise_augmented(image, settings.noise_augmentation, generator)
    pooled = conditioning.lerp_exact(text_pooled, augmented, settings.revision_strength)
    extras = {"revision_image_pooled": augmented}
    if settings.negative == "zeros":
        return Conditioning(tokens, negative=lambda: torch.zeros_like(tokens), pooled=pooled,
                            negative_pooled=lambda: torch.zeros_like(pooled), extras=extras)
    return Conditioning(tokens, negative=negative_text(inputs), pooled=pooled,
                        negative_pooled=negative_image_pooled(inputs) if settings.negative == "image"
                        else negative_pooled_text(inputs), extras=extras)


def negative_image_pooled(inputs: ConditioningInputs) -> Callable[[], torch.Tensor]:
    """The negative images' bigG embeddings, averaged: the negative branch's pooled slot with ``negative="image"``."""
    negative_embedding = inputs.negative_embedding
    assert negative_embedding is not None  # generate() checks the inputs against negative="image" first

    def pooled() -> torch.Tensor:
        value = image_pooled(inputs, negative_embedding, combine="average", weights=())
        assert value is not None  # an SDXL model (checked in build)
        return value

    return pooled
