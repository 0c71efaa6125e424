"""``blend``: a text prompt and the image, mixed by ``image_weight``.

``interpolate`` mixes token by token with the ``repeat`` form (77 tokens, like the text); ``concat``
appends the ``single`` form (one token per image) after the 77 text tokens. ``image_weight=0`` is
exactly text-to-image for the prompt, ``1`` the image alone. On SDXL the pooled slot mixes the same way: the
prompt's pooled embedding and bigG's image embedding, ``(1 - w) * text + w * image``.
"""

from __future__ import annotations

import torch

from .. import conditioning
from ..conditioning import Conditioning
from .image_tokens import image_pooled, image_sequence, negative_for, negative_pooled_for
from .inputs import ConditioningInputs


def build(inputs: ConditioningInputs) -> Conditioning:
    settings = inputs.settings
    extras: dict[str, torch.Tensor] = {}
    text = inputs.text.encode(settings.prompt)
    form = "repeat" if settings.blend == "interpolate" else "single"
    image = image_sequence(inputs, inputs.embedding, form, extras=extras).to(text.dtype)
    prompt = conditioning.BLEND_FUNCTIONS[settings.blend](text, image, settings.image_weight)
    pooled = None
    if inputs.text.pooled is not None:
        text_pooled = inputs.text.pooled(settings.prompt)
        pooled = conditioning.lerp_exact(text_pooled, image_pooled(inputs, inputs.embedding), settings.image_weight)
    return Conditioning(prompt, negative=negative_for(inputs, prompt, form, extras), extras=extras,
                        pooled=pooled, negative_pooled=negative_pooled_for(inputs, pooled))
