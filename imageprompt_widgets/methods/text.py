"""``text``: words only. The prompt through SD's own text encoder, no image: plain text-to-image, the
baseline every image method is compared with (and what a class tries first). ``blend`` with its image weight
at 0 and no image runs this too.
"""

from __future__ import annotations

from ..conditioning import Conditioning
from ..settings import SettingsError
from .inputs import ConditioningInputs, negative_text, text_pooled


def build(inputs: ConditioningInputs) -> Conditioning:
    settings = inputs.settings
    if not settings.prompt.strip():
        raise SettingsError("A words-only run draws what the prompt says: type a prompt (or add an image and "
                            "choose an image mode).")
    if settings.negative == "image":
        raise SettingsError("A words-only run has no negative images: use negative='empty_prompt' or 'zeros'.")
    prompt = inputs.text.encode(settings.prompt)
    pooled, negative_pooled = text_pooled(inputs, settings.prompt)  # SDXL's pooled slot (None on SD 1.x)
    if settings.negative == "zeros":
        return Conditioning(prompt, negative=lambda: prompt.new_zeros(prompt.shape), pooled=pooled,
                            negative_pooled=negative_pooled)
    return Conditioning(prompt, negative=negative_text(inputs), pooled=pooled, negative_pooled=negative_pooled)
