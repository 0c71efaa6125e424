"""What a method's builder receives: narrow inputs, never the pipeline.

A builder sees the images' embeddings, the settings, SD's text side (three functions) and the parts its
method loaded; it cannot reach into the pipeline's state, so it can be read and tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..encoding import ImageEmbedding
from ..settings import GenerationSettings, SettingsError


@dataclass(frozen=True)
class TextSide:
    """SD's own text encoder, as builders may use it (each raises a ``SettingsError`` on a model without one).

    On SDXL ``encode`` gives both text encoders' hidden states side by side (``[1, 77, 2048]``) and ``pooled``
    the second one's projected embedding (``[1, 1280]``): exactly the ``prompt_embeds`` and
    ``pooled_prompt_embeds`` that diffusers' ``encode_prompt`` returns. On SD 1.x ``pooled`` is None.
    """

    encode: Callable[[str], torch.Tensor]  # prompt -> [1, 77, D], exactly diffusers' prompt_embeds
    empty: Callable[[], torch.Tensor]  # encode(""): diffusers' negative when none is given (SD 1.x)
    typical_norm: Callable[[], float]  # per-token norm of ordinary prompts: the target of norm matching
    #: SDXL: prompt -> [1, P], diffusers' pooled_prompt_embeds for it; None: the model has no pooled slot.
    pooled: Callable[[str], torch.Tensor] | None = None
    #: SDXL's ``force_zeros_for_empty_prompt`` (True for base 1.0): without a negative prompt diffusers' negative is
    #: zeros (tokens and pooled), not the empty prompt's encoding.
    zeros_for_empty: bool = False

    @property
    def has_pooled(self) -> bool:
        """Whether the model has SDXL's pooled slot."""
        return self.pooled is not None


@dataclass
class ConditioningInputs:
    settings: GenerationSettings
    embedding: ImageEmbedding
    text: TextSide
    cross_attention_dim: int  # the UNet's: image tokens fed to it must have this width
    negative_embedding: ImageEmbedding | None = None  # the negative images' embeddings (negative="image")
    images: Sequence[Any] = ()  # the decoded input pictures (the caption method reads them)
    parts: Mapping[str, Any] = field(default_factory=dict)  # what methods loaded: "ip_adapter", "captioner"
    #: One embedding per IP-Adapter when each has its own images (``adapter_images``); empty: ``embedding`` for all.
    adapter_embeddings: Sequence[ImageEmbedding] = ()
    preset_name: str = "custom"  # for messages
    #: The words method's WordSpace (CLIP's text tower and a phrase table), loaded on first call; None: none here.
    words: Callable[[], Any] | None = None


def negative_text(inputs: ConditioningInputs) -> Callable[[], torch.Tensor]:
    """The text side of the negative branch, as a function (called only when guidance runs): SD's text
    encoder on ``negative_prompt``, exactly the ``negative_prompt_embeds`` diffusers computes for it beside a
    77-token prompt, or the empty prompt (diffusers' default negative) when none is typed (zeros shaped like it
    on an SDXL model with ``force_zeros_for_empty_prompt``, as diffusers does)."""
    text, negative_prompt = inputs.text, inputs.settings.negative_prompt
    if negative_prompt:
        return lambda: text.encode(negative_prompt)
    if text.zeros_for_empty:
        return lambda: torch.zeros_like(text.empty())
    return text.empty


def negative_pooled_text(inputs: ConditioningInputs) -> Callable[[], torch.Tensor] | None:
    """The pooled slot of the negative branch beside :func:`negative_text` (None on SD 1.x): the negative
    prompt's pooled embedding, else the empty prompt's (zeros with ``force_zeros_for_empty_prompt``), exactly
    diffusers' ``negative_pooled_prompt_embeds``."""
    text, negative_prompt = inputs.text, inputs.settings.negative_prompt
    if text.pooled is None:
        return None
    pooled = text.pooled
    if negative_prompt:
        return lambda: pooled(negative_prompt)
    if text.zeros_for_empty:
        return lambda: torch.zeros_like(pooled(""))
    return lambda: pooled("")


def text_pooled(inputs: ConditioningInputs, prompt: str) -> tuple[torch.Tensor | None, Callable[[], Any] | None]:
    """The pooled slot of a run whose tokens are the text ``prompt`` (text, words, caption): its pooled embedding
    and the negative's (the negative text's with ``negative="empty_prompt"``, else zeros, as these methods'
    negative tokens are); ``(None, None)`` on SD 1.x."""
    if inputs.text.pooled is None:
        return None, None
    pooled = inputs.text.pooled(prompt)
    if inputs.settings.negative != "empty_prompt":
        return pooled, lambda: torch.zeros_like(pooled)
    return pooled, negative_pooled_text(inputs)


def refuse_image_settings(inputs: ConditioningInputs) -> None:
    """The methods that draw from words alone (``caption``, ``words``) have no image tokens to norm-match and no
    place for negative images: either setting is refused with a sentence rather than ignored."""
    settings = inputs.settings
    if settings.negative == "image":
        raise SettingsError(f"mode={settings.mode!r} draws from text only: use negative='empty_prompt' or 'zeros'.")
    if settings.norm_match:
        raise SettingsError(f"norm_match rescales image tokens, and mode={settings.mode!r} has none: switch "
                            "norm_match off.")
